"""Pins for documented details of text generation and feature building that no broader test checks.

Each test is small and hand-computed: prompt history, the template's representative titles,
cache keys and damaged-cache handling, title typography, the feature store's digests and run
manifest, image decoding and file choice, and the quality metrics' edge cases.
"""

import io
import json
import os
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tiny_run import MeanColourEncoder

from ur4rec.config import Config
from ur4rec.data import build_dataset
from ur4rec.data.movielens import ItemMeta, RawInteractions
from ur4rec.features import build_image_features, semantic, visual
from ur4rec.features.quality import genre_agreement, lift
from ur4rec.features.store import read_run_manifest, update_run_manifest
from ur4rec.text import audit_user_texts, build_requests
from ur4rec.text.cache import CacheFormatError, GenerationCache
from ur4rec.text.openai_backend import OpenAIGenerator
from ur4rec.text.prompts import TextRequest, user_prompt
from ur4rec.text.template import representative_titles, user_paragraph
from ur4rec.text.titles import normalise_typography


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every feature store write goes under tmp_path, never into ~/.cache."""
    monkeypatch.setenv("UR4REC_CACHE", str(tmp_path / "cache"))


def metas(*specs) -> list[ItemMeta]:
    """ItemMeta per (title, year, genres)."""
    return [ItemMeta(title, year, list(genres)) for title, year, genres in specs]


# ---------------------------------------------------------------- prompts and template


def test_user_prompt_lists_the_most_recent_history_items_oldest_first():
    # Pins: an LLM prompt shows the LAST history_items train items (in time order), not the first ones.
    items = metas(("Alpha", 1991, ["Drama"]), ("Bravo", 1992, ["Drama"]), ("Charlie", 1993, ["Drama"]),
                  ("Delta", 1994, ["Crime"]), ("Echo", 1995, ["Comedy"]))
    prompt = user_prompt(TextRequest("user", "1", items, "movie"), history_items=2)
    assert "\n1. Delta (1994). Crime.\n2. Echo (1995). Comedy.\n\n" in prompt
    assert not any(title in prompt for title in ("Alpha", "Bravo", "Charlie"))
    everything = user_prompt(TextRequest("user", "1", items, "movie"), history_items=0)  # 0: the whole history
    assert "\n1. Alpha (1991). Drama.\n" in everything and "\n5. Echo (1995). Comedy.\n" in everything


def test_representative_titles_most_genres_first_then_most_recent_first():
    # Pins: among items carrying equally many top genres, the most recent (latest in the history) comes first.
    items = metas(("Alpha", 1991, ["Drama", "Crime"]), ("Bravo", 1992, ["Drama"]), ("Charlie", 1993, ["Drama"]),
                  ("Delta", 1994, ["Comedy"]), ("Echo", 1995, ["Drama"]))
    assert representative_titles(items, ["Drama", "Crime"]) == ["Alpha (1991)", "Echo (1995)", "Charlie (1993)"]
    same = metas(*[(name, 2000 + i, ["Drama"]) for i, name in enumerate(["Alpha", "Bravo", "Charlie", "Delta"])])
    assert user_paragraph(same, "movie").endswith(
        "Representative movies: Delta (2003), Charlie (2002) and Bravo (2001).")


# ---------------------------------------------------------------- generation cache keys and file


def test_openai_prompt_hash_changes_with_max_new_tokens(synthetic):
    # Pins: the cache key covers max tokens, so a longer/shorter generation limit is not served stale texts.
    request = build_requests(synthetic)[0]
    short = OpenAIGenerator(Config().override(["text.max_new_tokens=32"]).text)
    long = OpenAIGenerator(Config().override(["text.max_new_tokens=256"]).text)
    assert short.prompt_hash(request) != long.prompt_hash(request)
    assert short.prompt_hash(request) == OpenAIGenerator(Config().override(["text.max_new_tokens=32"]).text
                                                         ).prompt_hash(request)


def test_damaged_second_to_last_cache_line_is_an_error_not_a_truncation(tmp_path):
    # Pins: only a damaged LAST line counts as an interrupted write; the line before it is an error naming it.
    path = tmp_path / "generations.jsonl"
    with GenerationCache(path) as cache:
        for n in range(3):
            cache.append("user", str(n), ("template", f"hash{n}"), f"text {n}")
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:25]
    damaged = "\n".join(lines) + "\n"
    path.write_text(damaged)
    with pytest.raises(CacheFormatError, match=r"generations.jsonl, line 2: not a generation record"):
        GenerationCache(path)
    assert path.read_text() == damaged  # nothing was cut off the file


# ---------------------------------------------------------------- title typography


def test_en_dash_and_no_break_space_are_normalised_for_title_matching():
    # Pins: U+2013 -> "-" and U+00A0 -> " " one for one, and an en-dashed title in a text is found by the audit.
    assert normalise_typography("Spider\u2013Man\u00a0and\u00a0more") == "Spider-Man and more"
    meta = {"1": ItemMeta("Spider-Man", 2002, ["Action"]), "2": ItemMeta("Fargo", 1996, ["Crime"]),
            "3": ItemMeta("Toy Story", 1995, ["Animation"]), "4": ItemMeta("Usual Suspects, The", 1995, ["Crime"])}
    # user 1 watches 2, 3, then 1 (validation) and 4 (test)
    raw = RawInteractions("tiny", "test", np.array(["1"] * 4), np.array(["2", "3", "1", "4"]), np.arange(4), meta)
    dataset = build_dataset(raw)
    row = audit_user_texts({"1": "A fan of Spider\u2013Man."}, dataset).rows["1"]
    assert (row.names_valid_item, row.names_test_item) == (True, False)
    nbsp = ItemMeta("The\u00a0Usual Suspects", 1995, ["Crime"])  # a title stored with a no-break space
    raw = RawInteractions("tiny", "test", np.array(["1"] * 4), np.array(["2", "3", "1", "4"]), np.arange(4),
                          {**meta, "4": nbsp})
    row = audit_user_texts({"1": "Loved Usual Suspects."}, build_dataset(raw)).rows["1"]
    assert (row.names_valid_item, row.names_test_item) == (False, True)


# ---------------------------------------------------------------- image features


@pytest.fixture
def image_loads(monkeypatch) -> list:
    loads: list = []
    monkeypatch.setattr(visual, "load_image_encoder",
                        lambda *args, **kwargs: loads.append(args) or MeanColourEncoder())
    return loads


def image_config(smoke_config, folder, precision="fp32"):
    return smoke_config.override([f"features.image_folder={folder}", "features.image_model=ViT-S-32-alt",
                                  f"features.precision={precision}"])


def test_same_size_replaced_image_triggers_a_rebuild(smoke_config, synthetic, tmp_path, image_loads):
    # Pins: the image digest includes each file's mtime, not just its name and size.
    folder = tmp_path / "images"
    folder.mkdir()
    raw_id = str(synthetic.item_raw_ids[1])
    path = folder / f"{raw_id}.bmp"
    Image.new("RGB", (8, 8), (10, 200, 10)).save(path, format="BMP")
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    config = image_config(smoke_config, folder)
    first = build_image_features(config, synthetic, tmp_path / "run", progress=False)
    size = path.stat().st_size
    Image.new("RGB", (8, 8), (250, 10, 10)).save(path, format="BMP")  # same format and size, other pixels
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert path.stat().st_size == size
    second = build_image_features(config, synthetic, tmp_path / "run", progress=False)
    assert len(image_loads) == 2 and second["path"] != first["path"]
    np.testing.assert_allclose(np.load(f"{second['path']}/item_image.npy")[1],
                               semantic.normalise_rows(np.array([[250.0, 10.0, 10.0]]))[0], rtol=1e-5)


def test_bf16_and_fp32_image_sets_are_stored_apart(smoke_config, synthetic, tmp_path, image_loads):
    # Pins: precision is part of the image digest, so bf16 and fp32 encodings never share a stored set.
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / f"{synthetic.item_raw_ids[1]}.png")
    fp32 = build_image_features(image_config(smoke_config, folder, "fp32"), synthetic, tmp_path / "run",
                                progress=False)
    bf16 = build_image_features(image_config(smoke_config, folder, "bf16"), synthetic, tmp_path / "run",
                                progress=False)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert len(image_loads) == 2 and fp32["path"] != bf16["path"]
    assert json.loads((tmp_path / "cache" / "features" / synthetic.fingerprint / fp32["path"].split("/")[-1]
                       / "manifest.json").read_text())["precision"] == "fp32"  # not overwritten by the bf16 build


def png_with_a_broken_chunk() -> bytes:
    """A valid 8x8 PNG whose pixel data is split over two chunks, the second with a malformed chunk type:
    PIL opens it, then raises SyntaxError ("broken PNG file") on load."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (100, 100, 100)).save(buffer, format="PNG")
    data = buffer.getvalue()
    position = 8
    while data[position + 4:position + 8] != b"IDAT":
        position += 12 + struct.unpack(">I", data[position:position + 4])[0]
    length = struct.unpack(">I", data[position:position + 4])[0]
    pixels = data[position + 8:position + 8 + length]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return data[:position] + chunk(b"IDAT", pixels[:10]) + chunk(b"ID\x01T", pixels[10:]) + data[position + 12 + length:]


def test_png_with_a_broken_chunk_is_masked_not_a_crash(tmp_path):
    # Pins: PIL's SyntaxError (and ValueError) on load means "unreadable": the item is masked, the build goes on.
    broken, good = tmp_path / "1.png", tmp_path / "2.png"
    broken.write_bytes(png_with_a_broken_chunk())
    with Image.open(broken) as image, pytest.raises(SyntaxError):
        image.load()  # the file does fail the way the except clause must cover
    assert visual.read_image(broken) is None
    Image.new("RGB", (8, 8), (0, 0, 255)).save(good)
    encoding = visual.encode_item_images(MeanColourEncoder(), ["1", "2", "3"], {"1": broken, "2": good},
                                         batch_size=4, progress=False)
    assert encoding.mask.tolist() == [False, False, True, False]
    assert encoding.unreadable == ["1.png"] and encoding.missing == 1
    np.testing.assert_allclose(encoding.vectors[2], [0.0, 0.0, 1.0], atol=1e-6)


def test_first_image_file_by_name_wins_for_an_item(tmp_path):
    # Pins: with 5.jpg and 5.png for one item, find_images keeps the first by sorted name (5.jpg).
    for name in ("5.png", "5.jpg", "6.png", "6.bmp", "7.gif"):
        (tmp_path / name).write_bytes(b"x")
    found = visual.find_images(tmp_path, ["5", "6", "7", "8"])
    assert {raw_id: path.name for raw_id, path in found.items()} == {"5": "5.jpg", "6": "6.bmp", "7": "7.gif"}


# ---------------------------------------------------------------- run manifest


def test_run_manifest_drops_other_datasets_entries_on_a_fingerprint_change(tmp_path):
    # Pins: when the data fingerprint changes, the run manifest keeps nothing of the old dataset's entries.
    update_run_manifest(tmp_path, "data-a", "text", {"path": "/a/text"})
    update_run_manifest(tmp_path, "data-a", "image", {"path": "/a/image"})
    update_run_manifest(tmp_path, "data-a", "text", {"path": "/a/text2"})  # same data: other entries stay
    assert read_run_manifest(tmp_path) == {"fingerprint": "data-a", "text": {"path": "/a/text2"},
                                           "image": {"path": "/a/image"}}
    update_run_manifest(tmp_path, "data-b", "text", {"path": "/b/text"})
    assert read_run_manifest(tmp_path) == {"fingerprint": "data-b", "text": {"path": "/b/text"}}


# ---------------------------------------------------------------- quality


def test_lift_is_none_unless_the_random_mean_is_positive():
    # Pins: lift_pct = (within / random - 1) * 100 only for random > 0; None for zero or negative random means.
    assert lift(0.3, 0.2) == pytest.approx(50.0)
    assert lift(0.3, 0.0) is None
    assert lift(0.3, -0.1) is None and lift(-0.2, -0.1) is None


def test_genre_agreement_leaves_items_without_genres_out_of_the_average():
    # Pins: only covered items WITH (displayable) genres are anchors; 'unknown' counts as no genre.
    dataset = SimpleNamespace(item_meta=[None, *metas(("A", 1990, ["Drama"]), ("B", 1990, ["Drama"]),
                                                      ("C", 1990, ["Comedy"]), ("D", 1990, ["unknown"]))])
    vectors = np.array([[0, 0], [1, 0], [1, 0.1], [0, 1], [0.1, 1]], dtype=np.float64)
    mask = np.array([False, True, True, True, True])
    knn, random = genre_agreement(vectors, mask, dataset, k=1)
    # nearest neighbours: A<->B (share Drama), C->D (no share); D is no anchor
    assert knn == pytest.approx(2 / 3)
    # random: A shares with 1 of 3 others, B with 1 of 3, C with 0 of 3
    assert random == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
