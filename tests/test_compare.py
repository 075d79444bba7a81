import math

import numpy as np
import pytest

from ur4rec.cli import main
from ur4rec.evaluation.compare import compare, other_half_values, read_epoch_ranks


def write_stage(folder, valid_ranks, test_ranks, targets=("10", "11", "12")):
    folder.mkdir(parents=True)
    for split, ranks in (("valid", valid_ranks), ("test", test_ranks)):
        lines = ["user_id,target_item,rank_full,rank_sampled"]
        lines += [f"u{i},{target},{rank},1" for i, (target, rank) in enumerate(zip(targets, ranks))]
        (folder / f"{split}_ranks.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_compare_pairs_users_across_seeds(tmp_path):
    base = [write_stage(tmp_path / "a0", [1, 20, 3], [2, 2, 2]), write_stage(tmp_path / "a1", [1, 20, 1], [2, 2, 2])]
    variant = [write_stage(tmp_path / "b0", [3, 1, 3], [2, 2, 2]), write_stage(tmp_path / "b1", [1, 1, 3], [2, 2, 2])]
    rows = {(row["split"], row["metric"]): row for row in compare(base, variant, ("ndcg@10", "hr@3"))}
    valid = rows["valid", "ndcg@10"]  # per-user means: base 1, 0, 0.75; variant 0.75, 1, 0.5
    assert valid["base"] == pytest.approx(1.75 / 3) and valid["variant"] == pytest.approx(2.25 / 3)
    assert valid["difference"] == pytest.approx(0.5 / 3)
    assert valid["standard_error"] == pytest.approx(
        math.sqrt((2 * (0.25 + 0.5 / 3) ** 2 + (1 - 0.5 / 3) ** 2) / 2) / math.sqrt(3))
    assert rows["valid", "hr@3"]["difference"] == pytest.approx(1 / 3)  # hr@3 means: 1, 0, 1 vs 1, 1, 1
    assert rows["test", "ndcg@10"]["difference"] == 0.0 and rows["test", "ndcg@10"]["standard_error"] == 0.0


def test_compare_refuses_runs_on_other_users_or_targets(tmp_path):
    base = write_stage(tmp_path / "a", [1, 2, 3], [1, 2, 3])
    other = write_stage(tmp_path / "b", [1, 2, 3], [1, 2, 3], targets=("10", "11", "13"))
    with pytest.raises(ValueError, match="other users or targets"):
        compare([base], [other])


def test_compare_command_prints_the_table_and_names_a_missing_file(tmp_path, capsys):
    base = write_stage(tmp_path / "a", [1, 2, 30], [4, 5, 6])
    variant = write_stage(tmp_path / "b", [1, 1, 3], [4, 5, 60])
    assert main(["compare", "--base", str(base), "--variant", str(variant), "--metrics", "mrr"]) == 0
    out = capsys.readouterr().out
    difference = np.mean([0.0, 1 - 1 / 2, 1 / 3 - 1 / 30])
    assert f"{difference:+.4f}" in out.splitlines()[2]
    assert main(["compare", "--base", str(base), "--variant", str(base), "--metrics", "mrr"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]  # a run against itself: no spread, so no ratio (not nan)
    assert rows and all(row.split()[-2:] == ["0.0000", "-"] for row in rows if row.split()[0] in ("valid", "test"))
    (variant / "valid_ranks.csv").unlink()
    assert main(["compare", "--base", str(base), "--variant", str(variant)]) == 2
    assert "valid_ranks.csv does not exist (runs made before 2026-11-24 saved test ranks only" in capsys.readouterr().err
    # a folder with no ranks at all (a mistyped path, a stage that never finished) is not called an old run
    (tmp_path / "c").mkdir()
    for folder in (tmp_path / "c", tmp_path / "nowhere"):
        assert main(["compare", "--base", str(base), "--variant", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "valid_ranks.csv does not exist" in err and "before 2026-11-24" not in err
        assert "not the directory of a finished stage" in err


def write_epoch_ranks(folder, by_epoch, targets=("10", "11", "12")):
    """by_epoch: {epoch: [rank per user]}"""
    lines = ["user_id,target_item," + ",".join(f"epoch_{e}" for e in by_epoch)]
    lines += [f"u{i},{target}," + ",".join(str(ranks[i]) for ranks in by_epoch.values())
              for i, target in enumerate(targets)]
    (folder / "valid_ranks_by_epoch.csv").write_text("\n".join(lines) + "\n")


def test_other_half_values_score_each_user_at_the_epoch_the_others_chose():
    # users 0-8 all peak at epoch 0; user 9 hits only at epoch 1, and its own choice must not count
    ranks = np.array([[1] * 9 + [500], [50] * 9 + [1]])  # (epochs, users)
    values = other_half_values(ranks, "ndcg@10", halvings=20)
    assert values[:9] == pytest.approx(np.ones(9)) and values[9] == 0.0
    # runs whose 30 epochs are all the same model (ranks uniform on 1..20, 300 users): the best
    # epoch's own figure flatters them, the other half's choice does not (20 runs averaged)
    truth = sum(1 / np.log2(r + 1.0) for r in range(1, 11)) / 20  # expected NDCG@10
    rng = np.random.default_rng(0)
    best, honest = [], []
    for _ in range(20):
        noise = rng.integers(1, 21, size=(30, 300))
        best.append(np.where(noise <= 10, 1 / np.log2(noise + 1.0), 0.0).mean(axis=1).max())
        honest.append(other_half_values(noise, halvings=10).mean())
    assert np.mean(best) > truth + 0.02  # measured: +0.033
    assert abs(np.mean(honest) - truth) < 0.01  # measured: +0.001, standard error 0.003
    assert (other_half_values(ranks, "hr@1", halvings=20) == values).all()  # rank 1 either way


def test_compare_adds_the_other_half_rows_when_every_run_kept_its_epochs(tmp_path):
    base = write_stage(tmp_path / "a", [1, 2, 3], [1, 1, 1])
    variant = write_stage(tmp_path / "b", [1, 1, 1], [1, 1, 1])
    write_epoch_ranks(base, {1: [1, 2, 3], 2: [5, 5, 5]})
    assert {row["split"] for row in compare([base], [variant])} == {"valid", "test"}  # one side lacks them
    write_epoch_ranks(variant, {1: [1, 1, 1], 2: [9, 9, 9], 3: [4, 4, 4]})
    rows = {(row["split"], row["metric"]): row for row in compare([base], [variant], ("hr@1",))}
    # epoch 1 wins on any half of either run, so the other half's values are epoch 1's
    assert rows["valid-oh", "hr@1"]["base"] == pytest.approx(1 / 3)
    assert rows["valid-oh", "hr@1"]["difference"] == pytest.approx(2 / 3)
    assert read_epoch_ranks(variant)[1] == [1, 2, 3]
    (variant / "valid_ranks_by_epoch.csv").write_text("user_id,target_item,epoch_1\nu0,10,1\nu1,11,x\nu2,12,1\n")
    with pytest.raises(ValueError, match="line 3: a rank is not an integer"):
        compare([base], [variant])


def test_other_half_values_share_their_halvings_and_keep_the_earliest_of_equal_epochs(tmp_path):
    noisy = np.random.default_rng(0).integers(1, 21, size=(5, 40))
    assert np.array_equal(other_half_values(noisy), other_half_values(noisy))  # halvings fixed by the seed
    # ties on the selecting metric go to the earliest epoch, as early stopping keeps it
    tied = np.array([[2] * 6, [5] * 6])  # hr@10 is 1 at both epochs; ndcg@10 is higher at epoch 0
    assert other_half_values(tied, "ndcg@10", select_metric="hr@10") == pytest.approx(np.full(6, 1 / np.log2(3)))
    # random halves: users 0-1 peak at epoch 0, users 2-3 at epoch 1. User 0 is scored at the epoch
    # chosen by two of the other three users: {1, 2} or {1, 3} tie (epoch 0, NDCG 1), {2, 3} pick epoch 1
    values = other_half_values(np.array([[1, 1, 50, 50], [50, 50, 1, 1]]), halvings=300)
    assert values[:2] == pytest.approx([2 / 3, 2 / 3], abs=0.1) and (values[2:] == 0).all()
    # every run is scored on the same halvings: swapping runs between the sides changes nothing
    a, b = (write_stage(tmp_path / name, [1, 2, 3], [1, 1, 1]) for name in "ab")
    for folder, seed in ((a, 1), (b, 2)):
        ranks = np.random.default_rng(seed).integers(1, 21, size=(4, 3))
        write_epoch_ranks(folder, {epoch: ranks[epoch] for epoch in range(4)})
    rows = {row["split"]: row for row in compare([a, b], [b, a], ("ndcg@10",))}
    assert rows["valid-oh"]["difference"] == 0.0 and rows["valid-oh"]["standard_error"] == 0.0


def test_other_half_rows_pair_users_by_the_validation_targets(tmp_path):
    base = write_stage(tmp_path / "a", [1, 2, 3], [1, 1, 1])
    variant = write_stage(tmp_path / "b", [1, 1, 1], [1, 1, 1])
    for folder in (base, variant):  # test targets other than the validation ones
        (folder / "test_ranks.csv").write_text((folder / "test_ranks.csv").read_text().replace("u0,10,", "u0,20,"))
        write_epoch_ranks(folder, {1: [1, 2, 3], 2: [4, 4, 4]})
    assert "valid-oh" in {row["split"] for row in compare([base], [variant])}
    assert {row["split"] for row in compare([base], [variant], splits=("test",))} == {"test"}
    write_epoch_ranks(variant, {1: [1, 2, 3], 2: [4, 4, 4]}, targets=("10", "11", "13"))  # same length, one target off
    with pytest.raises(ValueError, match="valid_ranks_by_epoch.csv lists other users or targets"):
        compare([base], [variant])



def test_ranks_below_one_are_refused_naming_file_and_line(tmp_path):
    # ranks are 1-based: a rank of 0 would read as an infinite NDCG and MRR, a negative one as a
    # hit with NDCG -0
    base = write_stage(tmp_path / "a", [1, 2, 3], [1, 2, 3])
    for rank in (0, -1):
        variant = write_stage(tmp_path / f"b{rank}", [1, 2, 3], [1, rank, 3])
        with pytest.raises(ValueError, match=rf"b{rank}/test_ranks\.csv, line 3: rank_full {rank} is below 1"):
            compare([base], [variant])
    variant = write_stage(tmp_path / "c", [1, 2, 3], [1, 2, 3])
    write_epoch_ranks(base, {1: [1, 2, 3]})
    write_epoch_ranks(variant, {1: [1, 2, 3], 2: [1, 1, 0]})
    with pytest.raises(ValueError, match=r"valid_ranks_by_epoch\.csv, line 4: a rank is below 1"):
        compare([base], [variant])


def test_ids_holding_a_comma_survive_the_epoch_ranks_file(tmp_path):
    # valid_ranks.csv quotes a raw id with a comma (csv.writer); valid_ranks_by_epoch.csv must too,
    # or every comparison of such runs stops at "4 fields, the header has 3"
    from ur4rec.data.dataset import build_dataset
    from ur4rec.data.movielens import RawInteractions
    from ur4rec.rundir import EpochRanks, write_ranks

    raw = RawInteractions("t", "t", np.array(["a,b"] * 3 + ["c"] * 3), np.array(["1", "2", "3"] * 2),
                          np.array([1, 2, 3] * 2), {})
    dataset = build_dataset(raw)
    for name in "xy":
        (tmp_path / name).mkdir()
        for split in ("valid", "test"):
            write_ranks(tmp_path / name / f"{split}_ranks.csv", dataset, split, np.array([1, 2]), np.array([1, 1]))
        epochs = EpochRanks(tmp_path / name / "valid_ranks_by_epoch.csv", dataset)
        epochs.add(1, np.array([1, 2]))
        epochs.add(2, np.array([3, 1]))
    keys, epoch_list, ranks = read_epoch_ranks(tmp_path / "x")
    assert keys == ["a,b,2", "c,2"] and epoch_list == [1, 2] and ranks.tolist() == [[1, 2], [3, 1]]
    assert "valid-oh" in {row["split"] for row in compare([tmp_path / "x"], [tmp_path / "y"])}


def test_a_ranks_row_with_too_few_or_too_many_fields_is_refused_naming_file_and_line(tmp_path):
    # a short row read rank_full as None and stopped with a TypeError traceback; a long one was read
    # as if its extra field were not there
    base = write_stage(tmp_path / "a", [1, 2, 3], [1, 2, 3])
    for name, row in (("short", "u1,11"), ("long", "u1,11,2,1,7")):
        variant = write_stage(tmp_path / name, [1, 2, 3], [1, 2, 3])
        path = variant / "test_ranks.csv"
        path.write_text(path.read_text().replace("u1,11,2,1", row))
        fields = len(row.split(","))
        with pytest.raises(ValueError, match=rf"{name}/test_ranks\.csv, line 3: {fields} fields, the header has 4"):
            compare([base], [variant])


def test_compare_refuses_a_stage_that_never_finished(tmp_path, capsys):
    # a training run stopped before metrics.json (written last) may leave no ranks, only the validation
    # ranks, or a ranks file cut short; compare said "runs made before 2026-11-24 saved test ranks only"
    # even of a missing test_ranks.csv, or compared what was there
    base = write_stage(tmp_path / "a", [1, 2, 3], [1, 2, 3])
    stopped = write_stage(tmp_path / "b", [1, 2, 3], [1, 2, 3])
    (stopped / "checkpoint.json").write_text("{}")
    with pytest.raises(ValueError, match=r"b never finished \(no metrics\.json"):
        compare([base], [stopped])
    (stopped / "test_ranks.csv").unlink()
    assert main(["compare", "--base", str(base), "--variant", str(stopped)]) == 2
    err = capsys.readouterr().err
    assert "never finished" in err and "saved test ranks only" not in err
    (stopped / "metrics.json").write_text("{}")  # finished, but its test ranks are gone
    assert main(["compare", "--base", str(base), "--variant", str(stopped)]) == 2
    err = capsys.readouterr().err
    assert "test_ranks.csv does not exist" in err and "saved test ranks only" not in err


def test_runs_that_cannot_be_paired_are_refused_naming_the_first_line_that_differs(tmp_path):
    # a ranks file with a row removed or a target edited was only "other users or targets": no line to look at
    base = write_stage(tmp_path / "a", [1, 2, 3], [1, 2, 3])
    edited = write_stage(tmp_path / "b", [1, 2, 3], [1, 2, 3], targets=("10", "13", "12"))
    with pytest.raises(ValueError, match=r"b/valid_ranks\.csv lists other users or targets than .*a/valid_ranks\.csv "
                                         r"\(line 3: user_id,target_item u1,13 against u1,11\)"):
        compare([base], [edited])
    short = write_stage(tmp_path / "c", [1, 2, 3], [1, 2, 3])
    path = short / "test_ranks.csv"
    path.write_text(path.read_text().replace("u2,12,3,1\n", ""))
    with pytest.raises(ValueError, match=r"c/test_ranks\.csv .*a/test_ranks\.csv \(2 rows against 3, the first 2 alike\)"):
        compare([base], [short])


def test_a_ranks_file_that_does_not_read_as_text_is_refused_naming_it(tmp_path):
    # the error was only "'utf-8' codec can't decode byte 0xff", naming no file
    base = write_stage(tmp_path / "a", [1, 2, 3], [1, 2, 3])
    variant = write_stage(tmp_path / "b", [1, 2, 3], [1, 2, 3])
    write_epoch_ranks(base, {1: [1, 2, 3]})
    write_epoch_ranks(variant, {1: [1, 2, 3]})
    (variant / "valid_ranks_by_epoch.csv").write_bytes(b"user_id,target_item,epoch_1\nu0,\xff,1\n")
    with pytest.raises(ValueError, match=r"b/valid_ranks_by_epoch\.csv: the file does not read as text"):
        compare([base], [variant])
    (variant / "test_ranks.csv").write_bytes(b"\xff" * 10)
    with pytest.raises(ValueError, match=r"b/test_ranks\.csv: the file does not read as text"):
        compare([base], [variant])


def test_other_half_rows_choose_each_run_s_epoch_by_the_metric_the_run_chose_it_by(tmp_path):
    # valid-oh always chose by NDCG@10, also for runs that early-stopped on eval.select_metric hr@10
    import json

    targets = ("10", "11", "12", "13")
    base = write_stage(tmp_path / "a", [1, 2, 3, 4], [1, 1, 1, 1], targets)
    variant = write_stage(tmp_path / "b", [1, 2, 3, 4], [1, 1, 1, 1], targets)
    # epoch 1: ranks 1, 1, 30, 30; epoch 2: 5, 5, 5, 5. Users 0-1 hit at either epoch; users 2-3 at epoch 2
    # only, which any half holding one of them prefers by HR@10 but never by NDCG@10 (1 + 0 > 2 x 0.387)
    for folder in (base, variant):
        write_epoch_ranks(folder, {1: [1, 1, 30, 30], 2: [5, 5, 5, 5]}, targets)
    (variant / "checkpoint.json").write_text(json.dumps({"best": {"metric": "valid/full/hr@10", "value": 1.0}}))
    (variant / "metrics.json").write_text("{}")
    rows = {(row["split"], row["metric"]): row for row in compare([base], [variant], ("hr@10",))}
    assert rows["valid-oh", "hr@10"]["base"] == pytest.approx(0.5)  # users 2-3 always scored at epoch 1
    assert rows["valid-oh", "hr@10"]["variant"] > 0.7  # at epoch 2 whenever their half holds user 0 or 1
