"""Arrow attention as one Pallas kernel on the Triton backend (NVIDIA GPUs; interpret mode on CPU).

Semantics: :mod:`pallas_kernels.reference`; visit schedule: :mod:`pallas_kernels.common`.

One launch serves every head: a 1-D grid of B·H·(query blocks) programs, launched longest job first — the
query blocks holding text rows (which visit every key block) of every head, then the image-only query blocks
head by head (neighbours share their key bands in L2). Each program reads its head's w from an int32
input and derives the key blocks it must visit (:func:`pallas_kernels.common.visit_ranges`): two
``lax.fori_loop`` ranges at most for an image-only query block; none for a cached head (the cache block is
written). Key blocks outside a head's band are never loaded. Online softmax (FlashAttention-2, base-2
exponentials) in float32. Only edge blocks are masked element-wise: key blocks fully inside every row's band (and
the pure-text key blocks, and every unpadded block of a full head or an all-text query block) run an unmasked
body.

The sequence is padded in the wrapper to a multiple of max(block_q, block_k); padded keys are always masked
out and padded query rows are sliced off.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .common import launch_order, on_cache_rows, pad_cache, text_blocks, validate, visit_ranges

_dot = getattr(pltriton, "dot", None) or pl.dot  # jax 0.10: pallas.triton.dot; both take (a, b)

# Finite "minus infinity": a row whose first visited block is fully masked must not produce inf − inf = NaN;
# its junk is wiped by the exp2(m_prev − m_next) = 0 correction once a real key arrives.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True, slots=True)
class TritonConfig:
    """Tile sizes and Triton launch parameters. block_q, block_k: powers of two ≥ 16 (Triton block loads)."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
                raise ValueError(f"TritonConfig.{name}={b!r} must be a power of two >= 16 (Triton block loads)")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"TritonConfig: num_warps={self.num_warps} and num_stages={self.num_stages} "
                             "must be >= 1")


def heuristic_config(seq_len: int, head_dim: int, dtype) -> TritonConfig:
    """Per-shape default (no autotuning yet): 128×64 tiles as the official FA2 fork at head_dim 128, 8 warps for
    head_dim 128, smaller query tiles for float32 (register pressure) and for short sequences."""
    dtype = jnp.dtype(dtype)
    block_q = 64 if dtype == jnp.float32 else 128
    block_k = 64 if head_dim <= 128 else 32
    cap = max(16, pl.next_power_of_2(max(int(seq_len), 1)))
    block_q, block_k = min(block_q, cap), min(block_k, cap)
    num_warps = 8 if head_dim >= 128 and block_q >= 128 else 4
    return TritonConfig(block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=3)


def _arrow_kernel(hw_ref, q_ref, k_ref, v_ref, *rest, num_heads: int, seq_len: int, text_len: int,
                  text_first: bool, sm_scale: float, block_q: int, block_k: int, has_cache: bool, bh_count: int,
                  n_qb: int, tq0: int, tq1: int):
    """One (batch·head, query block) program (:func:`~pallas_kernels.common.launch_order`). q_ref, o_ref (and
    cache_ref): [block_q, D]; k_ref, v_ref: [S_pad, D] of this batch element and head; hw_ref: [H_pad] int32
    half-windows."""
    if has_cache:
        cache_ref, o_ref = rest
    else:
        (o_ref,) = rest
    # Grid (batch·head, query block): the heads of one query block run side by side, and the query blocks
    # holding text rows (every key block: the heaviest programs) are launched first (longest job first).
    bh, qb = launch_order(pl.program_id(0), bh_count, n_qb, tq0, tq1)
    h = lax.rem(bh, num_heads)
    w = hw_ref[h]  # scalar int32
    s_pad = k_ref.shape[0]
    n_img = seq_len - text_len
    off = text_len if text_first else 0  # sequence position of image token 0
    t_lo, t_hi = (0, text_len) if text_first else (n_img, seq_len)  # text positions [t_lo, t_hi)
    q0 = qb * block_q
    ranges, cached = visit_ranges(w, q0, s_pad=s_pad, seq_len=seq_len, text_len=text_len, text_first=text_first,
                                  block_q=block_q, block_k=block_k, has_cache=has_cache)

    q = q_ref[...]
    d = q.shape[-1]
    rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
    q_is_text = (rows >= t_lo) & (rows < t_hi)
    q_img = rows - off

    def body(kb, carry, masked: bool):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = _dot(q, k.T).astype(jnp.float32) * (sm_scale * _LOG2E)  # [bq, bk], base 2
        if masked:
            cols = start + jnp.arange(block_k, dtype=jnp.int32)
            k_is_text = (cols >= t_lo) & (cols < t_hi)
            band = jnp.abs(q_img[:, None] - (cols - off)[None, :]) <= w
            allowed = (w < 0) | q_is_text[:, None] | k_is_text[None, :] | band
            allowed = allowed & (cols < seq_len)[None, :]  # padded keys are never attended
            s = jnp.where(allowed, s, _MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        corr = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = corr * l_prev + p.sum(axis=-1)
        acc = corr[:, None] * acc + _dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_next, l_next

    carry = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    masked_body = functools.partial(body, masked=True)
    clean_body = functools.partial(body, masked=False)
    for (r_lo, r_hi), mask in ranges:  # every masked range takes the whole arrow test here
        carry = lax.fori_loop(r_lo, r_hi, clean_body if mask == "clean" else masked_body, carry)
    acc, _, l = carry
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]  # l == 0 only for cached heads / all-padding rows
    if has_cache:
        out = jnp.where(cached, cache_ref[...].astype(jnp.float32), out)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("text_len", "text_first", "sm_scale", "interpret", "config"))
def arrow_call(q, k, v, half_window, cache, *, text_len, text_first, sm_scale, interpret, config):
    """The jitted launch (no validation, no defaults: :func:`arrow_attention_triton` supplies them)."""
    b, s, h, d = q.shape
    bq, bk = config.block_q, config.block_k
    s_pad = pl.cdiv(s, max(bq, bk)) * max(bq, bk)
    pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    h_pad = pl.next_power_of_2(h)  # power-of-two block for the Triton load of the window table
    hw = jnp.pad(half_window.astype(jnp.int32), (0, h_pad - h), constant_values=-1)
    has_cache = cache is not None

    n_qb = s_pad // bq
    tq0, tq1 = text_blocks(s, text_len, text_first, bq)
    prog = functools.partial(launch_order, bh_count=b * h, n_qb=n_qb, tq0=tq0, tq1=tq1)

    def q_map(p):
        bh, qb = prog(p)
        return bh // h, qb, lax.rem(bh, h), 0

    def kv_map(p):
        bh, _ = prog(p)
        return bh // h, 0, lax.rem(bh, h), 0

    q_spec = pl.BlockSpec((None, bq, None, d), q_map)
    kv_spec = pl.BlockSpec((None, s_pad, None, d), kv_map)
    in_specs = [pl.BlockSpec((h_pad,), lambda p: (0,)), q_spec, kv_spec, kv_spec]
    args = [hw, q, k, v]
    if has_cache:
        in_specs.append(q_spec)
        args.append(pad_cache(cache.astype(q.dtype), q, pad))
    kernel = functools.partial(_arrow_kernel, num_heads=h, seq_len=s, text_len=text_len, text_first=text_first,
                               sm_scale=sm_scale, block_q=bq, block_k=bk, has_cache=has_cache, bh_count=b * h,
                               n_qb=n_qb, tq0=tq0, tq1=tq1)
    out = pl.pallas_call(
        kernel,
        grid=(b * h * n_qb,),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((b, s_pad, h, d), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        # The output is written over the cache: every program reads the cache only at the tile it writes, so
        # the per-layer head cache carried by the sampler's scan is updated in place (no second buffer).
        input_output_aliases={len(args) - 1: 0} if has_cache else {},
        name="arrow_attention",
    )(*args)
    return out[:, :s]


def arrow_attention_triton(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None, sm_scale=None,
                           interpret: bool = False, config: TritonConfig | None = None):
    """:func:`pallas_kernels.arrow_attention` on the Triton backend; same arguments and semantics, any of
    bf16 / f16 / f32 with head_dim a power of two >= 16. ``config`` defaults to :func:`heuristic_config` (the
    dispatcher passes the autotuned config, :mod:`pallas_kernels.tuning`, when one is cached)."""
    validate(q, k, v, half_window, text_len, cache, kernel=True)
    if config is not None and not isinstance(config, TritonConfig):
        raise ValueError(f"arrow_attention_triton: config must be a TritonConfig, got {type(config).__name__}")
    _, s, _, d = q.shape
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    config = config or heuristic_config(s, d, q.dtype)
    return on_cache_rows(lambda c: arrow_call(q, k, v, half_window, c, text_len=int(text_len),
                                              text_first=bool(text_first), sm_scale=sm_scale,
                                              interpret=bool(interpret), config=config), q, cache)
