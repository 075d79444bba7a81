"""User-preference paragraphs and item descriptions, generated or imported, and their leakage audit.

Backends behind one :class:`TextGenerator` interface: ``template`` (default, offline),
``openai`` (any OpenAI-compatible endpoint), ``transformers`` (a local causal LM) and
``json`` (pregenerated ``{raw_id: text}`` files). User texts come from the train part of
each sequence only; :func:`audit_user_texts` checks that none names a held-out item and
:func:`apply_leak_policy` acts on what it finds.
"""

from __future__ import annotations

from ur4rec.text.audit import LEAK_POLICIES, AuditRow, LeakAudit, apply_leak_policy, audit_user_texts, write_audit_csv
from ur4rec.text.generate import BACKENDS, GeneratedTexts, generate_texts, make_generator, read_texts, texts_dir
from ur4rec.text.generator import TextBackendNotFoundError, TextGenerationError, TextGenerator
from ur4rec.text.prompts import TextRequest, build_requests, describe_item

__all__ = [
    "BACKENDS", "LEAK_POLICIES", "AuditRow", "GeneratedTexts", "LeakAudit", "TextBackendNotFoundError",
    "TextGenerationError", "TextGenerator", "TextRequest", "apply_leak_policy", "audit_user_texts",
    "build_requests", "describe_item", "generate_texts", "make_generator", "read_texts", "texts_dir",
    "write_audit_csv",
]
