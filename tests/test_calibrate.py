"""Calibration: the progressive pass + CP-SAT on tiny models (planted heads, δ sweep, determinism, resume)."""

from __future__ import annotations

import numpy as np
import pytest

from dfa2_jax.plan import flops
from dfa2_jax.plan.methods import parse_method
from dfa2_jax.calibrate.calibrate import CalibrationError, calibrate, layerwise_choice, savings_table

PROMPTS = ["a red circle at the top left", "a blue square in the centre"]


@pytest.fixture(scope="module")
def pipes(tiny_pipes):
    return tiny_pipes


@pytest.fixture
def flux_pipe(pipes):
    """The tiny FLUX pipeline for a test that plants heads in it: its weights are restored afterwards."""
    from flax import nnx

    state = pipes["flux"].transformer.state
    saved = nnx.to_pure_dict(state)
    yield pipes["flux"]
    nnx.replace_by_pure_dict(state, saved)


def _set_head(state, path_prefix, h, head_dim, kernel=None, bias=None):
    """Overwrite head h's columns of a projection (kernel [dim, H·D], bias [H·D]) in an nnx State."""
    from flax import nnx

    flat = dict(nnx.to_flat_state(state))
    sl = slice(h * head_dim, (h + 1) * head_dim)
    for leaf, val in (("kernel", kernel), ("bias", bias)):
        if val is None:
            continue
        var = flat[path_prefix + (leaf,)]
        arr = np.array(var[...])
        arr[..., sl] = val
        var[...] = arr


def _planted_flux(pipe, local_heads, *, constant_v=False):
    """Heads in ``local_heads``: q = k = a constant vector on the RoPE width axis (attention peaked at the
    same column: strictly local); other heads: q = k = 0 (uniform, global). ``constant_v``: every head's value
    is a constant (its output never changes between steps)."""
    from flax import nnx

    tr = pipe.transformer
    cfg = tr.config
    d = cfg.attention_head_dim
    c = np.zeros(d, np.float32)
    c[d - cfg.axes_dims_rope[-1]:] = 1.0  # only the width-axis rotary dims
    flat = dict(nnx.to_flat_state(tr.state))
    sites = sorted({p[:3] for p in flat if len(p) > 3 and p[2] == "attn"})
    for site in sites:
        for h in range(cfg.num_attention_heads):
            for proj in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                if site + (proj, "kernel") not in flat:
                    continue
                _set_head(tr.state, site + (proj,), h, d, kernel=0.0, bias=c if h in local_heads else 0.0)
            if constant_v:
                for proj in ("to_v", "add_v_proj"):
                    if site + (proj, "kernel") in flat:
                        _set_head(tr.state, site + (proj,), h, d, kernel=0.0, bias=0.3 + 0.1 * h)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            if site + (norm, "scale") in flat:
                flat[site + (norm, "scale")][...] = np.full(d, 30.0, np.float32)  # sharp softmax


def test_planted_local_heads_get_arrow_and_global_heads_full(flux_pipe):
    pipe = flux_pipe
    _planted_flux(pipe, local_heads={0, 2})
    # 1 row of 32 image tokens: the flattened image index is the column, the rotary axis we planted.
    res = calibrate(pipe, PROMPTS, resolution=(4, 128), steps=3, delta=0.4, candidates="arrow:2,arrow:4",
                    savings="exact", progress=False, max_sequence_length=8)
    a = res.plan.assignment[1:]  # [steps-1, layers, heads]; 0 = full, 1 = arrow:2, 2 = arrow:4
    assert (a[:, :, [0, 2]] == 2).all(), a  # the narrower band saves more and is exact for local heads
    assert (a[:, :, [1, 3]] == 0).all(), a


def test_static_outputs_get_cache(flux_pipe):
    pipe = flux_pipe
    _planted_flux(pipe, local_heads=set(), constant_v=True)
    res = calibrate(pipe, PROMPTS, resolution=(4, 128), steps=3, delta=0.05, candidates="arrow:4,cache",
                    savings="exact", progress=False, max_sequence_length=8)
    assert (res.plan.assignment[1:] == 2).all()  # cache everywhere after step 0
    assert res.summary["attention_flops_kept"] == pytest.approx(1 / 3)


def test_larger_delta_never_keeps_more(pipes):
    kept = []
    for delta in (0.01, 0.05, 0.2, 1.0, 4.0):
        res = calibrate(pipes["sd3"], PROMPTS, resolution=32, steps=4, delta=delta,
                        candidates="arrow:2,arrow:4,cache,cfg_share", savings="exact", progress=False,
                        max_sequence_length=8)
        kept.append(res.summary["attention_flops_kept"])
    assert all(b <= a + 1e-12 for a, b in zip(kept, kept[1:])), kept
    assert kept[0] > kept[-1]


def test_deterministic_and_resumable(pipes, tmp_path):
    kw = dict(resolution=32, steps=4, delta=0.3, candidates="arrow:2,cache,wars:2", savings="exact",
              progress=False, max_sequence_length=8)
    full = calibrate(pipes["flux"], PROMPTS, **kw)
    a = full.plan
    b = calibrate(pipes["flux"], PROMPTS, **kw).plan
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    ck = str(tmp_path / "calib.npz")
    partial = calibrate(pipes["flux"], PROMPTS, checkpoint=ck, stop_after=2, **kw)
    assert partial.plan is None
    assert np.isfinite(partial.rse[:2]).all() and np.isnan(partial.rse[2:]).all()
    res = calibrate(pipes["flux"], PROMPTS, checkpoint=ck, resume=True, **kw)
    np.testing.assert_array_equal(res.rse, full.rse)  # the steps before the stop come from the checkpoint
    resumed = res.plan
    resumed.save(tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == (tmp_path / "a.json").read_bytes()
    with pytest.raises(CalibrationError, match="other settings"):
        calibrate(pipes["flux"], PROMPTS, checkpoint=ck, resume=True, **{**kw, "delta": 0.31})


def test_plan_stats_match_flops(pipes):
    res = calibrate(pipes["sd3"], PROMPTS, resolution=32, steps=3, delta=0.5, candidates="arrow:2,cache",
                    savings="exact", progress=False, max_sequence_length=8)
    n_img = res.plan.calibration["image_tokens"]
    assert res.summary["attention_flops_kept"] == pytest.approx(
        flops.plan_stats(res.plan, n_img)["attention_flops_kept"])
    assert res.summary["solves"] == 2 * len(res.plan.model["layers"]) and res.summary["solver_time_s"] >= 0


def test_layerwise_choice():
    rse = np.array([[0.1, 0.3, 0.01], [0.2, 0.3, 0.02]])  # [H=2, M=3]: sums 0.3, 0.6, 0.03
    sav = np.array([0.5, 0.9, 0.2])
    assert layerwise_choice(rse, sav, 0.7).tolist() == [1, 1]  # the most-saving candidate that fits
    assert layerwise_choice(rse, sav, 0.5).tolist() == [0, 0]
    assert layerwise_choice(rse, sav, 0.05).tolist() == [2, 2]
    assert layerwise_choice(rse, sav, 0.01).tolist() == [-1, -1]  # none fits: full
    assert layerwise_choice(rse, np.array([0.0, 0.0, 0.0]), 1.0).tolist() == [-1, -1]  # no saving: full
    assert layerwise_choice(np.array([[np.nan, 0.1]]), np.array([0.9, 0.1]), 1.0).tolist() == [1]


def _check_choices(res, delta, pipe, *, layerwise):
    """The plan's choice at every (step >= 1, layer) against the recorded RSE table: within δ, and (layerwise)
    one method per layer, none more saving within δ."""
    plan, rse = res.plan, res.rse
    steps, layers, heads, m = rse.shape
    assert (steps, layers, heads) == np.asarray(plan.assignment).shape and m == len(plan.methods) - 1
    assert np.isfinite(rse).all() and (rse >= 0).all()
    info = plan.model
    sav = savings_table(tuple(parse_method(n) for n in plan.methods[1:]), info["layers"], plan.calibration["image_tokens"],
                        info["text_tokens"], pipe.transformer.config.family == "flux", savings="exact")
    a = np.asarray(plan.assignment)
    for t in range(1, steps):
        for layer in range(layers):
            ch = a[t, layer] - 1
            used = sum(rse[t, layer, h, c] for h, c in enumerate(ch) if c >= 0)
            assert used <= delta * (1 + 1e-6)
            if layerwise:
                assert len(set(ch.tolist())) == 1
                better = [c for c in range(m) if sav[layer][c] > (sav[layer][ch[0]] if ch[0] >= 0 else 0)]
                assert all(rse[t, layer, :, c].sum() > delta for c in better)


@pytest.mark.parametrize("strategy", ["headwise", "layerwise"])
def test_strategies_keep_within_delta(pipes, strategy):
    delta = 0.3
    res = calibrate(pipes["sd3"], PROMPTS, resolution=32, steps=4, delta=delta, candidates="arrow:2,cache,wars:2",
                    savings="exact", progress=False, max_sequence_length=8, strategy=strategy)
    _check_choices(res, delta, pipes["sd3"], layerwise=strategy == "layerwise")
    assert res.plan.calibration["solver"] == {"headwise": "cp-sat", "layerwise": "layerwise-greedy"}[strategy]
    assert res.plan.calibration["c"] == (1.5 if strategy == "headwise" else None)
    assert res.summary["attention_flops_kept"] < 1.0


def test_c_inf_drops_the_per_head_bound(pipes):
    """c = inf: no per-head pre-filter, so never less saving than c = 1 under the same δ."""
    kw = dict(resolution=32, steps=3, delta=0.2, candidates="arrow:2,cache", savings="exact", progress=False,
              max_sequence_length=8)
    tight = calibrate(pipes["sd3"], PROMPTS, c=1.0, **kw)
    free = calibrate(pipes["sd3"], PROMPTS, c=float("inf"), **kw)
    assert free.plan.calibration["c"] is None and tight.plan.calibration["c"] == 1.0
    assert free.summary["attention_flops_kept"] <= tight.summary["attention_flops_kept"] + 1e-12


@pytest.mark.parametrize("kwargs,match", [
    ({"delta": 0.0}, "delta=0.0 must be"),
    ({"delta": -1.0}, "delta=-1.0 must be"),
    ({"prompts": []}, "at least one prompt"),
    ({"candidates": "arrow:8,cfg_share"}, "cfg_share needs classifier-free guidance"),
    ({"resolution": 30}, "divisible by 4"),
    ({"candidates": "arrow:8,window:3"}, "unknown method 'window:3'"),
    ({"batch": 1}, "batch=1 < 2 prompts"),
    ({"c": float("nan")}, "c=nan must be a number > 0"),
    ({"strategy": "greedy"}, "strategy='greedy': expected one of headwise, layerwise"),
])
def test_bad_inputs(pipes, kwargs, match):
    kw = dict(prompts=PROMPTS, resolution=32, steps=3, delta=0.2, candidates="arrow:2,cache", progress=False,
              max_sequence_length=8)
    kw.update(kwargs)
    prompts = kw.pop("prompts")
    with pytest.raises(ValueError, match=match):
        calibrate(pipes["flux"], prompts, **kw)


def test_kernel_candidates_give_the_same_plan(flux_pipe):
    """The arrow candidates through the Pallas kernel (interpret mode here; the GPU default) give the plan
    the banded jnp form gives: planted local/global heads, so the RSEs are far from the decision bounds."""
    pipe = flux_pipe
    _planted_flux(pipe, local_heads={1})
    kw = dict(resolution=(4, 128), steps=3, delta=0.4, candidates="arrow:2,arrow:4", savings="exact",
              progress=False, max_sequence_length=8)
    ref = calibrate(pipe, PROMPTS, attention_impl="xla", **kw)
    ker = calibrate(pipe, PROMPTS, attention_impl="interpret", **kw)
    np.testing.assert_array_equal(ker.plan.assignment, ref.plan.assignment)
    assert (ref.plan.assignment[1:, :, 1] == 2).all()  # the planted head is arrow:4 either way
