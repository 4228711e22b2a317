"""Head-wise block-sparse arrow attention as one Pallas kernel (Triton backend on NVIDIA GPUs).

Semantics (dfa2_jax.methods.arrow_mask): with S = text_len + N_img tokens, query i sees key j iff i is text, or
j is text, or both are image tokens with |img(i) − img(j)| ≤ w, w the head's half-window:

* ``w == -1`` (any w < 0): full attention;
* ``w == 0`` with ``cache`` given: the head is cached, its output is copied from ``cache`` (no compute);
* ``w == 0`` with ``cache=None``: there are no cached heads; w = 0 is then a band of width 0 (each image query
  sees itself and the text keys). ``half_window`` is runtime data, so this cannot be checked at trace time:
  a caller whose plan may hold cached heads must pass ``cache``;
* ``w > 0``: the arrow band.

One launch serves every head: the grid is (query blocks, B·H). Each program reads its head's w from an int32
input and derives the key blocks it must visit (FLUX layout: text first; SD3 layout: text last):

* a query block holding any text row, or a full head: every key block;
* an image-only query block with image rows [a0, a1]: the text key blocks, then the image key blocks meeting
  [a0 − w, a1 + w] (clipped so that no block is visited twice) — two ``lax.fori_loop`` ranges at most;
* a cached head: no key block (the cache block is written).

Key blocks outside a head's band are never loaded. Online softmax (FlashAttention-2, base-2 exponentials) in
float32. First version: every visited block is masked element-wise (the mask is a few integer compares per
element; restricting it to edge blocks is a later tuning step).

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

from dfa2_jax.methods import arrow_mask

# Finite "minus infinity": a row whose first visited block is fully masked must not produce inf − inf = NaN;
# its junk is wiped by the exp2(m_prev − m_next) = 0 correction once a real key arrives.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True, slots=True)
class ArrowConfig:
    """Tile sizes and Triton launch parameters. block_q, block_k: powers of two ≥ 16 (Triton block loads)."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
                raise ValueError(f"ArrowConfig.{name}={b!r} must be a power of two >= 16 (Triton block loads)")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"ArrowConfig: num_warps={self.num_warps} and num_stages={self.num_stages} must be >= 1")


def heuristic_config(seq_len: int, head_dim: int, dtype) -> ArrowConfig:
    """Per-shape default (no autotuning yet): 128×64 tiles as the official FA2 fork at head_dim 128, 8 warps for
    head_dim 128, smaller query tiles for float32 (register pressure) and for short sequences."""
    dtype = jnp.dtype(dtype)
    block_q = 64 if dtype == jnp.float32 else 128
    block_k = 64 if head_dim <= 128 else 32
    cap = max(16, pl.next_power_of_2(max(int(seq_len), 1)))
    block_q, block_k = min(block_q, cap), min(block_k, cap)
    num_warps = 8 if head_dim >= 128 and block_q >= 128 else 4
    return ArrowConfig(block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=3)


def _arrow_kernel(hw_ref, q_ref, k_ref, v_ref, *rest, num_heads: int, seq_len: int, text_len: int,
                  text_first: bool, sm_scale: float, block_q: int, block_k: int, has_cache: bool):
    """One (query block, batch·head) program. q_ref, o_ref (and cache_ref): [block_q, D]; k_ref, v_ref:
    [S_pad, D] of this batch element and head; hw_ref: [H_pad] int32 half-windows."""
    if has_cache:
        cache_ref, o_ref = rest
    else:
        (o_ref,) = rest
    qb = pl.program_id(0)
    h = pl.program_id(1) % num_heads
    w = hw_ref[h]  # scalar int32
    s_pad = k_ref.shape[0]
    n_kb = s_pad // block_k
    n_img = seq_len - text_len
    off = text_len if text_first else 0  # sequence position of image token 0
    t_lo, t_hi = (0, text_len) if text_first else (n_img, seq_len)  # text positions [t_lo, t_hi)

    q0 = qb * block_q
    q1 = q0 + block_q - 1  # inclusive
    if text_len == 0:
        has_text_row = jnp.bool_(False)
    else:
        has_text_row = (q0 < t_hi) & (q1 >= t_lo)

    # Text key blocks [tb0, tb1) and band key blocks [bb0, bb1) for an image-only query block.
    tb0, tb1 = (t_lo // block_k, pl.cdiv(t_hi, block_k)) if text_len else (0, 0)
    a0 = q0 - off
    a1 = jnp.minimum(q1 - off, n_img - 1)
    lo = jnp.maximum(a0 - w, 0) + off
    hi = jnp.minimum(a1 + w, n_img - 1) + off  # inclusive
    bb0, bb1 = lo // block_k, hi // block_k + 1
    if text_len:  # drop the block(s) already visited in the text range
        if text_first:
            bb0 = jnp.maximum(bb0, tb1)
        else:
            bb1 = jnp.minimum(bb1, tb0)
    bb1 = jnp.maximum(bb1, bb0)
    visit_all = (w < 0) | has_text_row
    cached = (w == 0) if has_cache else jnp.bool_(False)
    zero = jnp.int32(0)
    r1_lo = jnp.where(cached | visit_all, zero, jnp.int32(tb0))
    r1_hi = jnp.where(cached | visit_all, zero, jnp.int32(tb1))
    r2_lo = jnp.where(cached, zero, jnp.where(visit_all, zero, bb0)).astype(jnp.int32)
    r2_hi = jnp.where(cached, zero, jnp.where(visit_all, jnp.int32(n_kb), bb1)).astype(jnp.int32)

    q = q_ref[...]
    d = q.shape[-1]
    rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
    q_is_text = (rows >= t_lo) & (rows < t_hi)
    q_img = rows - off

    def body(kb, carry):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = pltriton.dot(q, k, trans_b=True).astype(jnp.float32) * (sm_scale * _LOG2E)  # [bq, bk], base 2
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
        acc = corr[:, None] * acc + pltriton.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_next, l_next

    carry = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(r1_lo, r1_hi, body, carry)
    acc, _, l = lax.fori_loop(r2_lo, r2_hi, body, carry)
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]  # l == 0 only for cached heads / all-padding rows
    if has_cache:
        out = jnp.where(cached, cache_ref[...].astype(jnp.float32), out)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("text_len", "text_first", "sm_scale", "interpret", "config"))
def _arrow_call(q, k, v, half_window, cache, *, text_len, text_first, sm_scale, interpret, config):
    b, s, h, d = q.shape
    bq, bk = config.block_q, config.block_k
    s_pad = pl.cdiv(s, max(bq, bk)) * max(bq, bk)
    pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    h_pad = pl.next_power_of_2(h)  # power-of-two block for the Triton load of the window table
    hw = jnp.pad(half_window.astype(jnp.int32), (0, h_pad - h), constant_values=-1)
    has_cache = cache is not None

    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, j: (j // h, i, j % h, 0))
    kv_spec = pl.BlockSpec((None, s_pad, None, d), lambda i, j: (j // h, 0, j % h, 0))
    in_specs = [pl.BlockSpec((h_pad,), lambda i, j: (0,)), q_spec, kv_spec, kv_spec]
    args = [hw, q, k, v]
    if has_cache:
        in_specs.append(q_spec)
        args.append(jnp.pad(cache.astype(q.dtype), pad))
    kernel = functools.partial(_arrow_kernel, num_heads=h, seq_len=s, text_len=text_len, text_first=text_first,
                               sm_scale=sm_scale, block_q=bq, block_k=bk, has_cache=has_cache)
    out = pl.pallas_call(
        kernel,
        grid=(s_pad // bq, b * h),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((b, s_pad, h, d), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="arrow_attention",
    )(*args)
    return out[:, :s]


def _validate(q, k, v, half_window, text_len, cache, *, kernel: bool):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"arrow_attention: {name} must be [B, S, H, D], got shape {getattr(x, 'shape', None)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"arrow_attention: q, k, v must have the same shape [B, S, H, D], got "
                         f"{q.shape=}, {k.shape=}, {v.shape=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"arrow_attention: q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"arrow_attention: dtype {q.dtype} unsupported, expected one of bfloat16, float16, float32")
    b, s, h, d = q.shape
    if kernel and (d < 16 or d & (d - 1)):
        raise ValueError(f"arrow_attention: head_dim D={d} must be a power of two >= 16 (Triton block loads; "
                         "64 and 128 are the SD3 / FLUX sizes)")
    hw_shape = getattr(half_window, "shape", None)
    hw_dtype = getattr(half_window, "dtype", None)
    if hw_shape != (h,) or hw_dtype != jnp.int32:
        raise ValueError(f"arrow_attention: half_window must be int32 [H={h}] (one half-window per head), got "
                         f"shape {hw_shape} dtype {hw_dtype}")
    if not isinstance(text_len, (int, np.integer)) or isinstance(text_len, bool) or not 0 <= text_len < s:
        raise ValueError(f"arrow_attention: text_len={text_len!r} must be a static int with 0 <= text_len < S={s} "
                         "(at least one image token)")
    if cache is not None and (cache.shape != q.shape):
        raise ValueError(f"arrow_attention: cache must be [B, S, H, D] = {q.shape}, got {cache.shape}")


def arrow_attention(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None, sm_scale=None,
                    interpret: bool = False, config: ArrowConfig | None = None):
    """Arrow attention with per-head half-windows, one Pallas launch: q, k, v, cache [B, S, H, D] -> [B, S, H, D].

    half_window: int32 [H], runtime data: −1 full, 0 cached when ``cache`` is given (else a band of width 0, see
    the module docstring), w > 0 arrow band over the image tokens. text_first: FLUX [text, image] when True, SD3
    [image, text] when False. sm_scale defaults to D ** −0.5. interpret=True runs the kernel on CPU (tests; it
    does not check Triton's rules). config defaults to :func:`heuristic_config`.
    """
    _validate(q, k, v, half_window, text_len, cache, kernel=True)
    _, s, _, d = q.shape
    if config is None:
        config = heuristic_config(s, d, q.dtype)
    if not isinstance(config, ArrowConfig):
        raise ValueError(f"arrow_attention: config must be an ArrowConfig, got {type(config).__name__}")
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    return _arrow_call(q, k, v, half_window, cache, text_len=int(text_len), text_first=bool(text_first),
                       sm_scale=sm_scale, interpret=bool(interpret), config=config)


def arrow_attention_reference(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None,
                              sm_scale=None, interpret: bool = False, config: ArrowConfig | None = None):
    """Pure-jnp arrow attention (O(S²) memory), the same signature and cache rule as :func:`arrow_attention`;
    ``interpret`` and ``config`` are ignored. Softmax and both matmuls in float32 at HIGHEST precision."""
    del interpret, config
    _validate(q, k, v, half_window, text_len, cache, kernel=False)
    d = q.shape[-1]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    mask = arrow_mask(q.shape[1], text_len, text_first, half_window)  # [H, S, S]
    hi = lax.Precision.HIGHEST
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=hi) * scale
    probs = jax.nn.softmax(jnp.where(mask[None], logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32), precision=hi)
    if cache is not None:
        out = jnp.where((half_window == 0)[None, None, :, None], cache.astype(jnp.float32), out)
    return out.astype(q.dtype)
