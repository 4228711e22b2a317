"""The arrow-attention Pallas kernel in interpret mode (CPU) against its pure-jnp reference.

Interpret mode starts every output buffer as NaN (jax's uninitialized_value), so "no NaN in the output and equal
to the reference" also checks that every output element is written. Tiny tiles (16×16) and head_dim 16 keep
each case to about a second.
"""

from __future__ import annotations

import functools
import json

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from pallas_kernels import TritonConfig, arrow_attention, arrow_attention_reference
from pallas_kernels.triton import heuristic_config

TINY = TritonConfig(block_q=16, block_k=16, num_warps=4, num_stages=1)
ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}  # max |kernel − reference|
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _inputs(seed, b, s, h, d, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return tuple(jax.random.normal(x, (b, s, h, d), jnp.float32).astype(dtype) for x in ks)


def _check(q, k, v, c, hw, text_len, text_first, dtype, config=TINY):
    hw = jnp.asarray(hw, jnp.int32)
    out = arrow_attention(q, k, v, hw, text_len=text_len, text_first=text_first, cache=c, interpret=True,
                          config=config)
    ref = arrow_attention_reference(q, k, v, hw, text_len=text_len, text_first=text_first, cache=c)
    assert out.shape == q.shape and out.dtype == q.dtype
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out32).all(), "unwritten (NaN-poisoned) or non-finite output elements"
    np.testing.assert_allclose(out32, ref32, atol=ATOL[dtype], rtol=RTOL[dtype],
                               err_msg=f"{hw=} {text_len=} {text_first=} shape={q.shape}")
    return out


@st.composite
def _case(draw):
    """One compiled shape (S, text layout, heads, batch, cache or not: all static for the kernel) and several
    draws of what is runtime data for it (the heads' half-windows and the inputs), so each compile is checked
    against the reference more than once."""
    s = draw(st.integers(10, 120))
    text_len = draw(st.sampled_from([0, 1, min(5, s - 1), min(16, s - 1), min(40, s - 1)]))
    h = draw(st.integers(1, 3))
    n_img = s - text_len
    windows = st.lists(st.sampled_from([-1, 0, 1, 2, 7, 15, 24, 40, n_img, n_img + 5]), min_size=h, max_size=h)
    runs = draw(st.lists(st.tuples(windows, st.integers(0, 99)), min_size=3, max_size=3))
    return dict(s=s, text_len=text_len, h=h, runs=runs, b=draw(st.integers(1, 2)), text_first=draw(st.booleans()),
                use_cache=draw(st.booleans()))


@pytest.mark.parametrize("dtype,examples", [(jnp.float32, 5), (jnp.bfloat16, 4), (jnp.float16, 2)])
def test_kernel_matches_reference(dtype, examples):
    @settings(max_examples=examples, **SETTINGS)
    @given(_case())
    def run(c):
        for hw, seed in c["runs"]:
            q, k, v, cache = _inputs(seed, c["b"], c["s"], c["h"], 16, dtype)
            _check(q, k, v, cache if c["use_cache"] else None, hw, c["text_len"], c["text_first"], dtype)

    run()


@pytest.mark.parametrize("text_first", [True, False])
def test_mixed_heads_fixed(text_first):
    """Every head kind in one launch, S not a multiple of either tile, text spanning several blocks."""
    q, k, v, cache = _inputs(1, 2, 77, 5, 16, jnp.float32)
    out = _check(q, k, v, cache, [-1, 0, 1, 9, 200], 21, text_first, jnp.float32,
                 config=TritonConfig(block_q=32, block_k=16))
    np.testing.assert_array_equal(np.asarray(out[:, :, 1]), np.asarray(cache[:, :, 1]))  # cached head copied


def test_zero_window_without_cache_is_width_zero_band():
    q, k, v, _ = _inputs(2, 1, 40, 2, 16, jnp.float32)
    _check(q, k, v, None, [0, 0], 7, True, jnp.float32)


def test_deterministic():
    q, k, v, cache = _inputs(3, 1, 50, 2, 16, jnp.bfloat16)
    hw = jnp.asarray([3, -1], jnp.int32)
    run = lambda: np.asarray(arrow_attention(q, k, v, hw, text_len=6, text_first=False, cache=cache,
                                             interpret=True, config=TINY))
    np.testing.assert_array_equal(run(), run())


def _visits(qb, kb, *, s, text_len, text_first, w, bq, bk):
    """Does query block qb visit key block kb (the rule of flops.arrow_tiles)?"""
    n_img = s - text_len
    off = text_len if text_first else 0
    t_lo, t_hi = (0, text_len) if text_first else (n_img, s)
    q0, q1 = qb * bq, (qb + 1) * bq - 1
    if w < 0 or (text_len and q0 < t_hi and q1 >= t_lo):
        return True
    if text_len and kb * bk < t_hi and (kb + 1) * bk > t_lo:
        return True
    a0, a1 = q0 - off, min(q1 - off, n_img - 1)
    lo, hi = max(a0 - w, 0) + off, min(a1 + w, n_img - 1) + off
    return lo // bk <= kb <= hi // bk


@pytest.mark.parametrize("text_first", [True, False])
def test_out_of_band_blocks_are_never_loaded(text_first):
    """Poison one image key block with NaN: a query block that visits it gets NaN (0·NaN in P·V), one that
    skips it stays finite and exact. The NaN rows are exactly the visiting blocks."""
    s, t, w, bq, bk = 96, 16, 3, 16, 16
    q, k, v, _ = _inputs(4, 1, s, 1, 16, jnp.float32)
    hw = jnp.asarray([w], jnp.int32)
    kb = 2 if text_first else 1  # an image key block away from the text
    kp = k.at[:, kb * bk:(kb + 1) * bk].set(jnp.nan)
    vp = v.at[:, kb * bk:(kb + 1) * bk].set(jnp.nan)
    out = np.asarray(arrow_attention(q, kp, vp, hw, text_len=t, text_first=text_first, interpret=True,
                                     config=TritonConfig(block_q=bq, block_k=bk)))
    ref = np.asarray(arrow_attention_reference(q, k, v, hw, text_len=t, text_first=text_first))
    skipped = 0
    for qb in range(s // bq):
        rows = slice(qb * bq, (qb + 1) * bq)
        if _visits(qb, kb, s=s, text_len=t, text_first=text_first, w=w, bq=bq, bk=bk):
            assert np.isnan(out[:, rows]).any(), f"query block {qb} should have visited key block {kb}"
        else:
            skipped += 1
            np.testing.assert_allclose(out[:, rows], ref[:, rows], atol=1e-5, rtol=1e-5)
    assert skipped >= 2


def test_heuristic_config():
    assert heuristic_config(16896, 128, jnp.bfloat16) == TritonConfig(128, 64, 8, 3)
    assert heuristic_config(4429, 64, jnp.bfloat16).block_q == 128
    assert heuristic_config(20, 16, jnp.float32) == TritonConfig(32, 32, 4, 3)


def test_validation_errors():
    q, k, v, cache = _inputs(5, 1, 20, 2, 16, jnp.float32)
    hw = jnp.asarray([1, -1], jnp.int32)
    kw = dict(text_len=4, text_first=True, interpret=True, config=TINY)
    with pytest.raises(ValueError, match="same shape"):
        arrow_attention(q, k[:, :10], v, hw, **kw)
    with pytest.raises(ValueError, match="share a dtype"):
        arrow_attention(q, k.astype(jnp.bfloat16), v, hw, **kw)
    with pytest.raises(ValueError, match=r"half_window must be int32 \[H=2\]"):
        arrow_attention(q, k, v, jnp.asarray([1, 2, 3], jnp.int32), **kw)
    with pytest.raises(ValueError, match="half_window must be int32"):
        arrow_attention(q, k, v, hw.astype(jnp.float32), **kw)
    with pytest.raises(ValueError, match="text_len"):
        arrow_attention(q, k, v, hw, **{**kw, "text_len": 20})
    with pytest.raises(ValueError, match="text_len"):
        arrow_attention(q, k, v, hw, **{**kw, "text_len": -1})
    with pytest.raises(ValueError, match="cache must be"):
        arrow_attention(q, k, v, hw, cache=cache[:, :, :1], **kw)
    with pytest.raises(ValueError, match=r"cache must be \[B, S', H, D\] = \[1, S' >= 20, 2, 16\]"):
        arrow_attention(q, k, v, hw, cache=cache[:, :19], **kw)
    with pytest.raises(ValueError, match="head_dim"):
        q24 = q[..., :12]
        arrow_attention(q24, q24, q24, hw, **kw)
    with pytest.raises(ValueError, match="dtype"):
        qi = q.astype(jnp.int32)
        arrow_attention(qi, qi, qi, hw, **kw)
    with pytest.raises(ValueError, match="power of two"):
        TritonConfig(block_q=48)


@pytest.mark.parametrize("text_first,text_len", [(True, 21), (False, 21), (True, 32), (False, 0)])
def test_interior_blocks_unmasked(text_first, text_len):
    """Windows around the tile size: key blocks wholly inside the band run the unmasked body, the band's edge
    blocks and the text/image boundary the masked one; both must agree with the reference."""
    q, k, v, cache = _inputs(3, 1, 150, 6, 16, jnp.float32)
    _check(q, k, v, cache, [15, 16, 17, 31, 47, 64], text_len, text_first, jnp.float32)
    _check(q, k, v, None, [15, 32, -1, 100, 1, 33], text_len, text_first, jnp.float32,
           config=TritonConfig(block_q=32, block_k=16))


def test_autotune_caches_choice(tmp_path, monkeypatch):
    from pallas_kernels import tuning as A

    monkeypatch.setenv("DFA2_ARROW_TUNE_CACHE", str(tmp_path / "tune.json"))
    q, k, v, cache = _inputs(4, 1, 40, 2, 16, jnp.float32)
    hw = jnp.asarray([3, -1], jnp.int32)
    kw = dict(text_len=5, text_first=True)
    assert A.tuned_config(q.shape, q.dtype, **kw) is None
    cands = (TritonConfig(16, 16, 4, 1), TritonConfig(32, 16, 4, 1))
    logs = []
    best = A.autotune(q, k, v, hw, candidates=cands, iters=1, interpret=True, log=logs.append, **kw)
    assert best in cands and len(logs) == 2
    entry = json.loads((tmp_path / "tune.json").read_text())[A.tune_key(q.shape, q.dtype, **kw)]
    assert TritonConfig(entry["block_q"], entry["block_k"], entry["num_warps"], entry["num_stages"]) == best
    assert A.tuned_config(q.shape, q.dtype, **kw) == best
    assert A.tuned_config(q.shape, q.dtype, text_len=6, text_first=True) is None  # other layout: no entry
    logs.clear()  # a second call is answered from the cache, nothing is timed
    assert A.autotune(q, k, v, hw, candidates=cands, iters=1, interpret=True, log=logs.append, **kw) == best
    assert logs == []
    (tmp_path / "tune.json").write_text("{not json")  # a corrupt cache is ignored, not fatal
    assert A.tuned_config(q.shape, q.dtype, **kw) is None


@pytest.mark.parametrize("text_first,use_cache", [(True, True), (False, False)])
def test_lowers_to_triton(text_first, use_cache):
    """The kernel lowers to Triton IR for an NVIDIA GPU (cross-platform lowering, no GPU needed): catches
    constructs the Triton lowering rejects (interpret mode accepts everything) for every autotuner config."""
    from pallas_kernels.triton import arrow_call
    from pallas_kernels.tuning import TUNE_CANDIDATES

    q = jax.ShapeDtypeStruct((1, 300, 3, 64), jnp.bfloat16)
    hw = jax.ShapeDtypeStruct((3,), jnp.int32)
    for cfg in TUNE_CANDIDATES:
        f = functools.partial(arrow_call, text_len=40, text_first=text_first, sm_scale=0.125, interpret=False,
                              config=cfg)
        with _abstract_gpu():
            text = jax.jit(f).trace(q, q, q, hw, q if use_cache else None).lower(
                lowering_platforms=("cuda",)).as_text()
        assert "arrow_attention" in text


def _abstract_gpu():
    """Where no GPU is attached, jax ≥ 0.11's Triton lowering reads the target GPU from the abstract mesh's
    device (jax 0.10 assumed one): an H100 here. A no-op with a GPU or on jax 0.10."""
    import contextlib
    import inspect

    if jax.default_backend() == "gpu" or "abstract_device" not in inspect.signature(
            jax.sharding.AbstractMesh).parameters:
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def test_shipped_tuning_is_used(tmp_path, monkeypatch):
    """Results shipped with the package (measured on an H100) answer when the user's cache has no entry."""
    from pallas_kernels import tuning as A

    monkeypatch.setenv("DFA2_ARROW_TUNE_CACHE", str(tmp_path / "none.json"))
    shipped = json.loads(A.SHIPPED_TUNING.read_text())
    key = next(iter(shipped))
    kind, _, shape, dtype, layout = key.split("|")
    b, s, h, d = (int(x) for x in shape[1:].replace("S", " ").replace("H", " ").replace("D", " ").split())
    text_first = layout.endswith("first")
    text_len = int(layout[4:-5] if text_first else layout[4:-4])
    monkeypatch.setattr(A.jax, "devices", lambda: [type("Dev", (), {"device_kind": kind})()])
    cfg = A.tuned_config((b, s, h, d), jnp.dtype(dtype), text_len, text_first)
    e = shipped[key]
    assert cfg == TritonConfig(e["block_q"], e["block_k"], e["num_warps"], e["num_stages"])
    monkeypatch.setattr(A.jax, "devices", lambda: [type("Dev", (), {"device_kind": "Other GPU"})()])
    assert A.tuned_config((b, s, h, d), jnp.dtype(dtype), text_len, text_first) is None


@settings(max_examples=40, **SETTINGS)
@given(s=st.integers(2, 400), frac=st.floats(0, 0.99), text_first=st.booleans(), bq=st.sampled_from([16, 64, 128]),
       bh=st.integers(1, 5))
def test_launch_order_is_a_permutation_text_blocks_first(s, frac, text_first, bq, bh):
    """The 1-D launch order visits every (batch·head, query block) once, the text-row query blocks first."""
    from pallas_kernels.common import launch_order, text_blocks

    text_len = min(int(frac * s), s - 1)
    n_qb = -(-s // bq)
    tq0, tq1 = text_blocks(s, text_len, text_first, bq)
    b, q = (np.asarray(x) for x in launch_order(jnp.arange(bh * n_qb), bh, n_qb, tq0, tq1))
    assert sorted(zip(b.tolist(), q.tolist())) == [(i, j) for i in range(bh) for j in range(n_qb)]
    n_first = bh * (tq1 - tq0)
    assert ((q[:n_first] >= tq0) & (q[:n_first] < tq1)).all()
    if text_len:  # every query block holding a text row is among the first
        rows = np.arange(s)
        text_rows = rows < text_len if text_first else rows >= s - text_len
        assert set(np.unique(rows[text_rows] // bq).tolist()) == set(range(tq0, tq1))


def test_pad_cache_waits_for_q():
    """The cache's padded copy is tied to q (an optimization barrier), so that XLA's GPU scheduler cannot pad every
    layer's carried cache at the top of a sampler step (SD3 1024² with CFG: 24 padded copies alive at once)."""
    from pallas_kernels.common import pad_cache

    cache, q = jnp.ones((1, 5, 2, 4)), jnp.zeros((1, 8, 2, 4))
    no_pad = ((0, 0),) * 4
    assert pad_cache(cache, q, no_pad) is cache
    pad = ((0, 0), (0, 3), (0, 0), (0, 0))
    out = pad_cache(cache, q, pad)
    np.testing.assert_array_equal(out, jnp.pad(cache, pad))
    jaxpr = jax.make_jaxpr(lambda c, q: pad_cache(c, q, pad))(cache, q).jaxpr
    barrier = next(e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier")
    assert list(barrier.invars) == list(jaxpr.invars)  # (cache, q) together
    assert any(barrier.outvars[0] in e.invars for e in jaxpr.eqns if e is not barrier)  # the pad reads its output


# -- the op's dispatch: every implementation by argument --------------------------------------------------


def _max_err(out, ref):
    return float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))))


@pytest.mark.parametrize("text_first", [True, False])
def test_xla_implementation_is_the_reference(text_first):
    """implementation="xla" runs the jnp reference on the CPU (no kernel, no interpret mode)."""
    from pallas_kernels import arrow_attention as op  # the package attribute is the op itself

    assert callable(op) and op is arrow_attention
    q, k, v, cache = _inputs(6, 2, 45, 3, 16, jnp.float32)
    hw = jnp.asarray([-1, 0, 4], jnp.int32)
    kw = dict(text_len=9, text_first=text_first, cache=cache)
    out = op(q, k, v, hw, implementation="xla", **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(arrow_attention_reference(q, k, v, hw, **kw)))
    # auto on a machine without a GPU is the reference too; config and schedule are ignored by "xla"
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(np.asarray(op(q, k, v, hw, **kw)), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(op(q, k, v, hw, implementation="xla", config=TINY, **kw)),
                                  np.asarray(out))


def test_triton_implementation_by_argument():
    """implementation="triton" with interpret=True (no config: the heuristic) equals the reference."""
    q, k, v, cache = _inputs(8, 1, 70, 2, 16, jnp.float32)
    hw = jnp.asarray([5, 0], jnp.int32)
    kw = dict(text_len=10, text_first=False, cache=cache)
    out = arrow_attention(q, k, v, hw, implementation="triton", interpret=True, **kw)
    assert _max_err(out, arrow_attention_reference(q, k, v, hw, **kw)) <= ATOL[jnp.float32]


def test_resolve_implementation():
    from pallas_kernels import IMPLEMENTATIONS, MosaicGpuConfig, resolve_implementation

    assert IMPLEMENTATIONS == ("auto", "mosaic_gpu", "triton", "xla")
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    assert resolve_implementation(q, config=TritonConfig()) == "triton"
    assert resolve_implementation(q, "auto", config=MosaicGpuConfig()) == "mosaic_gpu"
    for name in ("mosaic_gpu", "triton", "xla"):
        assert resolve_implementation(q, name) == name
    with pytest.raises(ValueError, match=r"implementation='cuda'.*'auto', 'mosaic_gpu', 'triton', 'xla'"):
        resolve_implementation(q, "cuda")
    with pytest.raises(ValueError, match="implementation='mosaic' is not one of"):
        resolve_implementation(q, "mosaic")
    with pytest.raises(ValueError, match="implementation='triton' takes a TritonConfig"):
        resolve_implementation(q, "triton", config=MosaicGpuConfig())
    with pytest.raises(ValueError, match="implementation='mosaic_gpu' takes a MosaicGpuConfig"):
        resolve_implementation(q, "mosaic_gpu", config=TritonConfig())
    with pytest.raises(ValueError, match="TritonConfig .Triton. or MosaicGpuConfig"):
        resolve_implementation(q, config={"block_q": 64})
    with pytest.raises(ValueError, match="implementation='cuda'"):
        x = jnp.zeros((1, 20, 2, 16), jnp.float32)
        arrow_attention(x, x, x, jnp.asarray([1, -1], jnp.int32), text_len=4, text_first=True, implementation="cuda")
    if jax.default_backend() == "cpu":
        assert resolve_implementation(q) == "xla"  # no GPU: the jnp reference
        assert resolve_implementation(q, interpret=True) == "triton"  # interpret mode: the Triton kernel
        assert resolve_implementation(q, None, interpret=True) == "triton"


def test_package_imports_nothing_from_the_app():
    """pallas_kernels stands alone: no import of dfa2_jax or converters, and no private name imported across its
    modules."""
    import ast
    from pathlib import Path

    import pallas_kernels

    for path in Path(pallas_kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
                if node.level:  # relative: within the package
                    names = [a.name for a in node.names]
                    assert not any(n.startswith("_") for n in names), f"{path.name}: private import {names}"
            else:
                continue
            assert not any(m.split(".")[0] in ("dfa2_jax", "converters") for m in mods), f"{path.name}: {mods}"


@pytest.mark.parametrize("implementation", ["triton", "xla"])
def test_longer_cache_gives_output_of_its_rows(implementation):
    """A cache longer than S (a caller carrying it padded): the output has the cache's rows, its first S those of
    the call on the cache's first S rows (cached heads copied bit for bit); cache_length is S off the Mosaic GPU
    kernel."""
    from pallas_kernels import cache_length

    q, k, v, cache = _inputs(9, 2, 37, 3, 16, jnp.float32)
    longer = jnp.concatenate([cache, jnp.full((2, 5, 3, 16), 7.0)], axis=1)
    hw = jnp.asarray([3, 0, -1], jnp.int32)
    kw = dict(text_len=6, text_first=False, interpret=True, implementation=implementation,
              config=TINY if implementation == "triton" else None)
    out = arrow_attention(q, k, v, hw, cache=longer, **kw)
    assert out.shape == longer.shape
    np.testing.assert_array_equal(np.asarray(out[:, :37]), np.asarray(arrow_attention(q, k, v, hw, cache=cache, **kw)))
    np.testing.assert_array_equal(np.asarray(out[:, :37, 1]), np.asarray(cache[:, :, 1]))
    assert cache_length(q, implementation, interpret=True) == 37
