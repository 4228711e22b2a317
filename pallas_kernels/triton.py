"""Head-wise block-sparse arrow attention as one Pallas kernel (Triton backend on NVIDIA GPUs).

Semantics (dfa2_jax.methods.arrow_mask): with S = text_len + N_img tokens, query i sees key j iff i is text, or
j is text, or both are image tokens with |img(i) − img(j)| ≤ w, w the head's half-window:

* ``w == -1`` (any w < 0): full attention;
* ``w == 0`` with ``cache`` given: the head is cached, its output is copied from ``cache`` (no compute);
* ``w == 0`` with ``cache=None``: there are no cached heads; w = 0 is then a band of width 0 (each image query
  sees itself and the text keys). ``half_window`` is runtime data, so this cannot be checked at trace time:
  a caller whose plan may hold cached heads must pass ``cache``;
* ``w > 0``: the arrow band.

One launch serves every head: a 1-D grid of B·H·(query blocks) programs, launched longest job first — the
query blocks holding text rows (which visit every key block) of every head, then the image-only query blocks
head by head (neighbours share their key bands in L2). Each program reads its head's w from an int32
input and derives the key blocks it must visit (FLUX layout: text first; SD3 layout: text last):

* a query block holding any text row, or a full head: every key block;
* an image-only query block with image rows [a0, a1]: the text key blocks, then the image key blocks meeting
  [a0 − w, a1 + w] (clipped so that no block is visited twice) — two ``lax.fori_loop`` ranges at most;
* a cached head: no key block (the cache block is written).

Key blocks outside a head's band are never loaded. Online softmax (FlashAttention-2, base-2 exponentials) in
float32. Only edge blocks are masked element-wise: key blocks fully inside every row's band (and the
pure-text key blocks, and every unpadded block of a full head or an all-text query block) run an unmasked body.

The sequence is padded in the wrapper to a multiple of max(block_q, block_k); padded keys are always masked
out and padded query rows are sliced off.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from dfa2_jax.methods import arrow_mask

_dot = getattr(pltriton, "dot", None) or pl.dot  # jax 0.10: pallas.triton.dot; both take (a, b)

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


# -- autotuning ---------------------------------------------------------------------------------------------

TUNE_CANDIDATES = tuple(ArrowConfig(bq, bk, nw, ns) for bq, bk, nw, ns in (
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3),
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 4), (64, 32, 4, 3), (128, 32, 8, 4)))


def tune_cache_path() -> Path:
    """``$DFA2_ARROW_TUNE_CACHE``, else ``$XDG_CACHE_HOME/dfa2_jax/arrow_tune.json`` (``~/.cache`` default)."""
    env = os.environ.get("DFA2_ARROW_TUNE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dfa2_jax" / "arrow_tune.json"


def tune_key(shape, dtype, text_len: int, text_first: bool, device_kind: str | None = None) -> str:
    """The cache key: device kind, jax version, [B, S, H, D], dtype and token layout."""
    device_kind = device_kind or jax.devices()[0].device_kind
    b, s, h, d = shape
    return (f"{device_kind}|jax{jax.__version__}|B{b}S{s}H{h}D{d}|{jnp.dtype(dtype).name}|"
            f"text{text_len}{'first' if text_first else 'last'}")


@functools.lru_cache(maxsize=8)
def _read_tune_cache(path: str, mtime_ns: int) -> dict:
    del mtime_ns  # part of the memo key: a rewritten file is read again
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}  # unreadable / half-written by an older version: tuning results are only a speed hint
    return data if isinstance(data, dict) else {}


def _tuned_entries(path: Path) -> dict:
    try:
        return _read_tune_cache(str(path), path.stat().st_mtime_ns)
    except OSError:
        return {}


SHIPPED_TUNING = Path(__file__).with_name("arrow_tuned.json")  # autotune results measured here, any jax version


def tuned_config(shape, dtype, text_len: int, text_first: bool) -> ArrowConfig | None:
    """The autotuned config for this shape on this device: the user's on-disk cache first, then the results
    shipped with the package (:data:`SHIPPED_TUNING`, keyed with ``jax*``); None if neither has it."""
    key = tune_key(shape, dtype, text_len, text_first)
    entry = _tuned_entries(tune_cache_path()).get(key)
    if not isinstance(entry, dict):
        parts = key.split("|")
        entry = _tuned_entries(SHIPPED_TUNING).get("|".join([parts[0], "jax*", *parts[2:]]))
    if not isinstance(entry, dict):
        return None
    try:
        return ArrowConfig(**{f.name: int(entry[f.name]) for f in dataclasses.fields(ArrowConfig)})
    except (KeyError, TypeError, ValueError):
        return None


def autotune(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None, candidates=None,
             iters: int = 10, force: bool = False, interpret: bool = False, log=None) -> ArrowConfig:
    """Time every candidate config on these inputs (median of ``iters`` calls after one compile call) and
    store the fastest in the on-disk cache (:func:`tune_cache_path`), which :func:`arrow_attention` then uses
    for this shape whenever it gets no explicit config. Candidates that fail to compile are skipped (and
    reported through ``log``). Returns the cached choice at once unless ``force``. ``interpret`` is for tests."""
    _validate(q, k, v, half_window, text_len, cache, kernel=True)
    key = tune_key(q.shape, q.dtype, text_len, text_first)
    if not force and (hit := tuned_config(q.shape, q.dtype, text_len, text_first)) is not None:
        return hit
    log = log or (lambda msg: None)
    timings = {}
    for cfg in candidates or TUNE_CANDIDATES:
        if cfg.block_q > max(16, pl.next_power_of_2(q.shape[1])):
            continue
        try:
            run = lambda: arrow_attention(q, k, v, half_window, text_len=text_len, text_first=text_first,
                                          cache=cache, config=cfg, interpret=interpret)
            jax.block_until_ready(run())
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - t0)
            timings[cfg] = statistics.median(times)
            log(f"autotune {cfg}: {timings[cfg] * 1e3:.3f} ms")
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is just not a candidate
            log(f"autotune {cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if not timings:
        raise RuntimeError(f"arrow_attention autotune: no candidate config ran for {key}")
    best = min(timings, key=timings.get)
    path = tune_cache_path()
    entries = dict(_tuned_entries(path))
    entries[key] = {**dataclasses.asdict(best), "ms": round(timings[best] * 1e3, 4)}
    from dfa2_jax.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return best


def _text_blocks(seq_len: int, text_len: int, text_first: bool, block_q: int) -> tuple[int, int]:
    """Query blocks [tq0, tq1) holding a text row (empty without text)."""
    if not text_len:
        return 0, 0
    t_lo, t_hi = (0, text_len) if text_first else (seq_len - text_len, seq_len)
    return t_lo // block_q, -(-t_hi // block_q)


def visit_ranges(w, q0, *, s_pad: int, seq_len: int, text_len: int, text_first: bool, block_q: int, block_k: int,
                 has_cache: bool):
    """The key blocks a query tile [q0, q0 + block_q) of a head with half-window ``w`` visits, as six
    ``((lo, hi), masked)`` block ranges (visit order does not matter: online softmax), and whether the head is
    cached (then every range is empty). ``w`` and ``q0`` are int32 scalars inside a kernel, or vectors (one entry
    per program) in the Mosaic GPU wrapper; the rest is static.

    * a tile holding any text row, or a full head: every key block;
    * an image-only tile with image rows [a0, a1]: the text key blocks, then the image key blocks meeting
      [a0 − w, a1 + w] (clipped so that no block is visited twice).

    Blocks where every (row, key) pair of the tile is allowed are unmasked; only edge blocks (band edges,
    text/image boundary, padding) need the element-wise mask.
    """
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    n_kb = s_pad // block_k
    n_img = seq_len - text_len
    off = text_len if text_first else 0  # sequence position of image token 0
    t_lo, t_hi = (0, text_len) if text_first else (n_img, seq_len)  # text positions [t_lo, t_hi)
    q1 = q0 + block_q - 1  # inclusive
    if text_len == 0:
        has_text_row = jnp.bool_(False)
    else:
        has_text_row = (q0 < t_hi) & (q1 >= t_lo)
    n_full = seq_len // block_k  # key blocks holding no padding
    all_text_rows = (q0 >= t_lo) & (q1 < t_hi) if text_len else jnp.bool_(False)
    # Text key blocks [tb0, tb1); the pure-text ones [ti0, ti1) need no mask (every query sees text keys).
    if text_len:
        tb0, tb1 = t_lo // block_k, pl.cdiv(t_hi, block_k)
        ti0, ti1 = pl.cdiv(t_lo, block_k), t_hi // block_k
        ti1 = max(ti1, ti0)
    else:
        tb0 = tb1 = ti0 = ti1 = 0
    # Band key blocks [bb0, bb1) for an image-only query block with image rows [a0, a1].
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
    # Interior band blocks: image keys only, no padding, inside the band of every row: [i0, i1).
    img_kb0, img_kb1 = pl.cdiv(off, block_k), (off + n_img) // block_k
    i0 = jnp.maximum(jnp.maximum(bb0, img_kb0), lax.div(a1 - w + off + block_k - 1, block_k))
    i0 = jnp.minimum(i0, bb1)
    i1 = jnp.minimum(jnp.minimum(bb1, img_kb1), lax.div(a0 + w + off + 1, block_k))
    i1 = jnp.maximum(i1, i0)

    visit_all = (w < 0) | has_text_row
    clean_all = (w < 0) | all_text_rows  # every pair allowed: only padding needs a mask
    cached = (w == 0) if has_cache else jnp.bool_(False)
    empty = (i32(0), i32(0))

    def pick(all_clean, all_masked, image_block):
        """Range for this program: cached heads visit nothing; blocks seeing every key take one of the first
        two; image-only query blocks the third."""
        # Every operand an explicit (non-weak) int32: Pallas-Triton lowers a select of two weak-typed
        # literals with the predicate's type (i1), which breaks the loop bounds.
        out = []
        for j in (0, 1):
            x = jnp.where(visit_all, jnp.where(clean_all, i32(all_clean[j]), i32(all_masked[j])),
                          i32(image_block[j]))
            out.append(jnp.where(cached, i32(0), x))
        return tuple(out)

    ranges = (
        (pick((0, n_full), empty, (ti0, ti1)), False),
        (pick((n_full, n_kb), (0, n_kb), (tb0, ti0)), True),
        (pick(empty, empty, (ti1, tb1)), True),
        (pick(empty, empty, (bb0, i0)), True),
        (pick(empty, empty, (i0, i1)), False),
        (pick(empty, empty, (i1, bb1)), True),
    )
    return ranges, cached


def _program(p, bh_count: int, n_qb: int, tq0: int, tq1: int):
    """Launch index -> (batch·head, query block). Longest jobs first: the query blocks holding text rows (they
    visit every key block) of all heads, then the image-only blocks head by head (neighbouring query blocks of
    one head share their key bands: L2 reuse)."""
    n_txt = tq1 - tq0
    if n_txt == 0:
        return p // n_qb, lax.rem(p, n_qb)
    first = bh_count * n_txt
    early = p < first
    r = jnp.maximum(p - first, 0)
    n_img_qb = n_qb - n_txt
    j = lax.rem(r, n_img_qb) if n_img_qb else r
    bh = jnp.where(early, lax.rem(p, bh_count), r // max(n_img_qb, 1))
    qb = jnp.where(early, tq0 + p // bh_count, jnp.where(j < tq0, j, j + n_txt))
    return bh, qb


def _arrow_kernel(hw_ref, q_ref, k_ref, v_ref, *rest, num_heads: int, seq_len: int, text_len: int,
                  text_first: bool, sm_scale: float, block_q: int, block_k: int, has_cache: bool, bh_count: int,
                  n_qb: int, tq0: int, tq1: int):
    """One (batch·head, query block) program (:func:`_program`). q_ref, o_ref (and cache_ref): [block_q, D]; k_ref, v_ref:
    [S_pad, D] of this batch element and head; hw_ref: [H_pad] int32 half-windows."""
    if has_cache:
        cache_ref, o_ref = rest
    else:
        (o_ref,) = rest
    # Grid (batch·head, query block): the heads of one query block run side by side, and the query blocks
    # holding text rows (every key block: the heaviest programs) are launched first (longest job first).
    bh, qb = _program(pl.program_id(0), bh_count, n_qb, tq0, tq1)
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
    for (r_lo, r_hi), masked in ranges:
        carry = lax.fori_loop(r_lo, r_hi, masked_body if masked else clean_body, carry)
    acc, _, l = carry
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]  # l == 0 only for cached heads / all-padding rows
    if has_cache:
        out = jnp.where(cached, cache_ref[...].astype(jnp.float32), out)
    o_ref[...] = out.astype(o_ref.dtype)


def pad_cache(cache, q, pad):
    """``cache`` padded like ``q`` (already padded), made after ``q``. In a sampler step the cache is a loop-carried
    value that nothing computed in the step feeds, so XLA's GPU scheduler would pad every layer's cache at the top
    of the step and keep all the padded copies alive (SD3 with CFG at 1024²: 24 × 26 MiB); tying the copy to ``q``
    (an optimization barrier) keeps one alive at a time."""
    if all(lo == hi == 0 for lo, hi in pad):
        return cache
    cache, _ = lax.optimization_barrier((cache, q))
    return jnp.pad(cache, pad)


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

    n_qb = s_pad // bq
    tq0, tq1 = _text_blocks(s, text_len, text_first, bq)
    prog = functools.partial(_program, bh_count=b * h, n_qb=n_qb, tq0=tq0, tq1=tq1)

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


BACKENDS = ("auto", "triton", "mosaic")


def backend_choice(q, *, interpret: bool = False, config=None) -> str:
    """"triton" or "mosaic" for this call. An explicit config picks its backend (:class:`ArrowConfig` Triton,
    :class:`~pallas_kernels.arrow_attention_mgpu.MgpuConfig` Mosaic GPU); else ``$DFA2_ARROW_BACKEND``
    (auto | triton | mosaic; default auto). auto takes the Mosaic GPU kernel on Hopper (sm_90) for bf16/f16 with
    head_dim a multiple of 64, and the Triton kernel otherwise; interpret mode (CPU) defaults to Triton."""
    from pallas_kernels import arrow_attention_mgpu as mgpu

    if isinstance(config, ArrowConfig):
        return "triton"
    if isinstance(config, mgpu.MgpuConfig):
        return "mosaic"
    if config is not None:
        raise ValueError(f"arrow_attention: config must be an ArrowConfig (Triton) or MgpuConfig (Mosaic GPU), "
                         f"got {type(config).__name__}")
    choice = os.environ.get("DFA2_ARROW_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"$DFA2_ARROW_BACKEND={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "mosaic" if not interpret and mgpu.supported(q) else "triton"
    return choice


def arrow_schedules(q, half_windows, *, text_len: int, text_first: bool, has_cache: bool, interpret: bool = False,
                    config=None):
    """Launch schedules of many :func:`arrow_attention` calls on q's shape and layout, computed at once:
    half_windows int32 [L, H] -> an array whose row l goes to the call with ``half_windows[l]`` as
    ``schedule=``, or None where the chosen backend needs none (Triton derives its order in the kernel). The
    Mosaic GPU kernel's per-call program table is otherwise computed in each call: a sampler step with a
    schedule per layer compiles one set of small XLA kernels instead of one per layer."""
    if backend_choice(q, interpret=interpret, config=config) != "mosaic":
        return None
    from pallas_kernels.arrow_attention_mgpu import schedules

    return schedules(q, half_windows, text_len=text_len, text_first=text_first, has_cache=has_cache,
                     config=config)


def arrow_attention(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None, sm_scale=None,
                    interpret: bool = False, config=None, schedule=None):
    """Arrow attention with per-head half-windows, one Pallas launch: q, k, v, cache [B, S, H, D] -> [B, S, H, D].

    half_window: int32 [H], runtime data: −1 full, 0 cached when ``cache`` is given (else a band of width 0, see
    the module docstring), w > 0 arrow band over the image tokens. text_first: FLUX [text, image] when True, SD3
    [image, text] when False. sm_scale defaults to D ** −0.5. interpret=True runs the kernel on CPU (tests; it
    does not check the GPU compiler's rules).

    Backend (:func:`backend_choice`): the Mosaic GPU kernel (:mod:`pallas_kernels.arrow_attention_mgpu`:
    warp-specialised, TMA + wgmma) on Hopper, the Triton kernel elsewhere or when ``config`` is an
    :class:`ArrowConfig`. A Triton call without config takes the autotuned choice cached on disk for this shape
    and device (:func:`autotune`), else :func:`heuristic_config`. ``schedule``: this call's row of
    :func:`arrow_schedules` (same config and interpret flag), or None to compute it here.
    """
    _validate(q, k, v, half_window, text_len, cache, kernel=True)
    _, s, _, d = q.shape
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    if backend_choice(q, interpret=interpret, config=config) == "mosaic":
        from pallas_kernels.arrow_attention_mgpu import arrow_attention_mgpu

        return arrow_attention_mgpu(q, k, v, half_window, text_len=text_len, text_first=text_first, cache=cache,
                                    sm_scale=sm_scale, interpret=interpret, config=config, schedule=schedule)
    if config is None:
        config = (None if interpret else tuned_config(q.shape, q.dtype, text_len, text_first)) or \
            heuristic_config(s, d, q.dtype)
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
