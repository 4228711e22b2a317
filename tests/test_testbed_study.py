"""scripts/testbed_study.py: its statistics on known data, and every study end to end on the 64-token testbed at
tiny sizes (the figures of docs/TESTBED.md come from the same code at full size)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "testbed_study.py")


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("testbed_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_statistics(study):
    np.testing.assert_array_equal(study.ranks([3.0, 1.0, 2.0, 2.0]), [4.0, 1.0, 2.5, 2.5])
    x = np.arange(10.0)
    assert study.spearman(x, x ** 3) == pytest.approx(1.0)
    assert study.spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(study.spearman(x, np.ones(10)))
    rng = np.random.default_rng(0)
    y = x + rng.normal(0, 3, 10)
    rho, lo, hi = study.spearman_ci(x, y, n_boot=500)
    assert lo <= rho <= hi and -1 <= lo < hi <= 1 and rho == pytest.approx(study.spearman(x, y))
    pts = [(0.5, 10.0), (0.0, 0.0), (1.0, 30.0)]
    assert study.interpolate(pts, 0.25) == pytest.approx(5.0)
    assert study.interpolate(pts, 0.75) == pytest.approx(20.0)
    assert study.interpolate(pts, 0.0) == 0.0 and math.isnan(study.interpolate(pts, 1.5))
    prof = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.1], [3.0, 2.0, 1.0]])
    r = np.corrcoef(prof)
    assert study.mean_pairwise_r(prof) == pytest.approx((r[0, 1] + r[0, 2] + r[1, 2]) / 3)


def test_bad_arguments(study, capsys):
    for argv, msg in ((["--studies", "delta,speed"], "--studies 'delta,speed'"),
                      (["--deltas", "0.1,-1"], "every value must be > 0"),
                      (["--c-values", "x"], "comma-separated numbers"),
                      (["--perturbations", "0"], "--perturbations must be >= 1")):
        with pytest.raises(SystemExit):
            study.parse_args(["--out", "/nonexistent"] + argv)
        assert msg in capsys.readouterr().err


def test_every_study_end_to_end(study, tmp_path):
    from dfa2_jax.plan import Plan

    out = tmp_path / "st"
    assert study.main(["--model", "testbed-sd3", "--out", str(out), "--steps", "3", "--eval-prompts", "2",
                       "--calibration-prompts", "2", "--deltas", "0.05,2", "--v1-deltas", "2", "--c-values",
                       "1.5,inf", "--perturbations", "2", "--locality-prompts", "2", "--locality-steps", "1",
                       "--candidates", "arrow:2,arrow:4,cache"]) == 0
    res = json.loads((out / "study.json").read_text())
    assert res["image_tokens"] == 64 and res["steps"] == 3 and res["evaluation_captions"] == 2
    rows = res["delta"]["rows"]
    assert [r["delta"] for r in rows] == [0.05, 2.0]
    assert rows[1]["tiles_removed"] >= rows[0]["tiles_removed"] and rows[1]["exact_removed"] > 0
    for r in rows:
        assert 0 <= r["exact_removed"] <= 1 and 0 <= r["prompt_accuracy"] <= 1
        assert sum(r["method_mix"]["overall"].values()) == pytest.approx(1.0)
    c = res["c"]["rows"]
    assert res["c"]["delta"] in (0.05, 2.0) and [r["c"] for r in c] == [1.5, "inf"]
    assert c[0]["plan"] == f"v2_delta_{res['c']['delta']:g}"  # c = 1.5 is the sweep's own plan
    assert c[1]["exact_removed"] >= c[0]["exact_removed"]  # no per-head bound: never less removed
    rse = res["rse"]
    assert len(rse["rows"]) == 2 and rse["rse_table_shape"] == [3, 6, 4, 3]
    assert all(r["rse_mean"] > 0 for r in rse["rows"])
    assert -1 <= rse["spearman_psnr"]["rho"] <= 1 or math.isnan(rse["spearman_psnr"]["rho"])
    loc = res["locality"]
    assert len(loc["rows"]) == 6 * 4 and loc["summary"]["bands"] == {"arrow:2": 16, "arrow:4": 8}
    for r in loc["rows"]:
        assert 0 < r["arrow:4_share"] <= r["arrow:2_share"] <= 1 + 1e-6  # the wider band holds more mass
        assert 0 <= r["img_to_text_share"] <= 1 + 1e-6
    cmp = res["compare"]
    assert cmp["layer_cache"]["exact_removed"] == pytest.approx(1 / 3)  # step 1 of 0, 1, 2 reuses every head
    v1 = Plan.load(str(out / "plans" / "v1_delta_2.json"))
    a = np.asarray(v1.assignment)
    assert (a == a[:, :, :1]).all()  # V1: one method for every head of a layer-step
    assert set(v1.methods) == {"full", "wars:8", "cache", "cfg_share"}
    for png in ("delta.png", "delta_mix.png", "rse.png", "c.png", "locality.png", "compare.png"):
        assert (out / png).stat().st_size > 1000
    assert "## V2 vs V1 vs layer caching" in (out / "study.md").read_text()
