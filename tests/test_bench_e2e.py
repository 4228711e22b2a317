"""dfa2_jax.benchmarking: the benchmark plans hit their kept-fraction targets on the full FLUX/SD3 shapes, the
Amdahl bound is right, and the random inputs are what the scripts rely on. Host-side numpy only for the plans (no
model is built, no sampler runs)."""

from __future__ import annotations

import numpy as np
import pytest

from dfa2_jax import FluxConfig, SD3Config, benchmarking as B
from dfa2_jax.plan import model_info_for
from dfa2_jax.plan.flops import plan_stats
from dfa2_jax.runtime import RuntimeSpec

SHAPES = {"flux-1024": (FluxConfig.dev(), 28), "flux-2048": (FluxConfig.dev(), 28),
          "flux-2048-50": (FluxConfig.dev(), 50), "sd3-1024": (SD3Config.medium(), 28)}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_plans_hit_targets(case):
    cfg, steps = SHAPES[case]
    c = B.CASES[case]
    assert (c.family, c.steps, c.config) == (cfg.family, steps, cfg)
    info = model_info_for(cfg)
    n_img = c.image_tokens
    specs = set()
    for removed in B.PLAN_REMOVED:
        plan, stats = B.synthetic_plan(info, steps, n_img, removed)
        plan.validate(info, n_img=n_img, cfg=cfg.family == "sd3")
        kept = plan_stats(plan, n_img, blocks=(128, 64))["attention_flops_kept"]
        assert kept == pytest.approx(stats["attention_flops_kept"], abs=1e-12)
        assert abs(kept - (1 - removed)) <= 0.01, (case, removed, kept)
        a = np.asarray(plan.assignment)
        assert (a[0] == 0).all()  # step 0 full
        counts = stats["method_counts"]
        assert all(counts[m] > 0 for m in B.PLAN_METHODS), counts  # a real mix
        cache = a == B.PLAN_METHODS.index("cache")
        assert cache[steps // 2 + 1:].mean() > cache[1:steps // 2 + 1].mean()  # caching grows along the steps
        codes = plan.to_arrays(n_img)[0]
        specs.add(RuntimeSpec.from_codes(codes, cfg=cfg.family == "sd3", impl="xla"))
    assert len(specs) == 1  # the three plans share one compiled sampler


def test_plan_is_deterministic_and_monotone():
    cfg, steps = SHAPES["sd3-1024"]
    info = model_info_for(cfg)
    p1, s1 = B.synthetic_plan(info, steps, 4096, 0.56)
    p2, _ = B.synthetic_plan(info, steps, 4096, 0.56)
    np.testing.assert_array_equal(p1.assignment, p2.assignment)
    p3, _ = B.synthetic_plan(info, steps, 4096, 0.56, seed=1)
    assert (np.asarray(p3.assignment) != np.asarray(p1.assignment)).any()
    u = np.random.default_rng(0).random((steps, 24, 24))
    prev = None
    for lam in np.linspace(0, B.LAMBDA_MAX, 21):  # every entry's method only moves to cheaper ones
        a = B.plan_assignment(u, lam)
        if prev is not None:
            assert (a >= prev).all()
        prev = a


def test_unreachable_target_raises():
    cfg, _ = SHAPES["sd3-1024"]
    with pytest.raises(ValueError, match="out of reach"):
        B.synthetic_plan(model_info_for(cfg), 3, 4096, 0.9)


def test_benchmark_plan_arrays():
    cfg = B.model_config("flux", tiny=True)
    pa, kept = B.benchmark_plan(cfg, text_len=16, steps=3, n_img=B.image_tokens(256), tiny=True)
    assert pa.codes.shape == (3, len(model_info_for(cfg)["layers"]), 4) and 0.2 < kept < 0.8


def test_amdahl_bound():
    assert B.amdahl_bound(0.0, 0.1) == pytest.approx(1.0)
    assert B.amdahl_bound(1.0, 0.25) == pytest.approx(4.0)
    assert B.amdahl_bound(0.5, 0.0) == pytest.approx(2.0)
    a, kept = 0.56, 0.32
    assert B.amdahl_bound(a, kept) == pytest.approx(1 / (0.44 + 0.56 * 0.32))


@pytest.mark.parametrize("family", B.FAMILIES)
def test_random_inputs_shapes_and_batch_prefix(family):
    cfg = B.model_config(family, tiny=True)
    t = B.text_tokens(family, tiny=True)
    one = B.random_inputs(cfg, res=128, batch=1, text_len=t)
    three = B.random_inputs(cfg, res=128, batch=3, text_len=t)
    double = 2 if family == "sd3" else 1  # SD3: [uncond; cond]
    assert three["prompt_embeds"].shape == (3 * double, t, cfg.joint_attention_dim)
    assert three["pooled_projections"].shape == (3 * double, cfg.pooled_projection_dim)
    assert three["latents"].shape == ((3, 64, cfg.in_channels) if family == "flux" else (3, cfg.in_channels, 16, 16))
    np.testing.assert_array_equal(three["latents"][:1], one["latents"])  # batch b = the first b rows
    np.testing.assert_array_equal(three["prompt_embeds"][0], one["prompt_embeds"][0])
    np.testing.assert_array_equal(three["prompt_embeds"][3 * (double - 1)], one["prompt_embeds"][double - 1])
    assert all(v.dtype == np.float32 for v in three.values())

    lat, cond = B.sampler_inputs(cfg, res=128, batch=2, text_len=t, dtype="bfloat16")
    assert lat.dtype == np.dtype("bfloat16") and cond["prompt_embeds"].shape[0] == 2 * double
    if family == "flux":
        cos, _ = cond["rope"]
        assert cos.shape[0] == t + 64 and cond["guidance"].shape == (2,)
        step = B.step_inputs(cfg, res=128, text_len=t)
        assert step["img_ids"].shape == (64, 3) and step["txt_ids"].shape == (t, 3)
    else:
        assert float(cond["guidance_scale"]) == B.GUIDANCE["sd3"]
        assert "guidance_scale" not in B.sampler_inputs(cfg, res=128, text_len=t, guidance=1.0)[1]


def test_tree_bytes_and_timing():
    import jax
    import jax.numpy as jnp

    tree = {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": None, "c": jax.ShapeDtypeStruct((4,), jnp.float32)}
    assert B.tree_bytes(tree) == 2 * 3 * 2 + 4 * 4
    times = B.time_calls(lambda x: x + 1, lambda i: (jnp.full((2,), i),), iters=3, warmup=1)
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_arrow_implementation_on_cpu():
    import jax

    q = jax.ShapeDtypeStruct((1, 80, 4, 16), "bfloat16")
    assert B.arrow_implementation("auto", q) == "xla"  # no GPU: the jnp reference
    assert B.arrow_implementation("xla", q) == "xla"
    assert B.arrow_implementation("interpret", q) == "triton (interpret)"
    assert B.arrow_implementation("mosaic_gpu", q) == "mosaic_gpu"  # named: taken as is
