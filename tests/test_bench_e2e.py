"""scripts/bench_e2e.py: the benchmark plans hit their kept-fraction targets on the full FLUX/SD3 shapes, and
the Amdahl bound is right. Host-side numpy only (no model is built, no sampler runs)."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

from dfa2_jax import FluxConfig, SD3Config
from dfa2_jax.plan.flops import plan_stats
from dfa2_jax.plan import model_info_for
from dfa2_jax.runtime import RuntimeSpec

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_e2e.py")
_spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
bench_e2e = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_e2e", bench_e2e)  # dataclasses look their module up there
_spec.loader.exec_module(bench_e2e)

SHAPES = {"flux-1024": (FluxConfig.dev(), 28), "flux-2048": (FluxConfig.dev(), 28),
          "flux-2048-50": (FluxConfig.dev(), 50), "sd3-1024": (SD3Config.medium(), 28)}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_plans_hit_targets(case):
    cfg, steps = SHAPES[case]
    c = bench_e2e.CASES[case]
    assert (c.family, c.steps) == (cfg.family, steps)
    info = model_info_for(cfg)
    n_img = bench_e2e.image_tokens(c)
    specs = set()
    for removed in bench_e2e.REMOVED:
        plan, stats = bench_e2e.build_plan(info, steps, n_img, removed)
        plan.validate(info, n_img=n_img, cfg=cfg.family == "sd3")
        kept = plan_stats(plan, n_img, blocks=(128, 64))["attention_flops_kept"]
        assert kept == pytest.approx(stats["attention_flops_kept"], abs=1e-12)
        assert abs(kept - (1 - removed)) <= 0.01, (case, removed, kept)
        a = np.asarray(plan.assignment)
        assert (a[0] == 0).all()  # step 0 full
        counts = stats["method_counts"]
        assert all(counts[m] > 0 for m in bench_e2e.METHODS), counts  # a real mix
        cache = a == bench_e2e.METHODS.index("cache")
        assert cache[steps // 2 + 1:].mean() > cache[1:steps // 2 + 1].mean()  # caching grows along the steps
        codes = plan.to_arrays(n_img)[0]
        specs.add(RuntimeSpec.from_codes(codes, cfg=cfg.family == "sd3", impl="reference"))
    assert len(specs) == 1  # the three plans share one compiled sampler


def test_plan_is_deterministic_and_monotone():
    cfg, steps = SHAPES["sd3-1024"]
    info = model_info_for(cfg)
    p1, s1 = bench_e2e.build_plan(info, steps, 4096, 0.56)
    p2, _ = bench_e2e.build_plan(info, steps, 4096, 0.56)
    np.testing.assert_array_equal(p1.assignment, p2.assignment)
    u = np.random.default_rng(0).random((steps, 24, 24))
    prev = None
    for lam in np.linspace(0, bench_e2e.LAMBDA_MAX, 21):  # every entry's method only moves to cheaper ones
        a = bench_e2e.plan_assignment(u, lam)
        if prev is not None:
            assert (a >= prev).all()
        prev = a


def test_unreachable_target_raises():
    cfg, _ = SHAPES["sd3-1024"]
    with pytest.raises(ValueError, match="out of reach"):
        bench_e2e.build_plan(model_info_for(cfg), 3, 4096, 0.9)


def test_amdahl_bound():
    assert bench_e2e.amdahl_bound(0.0, 0.1) == pytest.approx(1.0)
    assert bench_e2e.amdahl_bound(1.0, 0.25) == pytest.approx(4.0)
    assert bench_e2e.amdahl_bound(0.5, 0.0) == pytest.approx(2.0)
    a, kept = 0.56, 0.32
    assert bench_e2e.amdahl_bound(a, kept) == pytest.approx(1 / (0.44 + 0.56 * 0.32))
