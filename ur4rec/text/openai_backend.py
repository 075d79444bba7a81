"""The ``openai`` backend: any OpenAI-compatible chat-completions endpoint, standard library only.

``POST {base_url}/chat/completions`` with ``{"model", "messages", "temperature",
"max_tokens"}``; the text is ``choices[0].message.content``. Works with OpenAI, vLLM,
Ollama, LM Studio and hosted Qwen/DeepSeek endpoints alike.

Failures: HTTP 429 and 5xx, timeouts and refused connections are retried up to
``max_retries`` times with exponential back-off (``retry_backoff``, doubling; a server's
``Retry-After`` header is honoured when longer); other HTTP errors fail at once, and so does
a response that is not the JSON the API promises, and a host name that does not resolve before
the endpoint has ever answered (offline, or a mistyped base URL: retrying would only wait a
minute to say so). Every error names the endpoint and says
what was wrong. Requests are spaced to stay under ``requests_per_minute``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request

from ur4rec.config import TextConfig
from ur4rec.text.generator import TextGenerationError, TextGenerator
from ur4rec.text.prompts import SYSTEM_PROMPT, TextRequest, item_prompt, user_prompt

RETRY_STATUSES = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 120.0  # seconds; a longer Retry-After is capped


class OpenAIResponseError(TextGenerationError):
    """The endpoint answered with an error or with something that is not a chat completion."""


class OpenAIGenerator(TextGenerator):
    def __init__(self, config: TextConfig) -> None:
        self.url = config.openai_base_url.rstrip("/") + "/chat/completions"
        self.model = config.openai_model
        self.history_items = config.history_items
        self.temperature = config.temperature
        self.max_tokens = config.max_new_tokens
        self.timeout = config.request_timeout
        self.max_retries = config.max_retries
        self.retry_backoff = config.retry_backoff
        if config.max_retries < 0:
            raise TextGenerationError(f"text.max_retries must be 0 or more, got {config.max_retries}")
        self.min_interval = 60.0 / config.requests_per_minute if config.requests_per_minute > 0 else 0.0
        self.api_key_env = config.openai_api_key_env  # read on the first request: cached texts need no key
        self.backend = f"openai:{self.model}"
        self.settings = json.dumps([self.url, SYSTEM_PROMPT, self.temperature, self.max_tokens])
        self._last_request = float("-inf")
        self._answered = False  # whether the endpoint has answered once (a later DNS failure is retried)

    def prompt(self, request: TextRequest) -> str:
        return user_prompt(request, self.history_items) if request.kind == "user" else item_prompt(request)

    def generate(self, request: TextRequest) -> str:
        body = json.dumps({
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self.prompt(request)},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode()
        return self._parse(self._post(body))

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            api_key = os.environ.get(self.api_key_env)
            if not api_key:
                raise TextGenerationError(
                    f"openai backend: environment variable {self.api_key_env} is not set; export the API key "
                    f"for {self.url} there, or set text.openai_api_key_env to '' for an endpoint that needs no key"
                )
            headers["Authorization"] = f"Bearer {api_key}"
        delay = self.retry_backoff
        for attempt in range(self.max_retries + 1):
            self._wait_for_rate_limit()
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                self._answered = True
                return payload
            except urllib.error.HTTPError as error:
                self._answered = True
                detail = error.read().decode("utf-8", errors="replace")[:300]
                if error.code not in RETRY_STATUSES:
                    raise OpenAIResponseError(f"{self.url}: HTTP {error.code} {error.reason}: {detail}") from error
                problem = f"HTTP {error.code} {error.reason}: {detail}"
                wait = max(delay, _retry_after(error.headers.get("Retry-After")))
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
                if isinstance(getattr(error, "reason", None), socket.gaierror) and not self._answered:
                    raise OpenAIResponseError(
                        f"{self.url}: cannot resolve the host name ({error.reason}): offline, or a wrong "
                        "text.openai_base_url. Generate the texts where the endpoint can be reached (the cache in "
                        "RUN/texts/ is then reused), or use text.backend template, json or transformers"
                    ) from error
                problem = f"no response ({getattr(error, 'reason', error)})"
                wait = delay
            if attempt == self.max_retries:
                break
            time.sleep(wait)
            delay *= 2
        raise OpenAIResponseError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last: {problem}")

    def _wait_for_rate_limit(self) -> None:
        wait = self._last_request + self.min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_request = time.monotonic()

    def _parse(self, payload: bytes) -> str:
        excerpt = payload[:200].decode("utf-8", errors="replace")
        try:
            response = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise OpenAIResponseError(
                f"{self.url}: response is not valid JSON ({error}); it starts with {excerpt!r}"
            ) from error
        try:
            content = response["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise OpenAIResponseError(
                f"{self.url}: response JSON has no choices[0].message.content (missing {error}); "
                f"it starts with {excerpt!r}"
            ) from error
        if not isinstance(content, str) or not content.strip():
            raise OpenAIResponseError(f"{self.url}: choices[0].message.content is empty or not a string: {content!r}")
        return content.strip()


def _retry_after(header: str | None) -> float:
    try:
        return min(float(header), MAX_RETRY_AFTER) if header else 0.0
    except ValueError:
        return 0.0  # an HTTP date instead of seconds: fall back to our own back-off
