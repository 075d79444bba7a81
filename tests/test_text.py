import contextlib
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest

from ur4rec.cli import main
from ur4rec.config import Config
from ur4rec.data import build_dataset, load_dataset
from ur4rec.data.dataset import SequenceDataset
from ur4rec.data.movielens import ItemMeta, RawInteractions
from ur4rec.text import (
    TextBackendNotFoundError,
    TextGenerationError,
    apply_leak_policy,
    audit_user_texts,
    build_requests,
    generate_texts,
    make_generator,
    openai_backend,
)
from ur4rec.text.cache import CacheFormatError, GenerationCache
from ur4rec.text.openai_backend import OpenAIGenerator, OpenAIResponseError
from ur4rec.text.template import TemplateGenerator
from ur4rec.text.titles import natural_title, title_patterns

# ---------------------------------------------------------------- template texts


def mentions(text: str, title: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(natural_title(title)) + r"(?!\w)", text, re.IGNORECASE) is not None


def test_template_user_texts_name_no_held_out_item(synthetic, tmp_path):
    texts = generate_texts(Config(), synthetic, tmp_path, progress=False)
    assert len(texts.users) == synthetic.n_users and len(texts.items) == synthetic.n_items
    valid, test = synthetic.target("valid"), synthetic.target("test")
    checked = 0
    for user in range(synthetic.n_users):
        text = texts.users[str(synthetic.user_raw_ids[user])]
        train_titles = {synthetic.item_meta[item].title for item in synthetic.train_sequence(user)}
        for item in (valid[user], test[user]):
            title = synthetic.item_meta[item].title
            if title not in train_titles:  # a revisited item may be named from the train part
                assert not mentions(text, title), f"user {user}: {text!r} names held-out {title!r}"
                checked += 1
    assert checked > synthetic.n_users  # most held-out items are not revisits: the check bites


def test_template_texts_do_not_change_when_held_out_items_do(synthetic):
    """Texts are a function of the train part only: replace every held-out item, same texts."""
    shuffled = [np.concatenate([s[:-2], (s[-2:] % synthetic.n_items) + 1]) for s in synthetic.sequences]
    other = SequenceDataset(synthetic.name, synthetic.source, synthetic.user_raw_ids, synthetic.item_raw_ids,
                            shuffled, synthetic.item_meta)
    generator = TemplateGenerator()
    before = [generator.generate(r) for r in build_requests(synthetic) if r.kind == "user"]
    after = [generator.generate(r) for r in build_requests(other) if r.kind == "user"]
    assert before == after


def test_template_paragraph_names_genres_eras_and_titles(synthetic):
    request = build_requests(synthetic)[0]
    text = TemplateGenerator().generate(request)
    top_genre = max({g for m in request.items for g in m.genres}, key=lambda g: sum(g in m.genres for m in request.items))
    assert top_genre in text and "0s" in text and "Representative items:" in text
    assert TemplateGenerator().generate(build_requests(synthetic)[-1]).startswith("Item ")


# ---------------------------------------------------------------- leakage audit

TITLES = {
    "1": "Godfather, The", "2": "Godfather: Part II, The", "3": "Heat", "4": "M", "5": "Postino, Il",
    "6": "Seven (Se7en)", "7": "Usual Suspects, The", "8": "Toy Story", "9": "Fargo", "10": "Speed",
    "11": "Godfather, The",  # MovieLens lists some films twice under two ids
}
# user: (item sequence; the last two are validation and test), text, expected (names valid, names test)
CASES = {
    "1": (["8", "9", "1", "3"], "Loves *The Godfather* and crime sagas.", (True, False)),
    "2": (["8", "9", "1", "7"], "Fan of The Godfather: Part II and of the usual suspects, the heist film.", (False, True)),
    "3": (["8", "9", "3", "4"], "Enjoys films with heat and tension, rated M for mature.", (False, False)),
    "4": (["8", "9", "3", "5"], "A fan of Heat (1995) and Il Postino.", (True, True)),
    "5": (["8", "9", "6", "2"], "Watched Se7en twice and loved The Godfather Part II.", (True, True)),
    "6": (["1", "9", "8", "10"], "A fan of TOY STORY who likes speed.", (True, False)),
    "7": (["9", "10", "1", "2"], "Their favourite sequel\u2014The Godfather: Part II\u2014stands out.", (False, True)),
    "8": (["11", "9", "1", "8"], "Loves The Godfather.", (False, False)),
}


@pytest.fixture
def crafted() -> SequenceDataset:
    users, items, stamps = [], [], []
    for user, (sequence, _, _) in CASES.items():
        for step, item in enumerate(sequence):
            users.append(user)
            items.append(item)
            stamps.append(step)
    meta = {raw_id: ItemMeta(title, 1995, ["Drama"]) for raw_id, title in TITLES.items()}
    raw = RawInteractions("crafted", "test", np.array(users), np.array(items), np.array(stamps), meta)
    return build_dataset(raw)


def test_audit_finds_every_planted_leak_and_nothing_else(crafted):
    texts = {user: text for user, (_, text, _) in CASES.items()}
    audit = audit_user_texts(texts, crafted)
    found = {user: (row.names_valid_item, row.names_test_item) for user, row in audit.rows.items()}
    assert found == {user: expected for user, (_, _, expected) in CASES.items()}
    assert audit.rows["5"].matched_titles == ["Seven (Se7en)", "Godfather: Part II, The"]
    counts = audit.counts()
    assert counts["names_either"] == 6
    assert counts["unauditable_held_out_titles"] == 1  # "M"
    assert counts["held_out_titles_also_in_train"] == 1  # user 8's Godfather, a train item under another id


def test_leak_policies(crafted, caplog):
    texts = {user: text for user, (_, text, _) in CASES.items()}
    audit = audit_user_texts(texts, crafted)
    with caplog.at_level(logging.WARNING):
        assert apply_leak_policy(texts, audit, "warn") == texts
    assert "6 of 8 user texts name a held-out item" in caplog.text
    assert set(apply_leak_policy(texts, audit, "drop")) == {"3", "8"}
    redacted = apply_leak_policy(texts, audit, "redact")
    assert redacted["4"] == "A fan of [redacted] (1995) and [redacted]."
    assert redacted["7"] == "Their favourite sequel\u2014[redacted]\u2014stands out."
    assert redacted["3"] == texts["3"]
    with pytest.raises(ValueError, match="unknown policy"):
        apply_leak_policy(texts, audit, "ignore")


def test_one_word_titles_shorter_than_four_characters_get_no_pattern():
    assert title_patterns("Ran") == [] and title_patterns("Net, The") == []
    assert [pattern.search("A fan of Heat.") is not None for pattern in title_patterns("Heat")] == [True]


def test_every_title_of_an_item_with_several_alternatives_is_found():
    # ML-1M writes "Seven Samurai (The Magnificent Seven) (Shichinin no samurai)": each of the
    # three names the film; only the last one used to be found
    meta = {"1": ItemMeta("Seven Samurai (The Magnificent Seven) (Shichinin no samurai)", 1954, ["Action"]),
            "2": ItemMeta("Fargo", 1996, ["Crime"]), "3": ItemMeta("Toy Story", 1995, ["Animation"])}
    raw = RawInteractions("tiny", "test", np.array(["1"] * 4), np.array(["2", "3", "1", "2"]), np.arange(4), meta)
    dataset = build_dataset(raw)  # user 1: validation item 1
    for text in ("Loves Seven Samurai.", "Loves The Magnificent Seven.", "Loves Shichinin no samurai."):
        assert audit_user_texts({"1": text}, dataset).rows["1"].names_valid_item, text


def test_curly_apostrophe_in_a_user_text_still_names_the_title():
    meta = {"1": ItemMeta("Heat", 1995, ["Crime"]), "2": ItemMeta("Fargo", 1996, ["Crime"]),
            "3": ItemMeta("Toy Story", 1995, ["Animation"]), "4": ItemMeta("Schindler's List", 1993, ["Drama"])}
    # user 1 watches 2, 3, then 1 (validation) and 4 (test)
    raw = RawInteractions("tiny", "test", np.array(["1"] * 4), np.array(["2", "3", "1", "4"]), np.arange(4), meta)
    dataset = build_dataset(raw)
    texts = {"1": "Loves Schindler\u2019s List."}
    audit = audit_user_texts(texts, dataset)
    assert (audit.rows["1"].names_valid_item, audit.rows["1"].names_test_item) == (False, True)
    assert apply_leak_policy(texts, audit, "redact") == {"1": "Loves [redacted]."}


# ---------------------------------------------------------------- resumable cache


class CountingTemplate(TemplateGenerator):
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def generate(self, request):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        return super().generate(request)


def test_interrupted_generation_resumes_without_duplicates_or_rework(synthetic, tmp_path):
    config = Config()
    with pytest.raises(KeyboardInterrupt):
        generate_texts(config, synthetic, tmp_path, progress=False, generator=CountingTemplate(fail_after=50))
    cache = tmp_path / "texts" / "generations.jsonl"
    assert len(cache.read_text().splitlines()) == 50
    cache.write_bytes(cache.read_bytes()[:-15])  # the crash cut the last record short

    resumed = CountingTemplate()
    texts = generate_texts(config, synthetic, tmp_path, progress=False, generator=resumed)
    keys = [(json.loads(line)["backend"], json.loads(line)["prompt_hash"]) for line in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys))  # no duplicates, every line valid JSON
    assert resumed.calls == len(keys) - 49  # only the 49 complete records were reused
    assert texts.generated == resumed.calls and texts.reused >= 49  # (two synthetic users share a history)
    clean = generate_texts(config, synthetic, tmp_path / "clean", progress=False)
    assert (texts.users, texts.items) == (clean.users, clean.items)

    again = CountingTemplate()
    generate_texts(config, synthetic, tmp_path, progress=False, generator=again)
    assert again.calls == 0
    forced = CountingTemplate()
    generate_texts(config, synthetic, tmp_path, force=True, progress=False, generator=forced)
    assert forced.calls == len(keys) and len(cache.read_text().splitlines()) == len(keys)


def test_damaged_middle_line_is_an_error_naming_it(synthetic, tmp_path):
    generate_texts(Config(), synthetic, tmp_path, progress=False)
    cache = tmp_path / "texts" / "generations.jsonl"
    lines = cache.read_text().splitlines()
    lines[3] = lines[3][:20]
    cache.write_text("\n".join(lines) + "\n")
    with pytest.raises(CacheFormatError, match="generations.jsonl, line 4"):
        generate_texts(Config(), synthetic, tmp_path, progress=False)


def test_cut_off_last_line_that_ends_in_a_newline_is_removed_not_an_error(synthetic, tmp_path, caplog):
    generate_texts(Config(), synthetic, tmp_path, progress=False)
    cache = tmp_path / "texts" / "generations.jsonl"
    complete = cache.read_text()
    cut = '{"kind": "user", "raw_id"\n'
    cache.write_text(complete + cut)
    with GenerationCache(cache) as opened:
        assert opened.truncated_bytes == len(cut)
    assert cache.read_text() == complete
    cache.write_text(complete + cut)
    with caplog.at_level(logging.WARNING):
        again = generate_texts(Config(), synthetic, tmp_path, progress=False)
    assert f"removed an incomplete last record ({len(cut)} bytes)" in caplog.text
    assert again.generated == 0 and cache.read_text() == complete


def test_cache_append_of_a_key_already_present_writes_nothing(tmp_path):
    path = tmp_path / "generations.jsonl"
    with GenerationCache(path) as cache:
        cache.append("user", "1", ("template", "abc"), "first")
        cache.append("user", "1", ("template", "abc"), "second")
    with GenerationCache(path) as cache:
        cache.append("user", "1", ("template", "abc"), "third")
        assert cache.get(("template", "abc")) == "first"
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == ["first"]


def test_prompt_hash_changes_with_generator_settings(synthetic):
    request = build_requests(synthetic)[0]
    greedy = OpenAIGenerator(Config().override(["text.temperature=0.0"]).text)
    sampled = OpenAIGenerator(Config().override(["text.temperature=0.7"]).text)
    assert greedy.prompt_hash(request) == OpenAIGenerator(Config().text).prompt_hash(request)
    assert greedy.prompt_hash(request) != sampled.prompt_hash(request)



def test_template_cache_key_covers_every_word_of_the_text(synthetic):
    # the template's user paragraph names the domain ("movies" for MovieLens, "items" else): a
    # cached "items" paragraph must not be reused for a MovieLens run of the same histories
    from dataclasses import replace
    request = next(r for r in build_requests(synthetic) if r.kind == "user" and r.items)
    movie = replace(request, domain="movie")
    template = TemplateGenerator()
    assert template.generate(request) != template.generate(movie)
    assert template.prompt_hash(request) != template.prompt_hash(movie)


# ---------------------------------------------------------------- openai backend


class FakeChatEndpoint:
    """An OpenAI-style server on 127.0.0.1 that answers from a script, then with successes."""

    def __init__(self, script: list[tuple] | None = None) -> None:
        """``script``: (status, body) or (status, body, {header: value}) per request."""
        self.script = list(script or [])
        self.requests: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if endpoint.script:
                    status, payload, *extra = endpoint.script.pop(0)
                else:
                    status, payload, extra = 200, success(f"about: {body['messages'][-1]['content'][:30]}"), []
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits up to one interval, 0.5 s by default.
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


def success(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def openai_config(endpoint: FakeChatEndpoint, monkeypatch) -> Config:
    monkeypatch.setenv("UR4REC_TEST_KEY", "secret")
    return Config().override([
        "text.backend=openai", f"text.openai_base_url={endpoint.base_url}", "text.openai_model=tiny-chat",
        "text.openai_api_key_env=UR4REC_TEST_KEY", "text.retry_backoff=0.01", "text.requests_per_minute=0",
        "text.request_timeout=5", "text.max_retries=2",
    ])


def test_openai_backend_success(synthetic, monkeypatch):
    with FakeChatEndpoint([(200, success("  Likes Alpha films.  "))]) as endpoint:
        generator = make_generator(openai_config(endpoint, monkeypatch), synthetic)
        assert generator.generate(build_requests(synthetic)[0]) == "Likes Alpha films."
    request = endpoint.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["model"] == "tiny-chat"
    assert "Item " in request["body"]["messages"][-1]["content"]  # the user's train items are in the prompt


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The openai backend's waits, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(openai_backend, "time", SimpleNamespace(sleep=recorded.append, monotonic=time.monotonic))
    return recorded


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_openai_backend_retries_after_429_and_5xx(synthetic, monkeypatch, sleeps, status):
    with FakeChatEndpoint([(status, b'{"error": "try again"}'), (200, success("ok"))]) as endpoint:
        generator = make_generator(openai_config(endpoint, monkeypatch), synthetic)
        assert generator.generate(build_requests(synthetic)[0]) == "ok"
    assert len(endpoint.requests) == 2 and sleeps == [0.01]


def test_openai_backend_fails_at_once_on_a_client_error(synthetic, monkeypatch, sleeps):
    with FakeChatEndpoint([(400, b'{"error": "bad model"}')]) as endpoint:
        generator = make_generator(openai_config(endpoint, monkeypatch), synthetic)
        with pytest.raises(OpenAIResponseError, match=r"/v1/chat/completions: HTTP 400 Bad Request: .*bad model"):
            generator.generate(build_requests(synthetic)[0])
    assert len(endpoint.requests) == 1 and sleeps == []


def test_openai_backend_gives_up_after_repeated_5xx(synthetic, monkeypatch, sleeps):
    with FakeChatEndpoint([(503, b"busy")] * 3) as endpoint:
        generator = make_generator(openai_config(endpoint, monkeypatch), synthetic)
        with pytest.raises(OpenAIResponseError, match=r"gave up after 3 attempts; last: HTTP 503"):
            generator.generate(build_requests(synthetic)[0])
    assert len(endpoint.requests) == 3  # max_retries=2: the first try and two retries
    assert sleeps == pytest.approx([0.01, 0.02])  # retry_backoff, doubling


def test_openai_backend_waits_for_a_longer_retry_after_capped_at_two_minutes(synthetic, monkeypatch, sleeps):
    script = [(429, b"slow down", {"Retry-After": "0.5"}), (503, b"busy", {"Retry-After": "0.001"}),
              (429, b"slow down", {"Retry-After": "3600"}), (200, success("ok"))]
    with FakeChatEndpoint(script) as endpoint:
        config = openai_config(endpoint, monkeypatch).override(["text.max_retries=3"])
        assert make_generator(config, synthetic).generate(build_requests(synthetic)[0]) == "ok"
    # back-off 0.01, 0.02, 0.04; the header wins when longer, and 3600 s is capped at 120 s
    assert sleeps == pytest.approx([0.5, 0.02, 120.0])


def test_openai_backend_retries_a_refused_connection(synthetic, monkeypatch, sleeps):
    with socket.socket() as probe:  # a free port that nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = SimpleNamespace(base_url=f"http://127.0.0.1:{port}/v1")
    config = openai_config(closed, monkeypatch).override(["text.max_retries=1"])
    with pytest.raises(OpenAIResponseError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: gave up after 2 "
                                                   r"attempts; last: no response \(.*refused"):
        make_generator(config, synthetic).generate(build_requests(synthetic)[0])
    assert sleeps == [0.01]


def test_openai_backend_offline_fails_at_once_saying_what_to_do(synthetic, monkeypatch, sleeps):
    # a host name that does not resolve (no network, or a typo): an error at once, not a minute of retries
    import urllib.error
    import urllib.request

    attempts = []

    def unresolvable(request, timeout):
        attempts.append(request.full_url)
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", unresolvable)
    config = openai_config(SimpleNamespace(base_url="http://ur4rec-no-such-host.invalid/v1"), monkeypatch)
    generator = make_generator(config, synthetic)
    with pytest.raises(OpenAIResponseError, match=r"ur4rec-no-such-host.invalid/v1/chat/completions: cannot resolve "
                                                   r"the host name .*offline, or a wrong text.openai_base_url.*"
                                                   r"text.backend template, json or transformers"):
        generator.generate(build_requests(synthetic)[0])
    assert len(attempts) == 1 and sleeps == []
    # once the endpoint has answered, a failed look-up is a blip: retried
    answer = SimpleNamespace(read=lambda: success("ok"))
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: contextlib.nullcontext(answer))
    assert generator.generate(build_requests(synthetic)[0]) == "ok"
    monkeypatch.setattr(urllib.request, "urlopen", unresolvable)
    with pytest.raises(OpenAIResponseError, match="gave up after 3 attempts; last: no response"):
        generator.generate(build_requests(synthetic)[0])
    assert len(attempts) == 4 and len(sleeps) == 2


def test_openai_backend_malformed_json_is_a_clear_error(synthetic, monkeypatch):
    with FakeChatEndpoint([(200, b"<html>not json"), (200, b'{"choices": []}')]) as endpoint:
        generator = make_generator(openai_config(endpoint, monkeypatch), synthetic)
        with pytest.raises(OpenAIResponseError, match=r"/v1/chat/completions: response is not valid JSON.*<html>"):
            generator.generate(build_requests(synthetic)[0])
        with pytest.raises(OpenAIResponseError, match=r"no choices\[0\]\.message\.content"):
            generator.generate(build_requests(synthetic)[0])
    assert endpoint.base_url in str(OpenAIResponseError(f"{endpoint.base_url}/chat/completions: x"))


def test_openai_backend_through_generate_texts_and_missing_key(synthetic, tmp_path, monkeypatch):
    with FakeChatEndpoint() as endpoint:
        config = openai_config(endpoint, monkeypatch)
        texts = generate_texts(config, synthetic, tmp_path, progress=False)
        assert texts.backend == "openai:tiny-chat" and texts.generated == len(endpoint.requests)
        assert all(text.startswith("about: ") for text in texts.users.values())
        monkeypatch.delenv("UR4REC_TEST_KEY")
        generate_texts(config, synthetic, tmp_path, progress=False)  # all cached: no request, no key needed
        assert texts.generated == len(endpoint.requests)
    with pytest.raises(TextGenerationError, match="UR4REC_TEST_KEY is not set"):
        OpenAIGenerator(config.text).generate(build_requests(synthetic)[0])


# ---------------------------------------------------------------- transformers and json backends


def test_transformers_backend_missing_folder_is_a_clear_error(synthetic, tmp_path):
    config = Config().override(["text.backend=transformers", f"text.local_model={tmp_path / 'no-model'}"])
    with pytest.raises(TextBackendNotFoundError, match="no-model' is not a folder"):
        make_generator(config, synthetic)


def test_json_backend_imports_texts_by_raw_id(synthetic, tmp_path):
    folder = tmp_path / "llm"
    folder.mkdir()
    users = {str(raw_id): f"paragraph {raw_id}" for raw_id in synthetic.user_raw_ids[:-3]}
    (folder / "user_preferences.json").write_text(json.dumps(users))
    (folder / "item_descriptions.json").write_text(json.dumps({"1": "Item 1, a quiet film."}))
    config = Config().override(["text.backend=json", f"text.folder={folder}"])
    texts = generate_texts(config, synthetic, tmp_path / "run", progress=False)
    assert texts.users == users and texts.items == {"1": "Item 1, a quiet film."}
    assert json.loads((tmp_path / "run" / "texts" / "user_texts.json").read_text()) == users

    (folder / "user_preferences.json").write_text(json.dumps({"u999": "someone else's"}))
    with pytest.raises(TextGenerationError, match="none of its 1 ids is a user id"):
        make_generator(config, synthetic)
    (folder / "item_descriptions.json").unlink()
    with pytest.raises(TextBackendNotFoundError, match="item_descriptions.json does not exist"):
        make_generator(config, synthetic)


def test_json_backend_serves_an_edited_text_not_the_cached_one(synthetic, tmp_path):
    folder = tmp_path / "llm"
    folder.mkdir()
    users = {str(raw_id): f"paragraph {raw_id}" for raw_id in synthetic.user_raw_ids}
    (folder / "user_preferences.json").write_text(json.dumps(users))
    (folder / "item_descriptions.json").write_text("{}")
    config = Config().override(["text.backend=json", f"text.folder={folder}"])
    generate_texts(config, synthetic, tmp_path / "run", progress=False)
    first = str(synthetic.user_raw_ids[0])
    users[first] = "an edited paragraph"
    (folder / "user_preferences.json").write_text(json.dumps(users))
    texts = generate_texts(config, synthetic, tmp_path / "run", progress=False)
    assert texts.users[first] == "an edited paragraph"


def test_json_backend_warns_when_item_descriptions_do_not_name_their_titles(synthetic, tmp_path, caplog):
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "user_preferences.json").write_text("{}")
    config = Config().override(["text.backend=json", f"text.folder={folder}"])
    items = range(1, 21)  # 20 descriptions: the fewest the check looks at
    unnamed = {str(synthetic.item_raw_ids[item]): "A quiet film about the sea." for item in items}
    (folder / "item_descriptions.json").write_text(json.dumps(unnamed))
    with caplog.at_level(logging.WARNING):
        make_generator(config, synthetic)
    assert "only 0% of item descriptions name their own item's title" in caplog.text
    caplog.clear()
    named = {str(synthetic.item_raw_ids[item]): f"{synthetic.item_meta[item].title}, a quiet film." for item in items}
    (folder / "item_descriptions.json").write_text(json.dumps(named))
    with caplog.at_level(logging.WARNING):
        make_generator(config, synthetic)
    assert "name their own item's title" not in caplog.text


@pytest.mark.parametrize(("content", "message"), [
    ("[]", r"user_preferences.json: expected an object \{id: text\}, got a JSON list"),
    ('{"1": 5}', r"user_preferences.json: the text for id '1' is of type int, not a string"),
    ('{"1": "unclosed', r"user_preferences.json: not valid JSON"),
], ids=["list", "number", "invalid-json"])
def test_json_backend_malformed_file_is_an_error_naming_it(synthetic, tmp_path, content, message):
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "user_preferences.json").write_text(content)
    (folder / "item_descriptions.json").write_text("{}")
    with pytest.raises(TextGenerationError, match=message):
        make_generator(Config().override(["text.backend=json", f"text.folder={folder}"]), synthetic)


# ---------------------------------------------------------------- command line


def test_cli_text_generate_and_audit(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["text", "generate", "--config", "configs/smoke.yaml", "--run-dir", str(run),
                 "--set", "train.progress=false"]) == 0
    assert "200 of 200 users and 100 of 100 items have a text" in capsys.readouterr().out
    user_texts = json.loads((run / "texts" / "user_texts.json").read_text())
    assert len(user_texts) == 200 and (run / "texts" / "generations.jsonl").exists()

    dataset = load_dataset(Config.load("configs/smoke.yaml").data)
    user = next(u for u in range(dataset.n_users) if dataset.target("test")[u] not in dataset.train_sequence(u))
    first = str(dataset.user_raw_ids[user])
    planted = dict(user_texts)
    planted[first] += f" Next up: {dataset.item_meta[dataset.target('test')[user]].title}."
    folder = tmp_path / "planted"
    folder.mkdir()
    (folder / "user_texts.json").write_text(json.dumps(planted))
    assert main(["text", "audit", "--config", "configs/smoke.yaml", "--run-dir", str(run),
                 "--texts", str(folder)]) == 0
    assert "name their test item        1" in capsys.readouterr().out
    rows = (run / "texts" / "audit.csv").read_text().splitlines()
    assert rows[0] == "user_id,names_valid_item,names_test_item,matched_titles"
    assert rows[user + 1].startswith(f"{first},0,1,Item ")


def test_forgetting_a_backend_keeps_the_other_backends_texts_when_stopped_while_rewriting(tmp_path, monkeypatch):
    # `text generate --force` rewrote the cache file in place: a stop part way through the write lost
    # every record after the cut, other backends' (paid LLM) texts too
    from pathlib import Path

    path = tmp_path / "cache.jsonl"
    with GenerationCache(path) as cache:
        for i in range(50):
            cache.append("user", str(i), ("openai", f"h{i}"), f"paid text {i}")
            cache.append("user", str(i), ("template", f"t{i}"), f"template text {i}")
    before = path.read_text()
    real_write = Path.write_text

    def stopped(self, text, *args, **kwargs):  # half the text reaches the disk, then the process stops
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", stopped)
    with pytest.raises(KeyboardInterrupt), GenerationCache(path) as cache:
        cache.forget_backend("template")
    monkeypatch.undo()
    assert path.read_text() == before
    with GenerationCache(path) as cache:
        cache.forget_backend("template")
    assert sorted(GenerationCache(path).texts) == sorted(("openai", f"h{i}") for i in range(50))
