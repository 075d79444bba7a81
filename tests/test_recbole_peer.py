"""The RecBole accuracy benchmark's plumbing, without RecBole: the split it hands RecBole is
UR4Rec's, and RecBole's scores come back to the right items in the right order."""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peer_recbole import in_ur4rec_order, recbole_ids, right_padded  # noqa: E402
from recbole_accuracy import SavedScores, write_histories, write_split  # noqa: E402

from ur4rec.evaluation import build_eval_inputs, evaluate, sample_negatives  # noqa: E402


def test_written_split_gives_recbole_our_leave_one_out(synthetic, tmp_path):
    """RecBole orders each user's lines by timestamp and holds out the last two ("LS", "TO"):
    replayed here, that must give UR4Rec's train parts, validation and test items."""
    path = write_split(synthetic, tmp_path)
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    by_user: dict[int, list[tuple[float, int]]] = {}
    for line in reversed(lines[1:]):  # file order must not matter: only the timestamps do
        user, item, stamp = line.split("\t")
        by_user.setdefault(int(user), []).append((float(stamp), int(item)))
    assert len(by_user) == synthetic.n_users
    for user, rows in by_user.items():
        stamps = [stamp for stamp, _ in rows]
        assert len(set(stamps)) == len(stamps), "tied timestamps would leave RecBole's order to chance"
        items = [item for _, item in sorted(rows)]
        assert items[:-2] == synthetic.train_sequence(user).tolist()
        assert items[-2] == synthetic.target("valid")[user]
        assert items[-1] == synthetic.target("test")[user]


def test_histories_hold_the_eval_inputs(synthetic, smoke_config, tmp_path):
    saved = np.load(write_histories(synthetic, smoke_config.data.max_len, tmp_path))
    negatives = sample_negatives(synthetic, 5, 0)
    for split in ("valid", "test"):
        inputs = build_eval_inputs(synthetic, split, smoke_config.data.max_len, negatives)
        assert np.array_equal(saved[f"{split}_input_ids"], inputs.input_ids.numpy())
        assert np.array_equal(saved[f"{split}_targets"], inputs.targets.numpy())
    assert int(saved["n_items"]) == synthetic.n_items


def test_recbole_ids_and_scores_round_trip():
    """RecBole numbers items in its own order; a score it gives its id j must come back as the
    score of the UR4Rec item whose token maps to j, and padding and unknown items rank last."""
    n_items = 6
    token_to_id = {"[PAD]": 0, "4": 1, "1": 2, "6": 3, "2": 4, "3": 5}  # item 5 never seen by RecBole
    lookup = recbole_ids(n_items, token_to_id)
    assert lookup.tolist() == [0, 2, 4, 5, 1, 0, 3]

    left = np.array([[0, 0, 4, 1, 6], [3, 2, 1, 6, 4], [0, 0, 0, 0, 2]])
    item_seq, lengths = right_padded(left, lookup)
    assert item_seq.tolist() == [[1, 2, 3, 0, 0], [5, 4, 2, 3, 1], [4, 0, 0, 0, 0]]
    assert lengths.tolist() == [3, 5, 1]

    recbole_scores = np.array([[9.0, 0.4, 0.2, 0.6, 0.3, 0.5]], dtype=np.float32)  # column = RecBole id
    ours = in_ur4rec_order(recbole_scores, lookup)
    lowest = np.finfo(np.float32).min
    assert np.array_equal(ours, np.array([[lowest, 0.2, 0.3, 0.5, 0.4, lowest, 0.6]], dtype=np.float32))


def test_saved_scores_are_ranked_like_a_model(synthetic, smoke_config):
    """SavedScores serves row u to user u; ranks from it equal a hand count over unseen items."""
    generator = np.random.default_rng(0)
    table = generator.standard_normal((synthetic.n_users, synthetic.n_items + 1)).astype(np.float32)
    negatives = sample_negatives(synthetic, 5, 0)
    inputs = build_eval_inputs(synthetic, "test", smoke_config.data.max_len, negatives)
    config = replace(smoke_config.eval, batch_size=7)  # several batches
    result = evaluate(SavedScores(table), inputs, config)
    for user in (0, 3, synthetic.n_users - 1):
        target = synthetic.target("test")[user]
        seen = set(synthetic.history(user, "test").tolist()) if config.exclude_seen else set()
        others = [i for i in range(1, synthetic.n_items + 1) if i != target and i not in seen]
        expected = 1 + sum(table[user, i] > table[user, target] for i in others)
        assert result.rank_full[user] == expected
    assert torch.equal(SavedScores(table).score_all(torch.tensor([2, 0]), torch.zeros(2, 3)),
                       torch.from_numpy(table[[2, 0]]))


def test_stage1_benchmark_reads_recbole_accuracy_of_the_same_data_only(tmp_path, capsys):
    from stage1_ml100k import recbole_accuracy

    seeds = [tmp_path / "a", tmp_path / "b", tmp_path / "missing"]
    assert recbole_accuracy(seeds, "abc") is None  # not measured: the quoted figure is used
    for folder, fingerprint, hr, ndcg in ((seeds[0], "abc", 0.2, 0.1), (seeds[1], "abc", 0.3, 0.2)):
        folder.mkdir()
        (folder / "data.json").write_text(f'{{"fingerprint": "{fingerprint}"}}')
        (folder / "metrics.json").write_text(f'{{"test": {{"full": {{"hr@10": {hr}, "ndcg@10": {ndcg}}}}}}}')
    assert recbole_accuracy(seeds, "abc") == (pytest.approx(0.25), pytest.approx(0.15), seeds[:2])  # the seeds' mean
    assert recbole_accuracy(seeds, "xyz") is None
    assert "another dataset" in capsys.readouterr().out
    (seeds[1] / "data.json").write_text('{"fingerprint": "xyz"}')  # another dataset's run is left out of the mean
    assert recbole_accuracy(seeds, "abc") == (0.2, 0.1, seeds[:1])
