import math

import numpy as np
import pytest

from ur4rec.cli import main
from ur4rec.evaluation.compare import compare


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
    (variant / "valid_ranks.csv").unlink()
    assert main(["compare", "--base", str(base), "--variant", str(variant)]) == 2
    assert "valid_ranks.csv does not exist" in capsys.readouterr().err
