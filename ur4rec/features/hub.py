"""Is the Hugging Face hub usable right now? Asked before anything would download.

Offline, ``huggingface_hub`` retries a download for about 47 s before failing (measured;
ENVIRONMENT.md). Encoders that need the hub (a model name not in the local cache, a CLIP
``pretrained`` tag) therefore ask first and fail at once with a message that says what to
pass instead. The hub counts as unusable when ``HF_HUB_OFFLINE`` is set, or when its host
does not accept a connection within a few seconds.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT = 3.0  # seconds


class EncoderUnavailableError(ValueError):
    """An encoder cannot be loaded: unknown, missing locally, or needing an unreachable hub."""


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One TCP connection attempt to the hub's host (``HF_ENDPOINT`` or huggingface.co)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def hub_unavailable_reason() -> str | None:
    """Why the hub cannot be used, or None when it can."""
    if offline_requested():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return "the Hugging Face hub cannot be reached (offline?)"
    return None
