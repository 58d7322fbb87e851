"""benchmarks/ablations.py's record of finished runs: a run's metrics are copied to the results folder once, a
recorded run counts as finished without its folder, and the folder's own metrics win over the record."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "ablations.py"


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_finished_run_is_recorded_and_read_back(ablations, tmp_path):
    results, run = tmp_path / "results", tmp_path / "runs" / "full_s1"
    metrics_path = run / "eval" / "metrics.json"
    assert ablations.recorded(results, "full_s1", metrics_path) is None  # neither the run nor a record
    metrics_path.parent.mkdir(parents=True)
    metrics_path.write_text(json.dumps({"total": 0.9, "dimensions": {"sharpness": 0.5}}))
    (metrics_path.parent / "train_seconds.json").write_text(json.dumps({"seconds": 12.5}))
    assert ablations.recorded(results, "full_s1", metrics_path) == ({"total": 0.9, "dimensions": {"sharpness": 0.5}},
                                                                      12.5)
    record = json.loads((results / "full_s1.json").read_text())
    assert record == {"metrics": {"total": 0.9, "dimensions": {"sharpness": 0.5}}, "train_seconds": 12.5}
    # another machine: no run folder, the committed record alone
    assert ablations.recorded(results, "full_s1", tmp_path / "elsewhere" / "metrics.json") == (record["metrics"], 12.5)
    # the record is written once; the run's folder stays what is read when it exists
    metrics_path.write_text(json.dumps({"total": 0.8, "dimensions": {}}))
    assert ablations.recorded(results, "full_s1", metrics_path)[0]["total"] == 0.8
    assert json.loads((results / "full_s1.json").read_text())["metrics"]["total"] == 0.9
    assert not list(results.glob("*.tmp"))


def test_a_claim_reports_pooled_and_paired_differences(ablations):
    """Two variants whose seeds move together: a small difference against the seeds' spread (pooled), but the same
    sign on every seed (paired)."""
    better = {0: 0.80, 1: 0.90, 2: 0.85}
    worse = {0: 0.79, 1: 0.89, 2: 0.83, 3: 0.70}  # seed 3 only in one variant: not paired
    line = ablations.claim_line("a", "b", "total", better, worse)
    mean_a, mean_b = 0.85, (0.79 + 0.89 + 0.83 + 0.70) / 4
    assert f"{mean_a:.4f} vs {mean_b:.4f}" in line and "holds (within 2 sd)" in line
    diffs = [0.01, 0.01, 0.02]
    mean_d = sum(diffs) / 3
    sd_d = (sum((d - mean_d) ** 2 for d in diffs) / 2) ** 0.5
    assert f"paired over 3 seeds {mean_d:+.4f} ± {sd_d:.4f} ({mean_d / sd_d:+.1f} sd)" in line


def test_a_claim_on_a_lower_is_better_column_reads_lower_as_better(ablations):
    """Fréchet distance: "a beats b" means a's is lower; the improvement is b − a, positive when it holds."""
    better, worse = {0: 20.0, 1: 22.0, 2: 21.0}, {0: 30.0, 1: 31.0, 2: 29.0}
    line = ablations.claim_line("ccd_da", "da_only", "fvd", better, worse)
    assert "ccd_da < da_only on fvd" in line and "improvement +9.0000" in line and "holds (> 2 sd)" in line
    assert "paired over 3 seeds +9.0000" in line
    flipped = ablations.claim_line("da_only", "ccd_da", "fvd", worse, better)
    assert "improvement -9.0000" in flipped and "does not hold" in flipped
    assert "ccd_da > da_only on total" in ablations.claim_line("ccd_da", "da_only", "total", {0: .9, 1: .8},
                                                                 {0: .7, 1: .6})


def test_swiftvideo_variants_and_claims_name_known_variants(ablations):
    known = ablations.variants("swiftvideo")
    defaults = ablations.DEFAULTS["swiftvideo"].split(",")
    assert set(defaults) <= set(known)
    assert {n for n in known if n not in defaults} == {"ccd_da_tf", "t_uniform_tf", "ccd_da_tf_2step",
                                                       "t_uniform_tf_2step"}  # run with --variants
    for a, b, _ in ablations.CLAIMS["swiftvideo"]:
        assert a in known and b in known
    order = list(known)  # the file's order; the defaults keep it
    assert [n for n in order if n in defaults] == defaults
    for name, overlay in known.items():
        if "eval_of" in overlay:  # evaluates another variant's student at another step count, trains nothing
            assert set(overlay) == {"eval_of", "steps"}
            assert overlay["steps"] == (2 if name.endswith("_2step") else 4)
        needs = overlay.get("eval_of", overlay.get("ta_of"))
        if needs is not None:  # listed after the run it needs (a single job runs them in this order)
            assert needs in known and order.index(needs) < order.index(name)
        if "ta_of" in overlay:  # trajectory alignment: (preferred, dispreferred) pairs of that student
            preferred, dispreferred = overlay["pairs"]
            assert preferred == "real" or preferred > dispreferred


def test_win_diff_is_the_mean_of_the_last_logged_values_and_blank_elsewhere(ablations, tmp_path):
    rows = [{"step": s, "metric/student/dpo/win_diff": float(s)} for s in range(1, 61)] + [{"step": 61}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert ablations.win_diff(tmp_path) == pytest.approx(sum(range(11, 61)) / 50)  # the last 50 of 60
    plain = {"steps": 4, "total": 0.8, "dimensions": {"sharpness": 0.6}}
    assert ablations.row("ccd_da", plain, None).endswith("|  |  |")  # no Win Diff: a blank cell
    assert "| 0.25 |" in ablations.row("ta", {**plain, "win_diff": 0.25}, None)
