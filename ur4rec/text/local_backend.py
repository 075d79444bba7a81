"""The ``transformers`` backend: a causal language model from a local folder, offline.

The folder (``text.local_model``) holds what ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` read: config, weights, tokenizer. Nothing is downloaded
(``local_files_only=True``). transformers is imported only when this backend is built,
because the import takes seconds. Prompts use the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path

from ur4rec.config import TextConfig
from ur4rec.text.generator import TextBackendNotFoundError, TextGenerationError, TextGenerator
from ur4rec.text.prompts import SYSTEM_PROMPT, TextRequest, item_prompt, user_prompt


class LocalModelGenerator(TextGenerator):
    def __init__(self, config: TextConfig, device: str = "cpu") -> None:
        if not config.local_model:
            raise TextGenerationError(
                "text.backend is transformers but text.local_model is not set; "
                "set it to a local folder holding a causal LM (config, weights, tokenizer)"
            )
        self.folder = Path(config.local_model).expanduser()
        if not self.folder.is_dir():
            raise TextBackendNotFoundError(
                f"text.local_model {str(self.folder)!r} is not a folder; the transformers backend needs a "
                "local causal LM folder (config.json, weights, tokenizer) and never downloads one"
            )
        if not (self.folder / "config.json").exists():
            raise TextBackendNotFoundError(
                f"text.local_model {str(self.folder)!r} has no config.json: not a transformers model folder"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, local_files_only=True).to(device).eval()
        self.device = device
        self.history_items = config.history_items
        self.max_new_tokens = config.max_new_tokens
        self.temperature = config.temperature
        self.backend = f"transformers:{self.folder.resolve().name}"
        self.settings = json.dumps([str(self.folder.resolve()), SYSTEM_PROMPT, self.temperature, self.max_new_tokens])

    def prompt(self, request: TextRequest) -> str:
        return user_prompt(request, self.history_items) if request.kind == "user" else item_prompt(request)

    def generate(self, request: TextRequest) -> str:
        import torch

        prompt = self.prompt(request)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **sampling,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1]:]  # (T_new,) generated part only
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        if not text:
            raise TextGenerationError(f"{self.folder}: the model generated an empty text for {request.kind} {request.raw_id}")
        return text
