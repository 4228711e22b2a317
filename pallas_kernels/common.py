"""What both arrow-attention backends share: input validation, the visit schedule of a query tile, the
longest-job-first launch order, and the cache padding (a cache longer than the sequence: :func:`on_cache_rows`).

Visit schedule (FLUX layout: text first; SD3 layout: text last). Each program (one query tile of one batch
element and head) reads its head's half-window w as runtime data and derives the key blocks it must visit:

* a query block holding any text row, or a full head: every key block;
* an image-only query block with image rows [a0, a1]: the text key blocks, then the image key blocks meeting
  [a0 − w, a1 + w] (clipped so that no block is visited twice) — two ``lax.fori_loop`` ranges at most;
* a cached head: no key block (the cache block is written).

Key blocks outside a head's band are never loaded. Only edge blocks are masked element-wise: key blocks fully
inside every row's band (and the pure-text key blocks, and every unpadded block of a full head or an all-text
query block) run an unmasked body.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def validate(q, k, v, half_window, text_len, cache, *, kernel: bool):
    """Raise ValueError (naming the argument) unless q, k, v, cache are [B, S, H, D] of one supported dtype,
    half_window is int32 [H] and text_len a static int in [0, S). ``kernel``: also require the kernels' head_dim
    (a power of two >= 16)."""
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
    if cache is not None and (getattr(cache, "ndim", None) != 4 or cache.shape[::2] != q.shape[::2]
                              or cache.shape[3] != d or cache.shape[1] < s):
        raise ValueError(f"arrow_attention: cache must be [B, S', H, D] = [{b}, S' >= {s}, {h}, {d}], got "
                         f"{getattr(cache, 'shape', None)}")


def text_blocks(seq_len: int, text_len: int, text_first: bool, block_q: int) -> tuple[int, int]:
    """Query blocks [tq0, tq1) holding a text row (empty without text)."""
    if not text_len:
        return 0, 0
    t_lo, t_hi = (0, text_len) if text_first else (seq_len - text_len, seq_len)
    return t_lo // block_q, -(-t_hi // block_q)


MASK_KINDS = ("clean", "tail", "band", "general")


def visit_ranges(w, q0, *, s_pad: int, seq_len: int, text_len: int, text_first: bool, block_q: int, block_k: int,
                 has_cache: bool):
    """The key blocks a query tile [q0, q0 + block_q) of a head with half-window ``w`` visits, as seven
    ``((lo, hi), mask)`` block ranges (visit order does not matter: online softmax), and whether the head is
    cached (then every range is empty). ``w`` and ``q0`` are int32 scalars inside a kernel, or vectors (one entry
    per program) in the Mosaic GPU wrapper; the rest is static.

    * a tile holding any text row, or a full head: every key block;
    * an image-only tile with image rows [a0, a1]: the text key blocks, then the image key blocks meeting
      [a0 − w, a1 + w] (clipped so that no block is visited twice).

    ``mask`` (static, one of :data:`MASK_KINDS`) is the element-wise test a range's blocks need: "clean" none
    (every (row, key) pair of the tile allowed), "tail" keys past the sequence only (the padded last block, where
    every real key is allowed), "band" the band test of image rows and image keys (band edges), "general" the whole
    arrow test (text/image boundary blocks, tiles with both image and text rows). Padding rows (past the sequence,
    sliced off by the wrappers) count as text rows in the text-last layout, so that the last tile of an SD3-like
    sequence is a pure text tile.
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
    all_text_rows = (q0 >= t_lo) & (jnp.minimum(q1, seq_len - 1) < t_hi) if text_len else jnp.bool_(False)
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
        (pick((0, n_full), empty, (ti0, ti1)), "clean"),
        (pick((n_full, n_kb), empty, empty), "tail"),
        (pick(empty, (0, n_kb), (tb0, ti0)), "general"),
        # After the pure-text key blocks: text-last, only text keys and padding; text-first, the boundary block
        (pick(empty, empty, (ti1, tb1)), "general" if text_first else "tail"),
        (pick(empty, empty, (bb0, i0)), "band"),
        (pick(empty, empty, (i0, i1)), "clean"),
        (pick(empty, empty, (i1, bb1)), "band"),
    )
    return ranges, cached


def launch_order(p, bh_count: int, n_qb: int, tq0: int, tq1: int):
    """Launch index -> (batch·head, query block). Longest jobs first: the query blocks holding text rows (they
    visit every key block) of all heads, then the image-only blocks head by head (neighbouring query blocks of
    one head share their key bands: L2 reuse). [tq0, tq1): :func:`text_blocks`."""
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


def pad_cache(cache, q, pad):
    """``cache`` padded like ``q`` (already padded), made after ``q``. In a sampler step the cache is a loop-carried
    value that nothing computed in the step feeds, so XLA's GPU scheduler would pad every layer's cache at the top
    of the step and keep all the padded copies alive (SD3 with CFG at 1024²: 24 × 26 MiB); tying the copy to ``q``
    (an optimization barrier) keeps one alive at a time."""
    if all(lo == hi == 0 for lo, hi in pad):
        return cache
    cache, _ = lax.optimization_barrier((cache, q))
    return jnp.pad(cache, pad)


def on_cache_rows(call, q, cache, in_place_rows: int | None = None):
    """``call(cache)`` made to follow the op's cache rule, that the output has the cache's rows: a cache of q's S
    rows, or of ``in_place_rows`` (a backend's own padded length, which ``call`` takes and returns as it is), goes
    to ``call`` unchanged; any other longer cache (S' > S) goes cut to S rows and the output is padded back to S'
    rows (zeros past S)."""
    s = q.shape[1]
    if cache is None or cache.shape[1] in (s, in_place_rows):
        return call(cache)
    return jnp.pad(call(cache[:, :s]), ((0, 0), (0, cache.shape[1] - s), (0, 0), (0, 0)))
