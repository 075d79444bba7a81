"""The benchmark scripts on the smoke config: each runs to the end, and the figures it prints
are the ones its runs saved (so every benchmark figure can be recomputed from a run directory)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def bench(script: str, *args) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def metrics(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "metrics.json").read_text())


def table_row(out: str, name: str) -> list[float]:
    """Means of the last printed markdown table's row ``name`` (``mean ± std`` cells)."""
    rows = [line for line in out.splitlines() if line.startswith(f"| {name} |")]
    assert rows, f"no row {name!r} in:\n{out}"
    return [float(cell.split("±")[0]) for cell in rows[-1].strip("|").split("|")[1:]]


@pytest.mark.slow
def test_stage1_benchmark_prints_what_its_run_saved(tmp_path):
    out = bench("stage1_ml100k.py", "--config", SMOKE, "--settings", "base", "--seeds", "3",
                "--threads", "1", "--out", tmp_path)
    line = re.search(r"\[base, seed 3\] .*valid ndcg@10 ([\d.]+) .*test hr@10 ([\d.]+) ndcg@10 ([\d.]+)", out)
    assert line, out
    saved = metrics(tmp_path / "base_seed3" / "stage1")
    assert float(line[1]) == pytest.approx(saved["valid"]["full"]["ndcg@10"], abs=5e-5)
    assert float(line[2]) == pytest.approx(saved["test"]["full"]["hr@10"], abs=5e-5)
    assert float(line[3]) == pytest.approx(saved["test"]["full"]["ndcg@10"], abs=5e-5)
    assert "RecBole" not in out.split("means over seeds")[1]  # peers are compared on ML-100K only


@pytest.mark.slow
def test_stages_benchmark_and_the_scripts_that_read_its_runs(tmp_path):
    out = bench("stages_ml100k.py", "--config", SMOKE, "--seeds", "0", "--only", "full",
                "--threads", "1", "--out", tmp_path)
    run = tmp_path / "seed0"
    stage1, stage3 = metrics(run / "stage1"), metrics(run / "ablations" / "full" / "stage3")
    for name, saved in [("stage 1 (SASRec)", stage1), ("stage 3 (UR4Rec)", stage3)]:
        hr, ndcg, s_hr, s_ndcg, valid = table_row(out, name)
        assert hr == pytest.approx(saved["test"]["full"]["hr@10"], abs=5e-5)
        assert ndcg == pytest.approx(saved["test"]["full"]["ndcg@10"], abs=5e-5)
        assert s_hr == pytest.approx(saved["test"]["sampled"]["hr@10"], abs=5e-5)
        assert s_ndcg == pytest.approx(saved["test"]["sampled"]["ndcg@10"], abs=5e-5)
        assert valid == pytest.approx(saved["valid"]["full"]["ndcg@10"], abs=5e-5)
    ratio = float(re.findall(r"Stage 3 / Stage 1 test NDCG@10 \(full\): ([\d.]+)", out)[-1])
    assert ratio == pytest.approx(stage3["test"]["full"]["ndcg@10"] / stage1["test"]["full"]["ndcg@10"], abs=5e-4)

    # An ensemble of one model is that model.
    ensemble = bench("seed_ensemble.py", run / "stage1", "--sizes", "1")
    valid_ndcg, valid_hr, test_ndcg, test_hr = table_row(ensemble, "1")[1:]
    assert valid_ndcg == pytest.approx(stage1["valid"]["full"]["ndcg@10"], abs=5e-5)
    assert valid_hr == pytest.approx(stage1["valid"]["full"]["hr@10"], abs=5e-5)
    assert test_ndcg == pytest.approx(stage1["test"]["full"]["ndcg@10"], abs=5e-5)
    assert test_hr == pytest.approx(stage1["test"]["full"]["hr@10"], abs=5e-5)

    # With the weights the stage fitted, the checkpoint reads the validation figure it saved.
    flattery = bench("similarity_flattery.py", run / "ablations" / "full" / "stage3", "--halvings", "3")
    row = next(line for line in flattery.splitlines() if line.startswith(f"| {run}"))
    with_terms = float(row.strip("|").split("|")[3])
    assert with_terms == pytest.approx(stage3["valid"]["full"]["ndcg@10"], abs=5e-5)


@pytest.mark.parametrize("script, option, names", [
    ("stage1_ml100k.py", "--settings", "base,bogus"),  # a KeyError once base had trained
    ("stages_ml100k.py", "--only", "full,bogus"),  # refused by the ablations once Stage 1 had trained
])
def test_an_unknown_setting_or_variant_is_refused_before_anything_trains(tmp_path, script, option, names):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--config", SMOKE, option, names,
                           "--seeds", "0", "--threads", "1", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "'bogus'" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing trained, no run directory
