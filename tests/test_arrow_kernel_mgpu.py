"""The Mosaic GPU arrow-attention kernel (Hopper) in GPU interpret mode on the CPU, against the jnp reference.

GPU interpret mode simulates the warpgroups, shared memory, barriers and TMA copies; its matmuls are jnp.dot on
the same shared-memory tiles (the interpreter has no transposed wgmma operand). Persistent CTAs over 9 to 24 tiles
exercise the cross-tile ring, both Q/O buffer parities, cached tiles (left out of the balanced schedule, copied by
the round-robin one) and, two CTAs over 24 and 9 tiles, CTAs with equal and unequal shares. The interpreter
compiles the kernel once per warpgroup of each CTA, so a case takes several seconds per CTA and the cases are fixed
rather than drawn. The compiled GPU kernel is checked against the same reference at the benchmark shapes by
scripts/bench_arrow.py (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (MosaicGpuConfig, TritonConfig, arrow_attention, arrow_attention_reference,
                            arrow_schedules, resolve_implementation)
from pallas_kernels import mosaic_gpu as mgpu

TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}  # max |kernel − reference|, as tests/test_arrow_kernel.py
SMALL = MosaicGpuConfig(block_q=64, block_kv=64, max_concurrent_steps=2, num_ctas=2)


def _inputs(seed, shape, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return tuple(jax.random.normal(x, shape, jnp.float32).astype(dtype) for x in ks)


@pytest.mark.parametrize("s, text_len, text_first, windows, use_cache, dtype, grouped, ctas, balance, sm_scale", [
    (300, 40, True, [-1, 5, 0, 1], True, jnp.float16, True, 2, True, None),   # FLUX layout, padding, a cached head
    # SD3 layout: text straddling a key block, the last tile text and padding rows (clean + tail), w > image
    (300, 100, False, [3, 0, -1, 250], True, jnp.bfloat16, True, 1, True, None),
    # no text; w = 0 without cache: a width-0 band, rows whose first key block is all masked; a scale > 1 (the
    # masked score must stay finite once scaled)
    (200, 0, True, [0, 2, -1, 7], False, jnp.float16, True, 1, True, 2.0),
    (200, 17, True, [-1, 5, 0], True, jnp.bfloat16, False, 1, False, None),   # a loop per range; round-robin
])
def test_matches_reference(s, text_len, text_first, windows, use_cache, dtype, grouped, ctas, balance, sm_scale):
    q, k, v, c = _inputs(s, (2, s, len(windows), 64), dtype)
    cache = c if use_cache else None
    hw = jnp.asarray(windows, jnp.int32)
    config = dataclasses.replace(SMALL, group_by_mask=grouped, num_ctas=ctas, balance=balance)
    out = arrow_attention(q, k, v, hw, text_len=text_len, text_first=text_first, cache=cache, interpret=True,
                          config=config, sm_scale=sm_scale)
    ref = arrow_attention_reference(q, k, v, hw, text_len=text_len, text_first=text_first, cache=cache,
                                    sm_scale=sm_scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out32).all()
    err = float(np.max(np.abs(out32 - ref32)))
    assert err <= TOL[dtype], f"max |err| {err} > {TOL[dtype]}"  # achieved: 9.8e-4 (f16), 9.8e-4 (bf16)
    if use_cache:  # cached heads are the cache, bit for bit
        cached = np.flatnonzero(np.asarray(windows) == 0)
        np.testing.assert_array_equal(np.asarray(out)[:, :, cached], np.asarray(c)[:, :, cached])


def _table_parts(table, n_cta):
    """(rows of each CTA in its order, every row) of a program table."""
    t = np.asarray(table)
    header, rows = t[:n_cta], t[n_cta:]
    per_cta = [t[first:first + count] for first, count in header[:, :2]]
    assert (header[:, 2:] == 0).all() and sum(header[:, 1]) <= len(rows)
    return per_cta, rows


@pytest.mark.parametrize("balance", [True, False])
def test_program_table_covers_every_tile_once_longest_first(balance):
    hw = jnp.asarray([-1, 0, 9, 40, 3], jnp.int32)
    s, s_pad, tile, bkv, n_cta = 700, 768, 128, 64, 4
    table, kinds = mgpu.program_table(hw, batch=2, seq_len=s, s_pad=s_pad, text_len=50, text_first=True,
                                      has_cache=True, tile_q=tile, block_kv=bkv, n_cta=n_cta, balance=balance)
    per_cta, rows = _table_parts(table, n_cta)
    assert sorted(map(tuple, rows[:, :3].tolist())) == [(b, h, q) for b in range(2) for h in range(5)
                                                       for q in range(s_pad // tile)]
    steps = lambda r: (r[:, 6::2] - r[:, 5::2]).sum(axis=1)
    assert (steps(rows[rows[:, 4] == 1]) == 0).all() and (rows[rows[:, 4] == 1, 1] == 1).all()  # cached: head 1
    assert (steps(rows[rows[:, 1] == 0]) == s_pad // bkv).all()  # a full head visits every key block
    scheduled = np.concatenate(per_cta)
    if balance:  # every tile with work exactly once, cached tiles left out (the output is the cache already)
        assert sorted(map(tuple, scheduled[:, :3].tolist())) == sorted(map(tuple, rows[rows[:, 4] == 0, :3].tolist()))
    else:  # round-robin over the longest-first order, cached tiles too: CTA c runs rows c, c + n_cta, …
        assert len(scheduled) == len(rows)
        longest_first = np.concatenate([r[None] for i in range(len(rows)) for r in [per_cta[i % n_cta][i // n_cta]]])
        assert (np.diff(steps(longest_first)) <= 0).all()
    for r in per_cta:
        assert (np.diff(steps(r)) <= 0).all()  # each CTA's tiles longest first
    assert kinds == ("clean", "tail", "general", "general", "band", "clean", "band")


@pytest.mark.parametrize("n_cta, seed", [(8, 0), (16, 1), (33, 2), (132, 3)])
def test_balanced_assignment_is_longest_processing_time_first(n_cta, seed):
    """assign_ctas' chunked assignment against one-at-a-time LPT (numpy) on plan-like costs (a few long text/full
    tiles, many short band tiles, zero-cost cached ones): its makespan is within 2% of LPT's, below round-robin's,
    under Graham's bound (mean load + longest job), and every program with work is on one CTA."""
    rng = np.random.default_rng(seed)
    cost = np.concatenate([np.full(rng.integers(4, 40), 135.0), rng.choice([0.0, 9.0, 14.0, 24.0, 40.0], 900),
                           np.full(rng.integers(20, 200), 135.0)])
    cost = np.sort(cost)[::-1].astype(np.float32)
    cta = np.asarray(mgpu.assign_ctas(jnp.asarray(cost), n_cta))
    assert ((cta >= 0) == (cost > 0)).all() and cta.max() < n_cta
    load = np.bincount(cta[cta >= 0], weights=cost[cta >= 0], minlength=n_cta)
    lpt = np.zeros(n_cta)
    for c in cost:
        lpt[np.argmin(lpt)] += c
    rr = np.bincount(np.arange(len(cost)) % n_cta, weights=cost, minlength=n_cta)  # round-robin
    assert load.max() <= 1.02 * lpt.max(), (load.max(), lpt.max())
    assert load.max() <= rr.max() and load.max() <= cost.sum() / n_cta + cost.max()


def test_cta_loads_follow_the_cost_model():
    """cta_loads: one full head of 768 aligned tokens is 6 tiles × (12 clean key blocks + 3) on one CTA; over
    several CTAs the total does not depend on the schedule, the balanced one's busiest CTA is no busier than
    round-robin's, and cached heads cost nothing."""
    one = mgpu.MosaicGpuConfig(block_q=64, block_kv=64, num_ctas=1)
    np.testing.assert_array_equal(mgpu.cta_loads(jnp.asarray([-1]), (1, 768, 1, 64), text_len=128, text_first=True,
                                                 has_cache=False, config=one), [90.0])
    hw = jnp.asarray([-1, 0, 9, 40, 3])
    loads = {bal: mgpu.cta_loads(hw, (2, 700, 5, 64), text_len=50, text_first=True, has_cache=True,
                                 config=dataclasses.replace(one, num_ctas=4, balance=bal)) for bal in (True, False)}
    assert loads[True].shape == (4,) and loads[True].sum() > 0
    np.testing.assert_allclose(loads[True].sum(), loads[False].sum(), rtol=1e-12)
    assert loads[True].max() <= loads[False].max()
    cached = mgpu.cta_loads(jnp.asarray([0, 0]), (1, 700, 2, 64), text_len=50, text_first=True, has_cache=True,
                            config=dataclasses.replace(one, num_ctas=4))
    np.testing.assert_array_equal(cached, np.zeros(4))


def test_jax_compat_resolves_interpret_params():
    """The package's one use of jax internals (Mosaic GPU interpret mode's parameters class) still resolves on the
    installed jax: if jax moves the name, this fails here (fix pallas_kernels/_jax_compat.py) instead of every
    interpret test failing obscurely."""
    import dataclasses

    from pallas_kernels import _jax_compat

    cls = _jax_compat.interpret_gpu_params_class()
    assert isinstance(cls, type) and cls.__name__ == "InterpretGPUParams", cls
    params = _jax_compat.interpret_gpu_params()
    assert isinstance(params, cls) and dataclasses.is_dataclass(params)


def test_backend_choice():
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    assert resolve_implementation(q, config=TritonConfig()) == "triton"
    assert resolve_implementation(q, config=MosaicGpuConfig()) == "mosaic_gpu"
    assert resolve_implementation(q, interpret=True) == "triton"  # CPU tests default to the Triton kernel
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_implementation(q) == ("mosaic_gpu" if mgpu.supported(q) else "triton" if on_gpu else "xla")
    assert resolve_implementation(q, "mosaic_gpu") == "mosaic_gpu"  # the argument, not an environment variable
    assert resolve_implementation(q, "mosaic_gpu", interpret=True) == "mosaic_gpu"
    with pytest.raises(ValueError, match=r"implementation='cuda'.*'auto', 'mosaic_gpu', 'triton', 'xla'"):
        resolve_implementation(q, "cuda")
    with pytest.raises(ValueError, match="TritonConfig .Triton. or MosaicGpuConfig"):
        resolve_implementation(q, config={"block_q": 64})


def test_mosaic_gpu_implementation_by_argument():
    """implementation="mosaic_gpu" reaches the Mosaic GPU kernel without a config (the heuristic one), in GPU
    interpret mode, and equals the reference (one query tile per head: two tiles, so two CTAs)."""
    q, k, v, c = _inputs(11, (1, 120, 2, 64), jnp.bfloat16)
    hw = jnp.asarray([4, 0], jnp.int32)
    kw = dict(text_len=17, text_first=True, cache=c)
    out = arrow_attention(q, k, v, hw, implementation="mosaic_gpu", interpret=True, **kw)
    ref = arrow_attention_reference(q, k, v, hw, **kw)
    err = float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))))
    assert err <= TOL[jnp.bfloat16], err
    np.testing.assert_array_equal(np.asarray(out)[:, :, 1], np.asarray(c)[:, :, 1])


def test_supported_and_errors():
    assert mgpu.supported(jnp.zeros((1, 8, 1, 64), jnp.bfloat16), interpret=True)
    assert not mgpu.supported(jnp.zeros((1, 8, 1, 64), jnp.float32), interpret=True)
    assert not mgpu.supported(jnp.zeros((1, 8, 1, 32), jnp.float16), interpret=True)
    assert not mgpu.supported(jnp.zeros((1, 8, 1, 64), jnp.float16))  # no Hopper GPU here
    q = jnp.zeros((1, 130, 2, 32), jnp.float16)
    with pytest.raises(ValueError, match="head_dim a multiple of 64"):
        mgpu.arrow_attention_mosaic_gpu(q, q, q, jnp.asarray([-1, 3], jnp.int32), text_len=2, text_first=True)
    for bad, match in ((dict(block_q=96), "block_q=96"), (dict(block_kv=32), "block_kv=32"),
                       (dict(max_concurrent_steps=1), "max_concurrent_steps=1"), (dict(num_ctas=-1), "num_ctas=-1"),
                       (dict(group_by_mask=1), "group_by_mask=1"), (dict(profile_dir="/tmp/x"), "profile_events=0"),
                       (dict(profile_events=64), "profile_dir=''"), (dict(profile_dir="d", profile_events=-1), "=-1")):
        with pytest.raises(ValueError, match=match):
            MosaicGpuConfig(**bad)
    assert mgpu.heuristic_config(128) == MosaicGpuConfig(64, 128, 2)
    with pytest.raises(ValueError, match="balance=0"):
        MosaicGpuConfig(balance=0)
    assert mgpu.num_ctas(10, MosaicGpuConfig(num_ctas=4)) == 4 and mgpu.num_ctas(3, MosaicGpuConfig(num_ctas=4)) == 3


def _custom_calls(text: str) -> list[str]:
    return [line for line in text.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]


@pytest.mark.parametrize("use_cache", [True, False])
def test_cache_is_updated_in_place_on_the_gpu(use_cache):
    """Lowered for CUDA (on the CPU): with a cache, the kernel's output is aliased to the cache operand, so XLA
    writes the sampler's carried head cache in place (no second buffer, no copy into the scan carry)."""
    q = jax.ShapeDtypeStruct((1, 384, 2, 64), jnp.bfloat16)
    hw = jax.ShapeDtypeStruct((2,), jnp.int32)

    def f(q, k, v, hw, *cache):
        return mgpu.arrow_attention_mosaic_gpu(q, k, v, hw, text_len=40, text_first=True,
                                               cache=cache[0] if cache else None)

    args = (q, q, q, hw) + ((q,) if use_cache else ())
    calls = _custom_calls(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    assert len(calls) == 1
    alias = "output_operand_alias<output_tuple_indices = [], operand_index = 4,"
    assert (alias in calls[0]) == use_cache, calls[0][-600:]


def test_cache_of_the_padded_length_is_kept_padded():
    """A cache of the kernel's padded length (``cache_length``: S rounded up to whole tiles) is written as it is
    and the output keeps its rows: the first S equal the call on an S-row cache bit for bit (cached heads are the
    cache); lowered for CUDA, no pad and no slice surround the kernel."""
    from pallas_kernels import cache_length

    s, text_len, windows = 200, 17, [-1, 5, 0]
    q, k, v, c = _inputs(3, (1, s, 3, 64), jnp.bfloat16)
    config = dataclasses.replace(SMALL, num_ctas=1)
    rows = cache_length(q, "mosaic_gpu", config=config, interpret=True)
    assert rows == mgpu.padded_length(q.shape, config) == 256
    padded = jnp.pad(c, ((0, 0), (0, rows - s), (0, 0), (0, 0)), constant_values=3.0)
    hw = jnp.asarray(windows, jnp.int32)
    kw = dict(text_len=text_len, text_first=True, interpret=True, config=config)
    out = arrow_attention(q, k, v, hw, cache=padded, **kw)
    assert out.shape == (1, rows, 3, 64)
    np.testing.assert_array_equal(np.asarray(out[:, :s]), np.asarray(arrow_attention(q, k, v, hw, cache=c, **kw)))
    np.testing.assert_array_equal(np.asarray(out[:, :, 2]), np.asarray(padded[:, :, 2]))

    def f(q, k, v, hw, cache):
        return mgpu.arrow_attention_mosaic_gpu(q, k, v, hw, text_len=40, text_first=True, cache=cache)

    sq = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16)
    cache_rows = jax.ShapeDtypeStruct((1, mgpu.padded_length(sq.shape), 2, 64), jnp.bfloat16)
    def lowered(cache):
        traced = jax.jit(f).trace(sq, sq, sq, jax.ShapeDtypeStruct((2,), jnp.int32), cache)
        return traced.out_info.shape, traced.lower(lowering_platforms=("cuda",)).as_text()

    shape, text = lowered(cache_rows)
    assert shape == (1, 384, 2, 64) and len(_custom_calls(text)) == 1  # the output keeps the rows: no slice
    # no padded copy of the cache (pad_cache's barrier), which an S-row cache gets
    barrier = "= stablehlo.optimization_barrier"
    assert barrier not in text and barrier in lowered(sq)[1]


def test_schedules_are_the_per_call_tables_and_drive_the_kernel():
    """``schedules`` stacks exactly the per-call program tables, and a call given its row computes what the call
    computing its own table does (bit for bit: the same launch order) and equals the reference (9 tiles over 2
    CTAs: unequal shares); a wrong-shaped schedule is refused."""
    s, text_len = 260, 30
    windows = jnp.asarray([[-1, 4, 0], [2, 0, 9]], jnp.int32)  # two calls (layers), three heads
    q, k, v, c = _inputs(7, (1, s, 3, 64), jnp.bfloat16)
    stacked = arrow_schedules(q, windows, text_len=text_len, text_first=True, has_cache=True, config=SMALL)
    kw = mgpu.table_args(q.shape, SMALL, text_len=text_len, text_first=True, has_cache=True)
    for layer in range(2):
        np.testing.assert_array_equal(stacked[layer], mgpu.program_table(windows[layer], **kw)[0])
    assert arrow_schedules(q, windows, text_len=text_len, text_first=True, has_cache=True,
                           config=TritonConfig(block_q=64, block_k=64)) is None  # Triton: no schedule
    call = dict(text_len=text_len, text_first=True, cache=c, interpret=True, config=SMALL)
    with_schedule = arrow_attention(q, k, v, windows[1], schedule=stacked[1], **call)
    np.testing.assert_array_equal(np.asarray(with_schedule), np.asarray(arrow_attention(q, k, v, windows[1], **call)))
    ref = arrow_attention_reference(q, k, v, windows[1], text_len=text_len, text_first=True, cache=c)
    err = float(np.max(np.abs(np.asarray(with_schedule, np.float32) - np.asarray(ref, np.float32))))
    assert err <= TOL[jnp.bfloat16], err
    with pytest.raises(ValueError, match="schedule must be int32"):
        arrow_attention(q, k, v, windows[1], schedule=stacked, **call)
