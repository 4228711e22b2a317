"""The compression methods of a plan: names, codes, masks, and the pure reference functions.

Method names (shared/DESIGN.md): ``full``; ``arrow:k`` (1-D band of half-width N_img//(2k) over the
flattened image tokens, text rows and columns kept); ``cache`` (the head's attention output, before the output
projection, from the previous step); ``wars:k`` (V1 window attention + the residual full − window stored at
the head's last full step); ``cfg_share`` and ``cfg_share+arrow:k`` (SD3 only: the conditional half's output,
full or arrow, is used for both CFG halves).

In the runtime every (step, layer, head) is an int code plus a half-window in tokens for the actual
resolution; this module is the single place that maps names to those numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

FULL, ARROW, CACHE, WARS, CFG_SHARE, CFG_SHARE_ARROW = range(6)
CODE_NAMES = {FULL: "full", ARROW: "arrow", CACHE: "cache", WARS: "wars", CFG_SHARE: "cfg_share",
              CFG_SHARE_ARROW: "cfg_share+arrow"}
WINDOWED = (ARROW, WARS, CFG_SHARE_ARROW)  # codes whose k sets a band
CFG_CODES = (CFG_SHARE, CFG_SHARE_ARROW)

_NAME = re.compile(r"^(full|cache|cfg_share|arrow:(\d+)|wars:(\d+)|cfg_share\+arrow:(\d+))$")


@dataclasses.dataclass(frozen=True, slots=True)
class Method:
    code: int
    k: int = 0  # the band is N_img / k wide (half-width N_img // (2k)); 0 for methods without a band

    @property
    def name(self) -> str:
        base = CODE_NAMES[self.code]
        return f"{base}:{self.k}" if self.code in WINDOWED else base

    def half_window(self, n_img: int) -> int:
        """Half-width in image tokens for ``n_img`` image tokens; -1 for no band (full / cache / cfg_share)."""
        return n_img // (2 * self.k) if self.code in WINDOWED else -1


def parse_method(name: str) -> Method:
    """``"arrow:8"`` -> Method(ARROW, 8). Raises ValueError naming the method for anything else."""
    m = _NAME.match(name.strip()) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown method {name!r}: expected full, cache, cfg_share, arrow:K, wars:K or "
                         "cfg_share+arrow:K with an integer K >= 1")
    k = int(m.group(2) or m.group(3) or m.group(4) or 0)
    if name.startswith(("arrow:", "wars:", "cfg_share+arrow:")) and k < 1:
        raise ValueError(f"method {name!r}: K must be >= 1")
    base = name.split(":")[0]
    code = {"full": FULL, "cache": CACHE, "cfg_share": CFG_SHARE, "arrow": ARROW, "wars": WARS,
            "cfg_share+arrow": CFG_SHARE_ARROW}[base]
    return Method(code, k)


def token_roles(seq_len: int, text_len: int, text_first: bool):
    """(is_text [S] bool, image index [S] int: position among image tokens, undefined for text) as jnp."""
    idx = jnp.arange(seq_len)
    if text_first:
        is_text = idx < text_len
        img = idx - text_len
    else:
        is_text = idx >= seq_len - text_len
        img = idx
    return is_text, img


def arrow_mask(seq_len: int, text_len: int, text_first: bool, half_window) -> jax.Array:
    """Allowed (query, key) pairs, bool [..., S, S] for half-window(s) ``half_window`` (scalar or [H]).

    Query i sees key j iff i is text, or j is text, or both are image tokens with |img(i) − img(j)| ≤ w.
    A negative w means full attention (all pairs).
    """
    w = jnp.asarray(half_window)[..., None, None]
    is_text, img = token_roles(seq_len, text_len, text_first)
    band = jnp.abs(img[:, None] - img[None, :]) <= w
    return (w < 0) | is_text[:, None] | is_text[None, :] | band


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention with a per-head mask: q, k, v [B, S, H, D], mask [H, S, S] -> [B, S, H, D].

    Softmax in float32; every row keeps at least its text keys (or, without text, its own position), so no
    row is empty.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    logits = jnp.where(mask[None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


def arrow_attention_reference(q, k, v, half_window, *, text_len: int, text_first: bool) -> jax.Array:
    """The pure-jnp arrow attention: per-head half-windows [H] (−1 = full)."""
    return masked_attention(q, k, v, arrow_mask(q.shape[1], text_len, text_first, half_window))


def brute_force_mask(seq_len: int, text_len: int, text_first: bool, half_window: int) -> np.ndarray:
    """The official formula written as loops (tests): (|q − kv| ≤ window//2) | q is text | kv is text, indices
    over image tokens, window = 2·half_window (so window//2 = half_window)."""
    n_img = seq_len - text_len
    out = np.zeros((seq_len, seq_len), bool)
    for i in range(seq_len):
        for j in range(seq_len):
            if text_first:
                qi_text, kj_text, qi, kj = i < text_len, j < text_len, i - text_len, j - text_len
            else:
                qi_text, kj_text, qi, kj = i >= n_img, j >= n_img, i, j
            out[i, j] = half_window < 0 or qi_text or kj_text or abs(qi - kj) <= half_window
    return out


def arrow_attention_banded(q: jax.Array, k: jax.Array, v: jax.Array, half_window: int, *, text_len: int,
                           text_first: bool, block: int = 256) -> jax.Array:
    """Arrow attention with one static half-window for every head, in O(S·(T + block + 2w)) memory and work
    instead of O(S²): the same function as :func:`arrow_attention_reference` (tests compare them).

    Text query rows attend to every key (dense attention). Image query rows attend to the text keys and to
    the image keys of their band; the band is computed per block of ``block`` queries against the
    ``block + 2w`` image keys around it, and the two parts are merged with a shared max (log-sum-exp).
    q, k, v: [B, S, H, D] -> [B, S, H, D].
    """
    from dfa2_jax.models.attention import dense_attention

    b, s, h, d = q.shape
    n = s - text_len
    w = int(half_window)
    if w < 0:
        return dense_attention(q, k, v)
    if text_first:
        qt, qi = q[:, :text_len], q[:, text_len:]
        kt, ki, vt, vi = k[:, :text_len], k[:, text_len:], v[:, :text_len], v[:, text_len:]
    else:
        qi, qt = q[:, :n], q[:, n:]
        ki, kt, vi, vt = k[:, :n], k[:, n:], v[:, :n], v[:, n:]
    scale = d ** -0.5
    bq = min(block, n)
    nb = -(-n // bq)
    span = bq + 2 * w
    pad_q = nb * bq - n
    qi_b = jnp.pad(qi, ((0, 0), (0, pad_q), (0, 0), (0, 0))).reshape(b, nb, bq, h, d)
    kpad = jnp.pad(ki, ((0, 0), (w, w + pad_q), (0, 0), (0, 0)))
    vpad = jnp.pad(vi, ((0, 0), (w, w + pad_q), (0, 0), (0, 0)))
    idx = (jnp.arange(nb) * bq)[:, None] + jnp.arange(span)[None, :]  # [nb, span] into the padded keys
    kb, vb = kpad[:, idx], vpad[:, idx]  # [B, nb, span, H, D]
    f32 = jnp.float32
    lb = jnp.einsum("bnqhd,bnkhd->bnhqk", qi_b, kb, preferred_element_type=f32) * scale  # [B, nb, H, bq, span]
    qpos = (jnp.arange(nb) * bq)[:, None] + jnp.arange(bq)[None, :]  # [nb, bq] image index of the query
    kpos = (jnp.arange(nb) * bq)[:, None] + jnp.arange(span)[None, :] - w  # [nb, span] image index of the key
    ok = (jnp.abs(qpos[:, :, None] - kpos[:, None, :]) <= w) & (kpos[:, None, :] >= 0) & (kpos[:, None, :] < n)
    lb = jnp.where(ok[None, :, None], lb, -jnp.inf)
    parts_m = [jnp.max(lb, axis=-1)]
    if text_len:
        lt = jnp.einsum("bnqhd,bkhd->bnhqk", qi_b, kt, preferred_element_type=f32) * scale  # [B, nb, H, bq, T]
        parts_m.append(jnp.max(lt, axis=-1))
    m = functools.reduce(jnp.maximum, parts_m)[..., None]  # every image row sees itself: finite
    pb = jnp.exp(lb - m)
    num = jnp.einsum("bnhqk,bnkhd->bnqhd", pb.astype(v.dtype), vb, preferred_element_type=f32)
    den = jnp.sum(pb, axis=-1)
    if text_len:
        pt = jnp.exp(lt - m)
        num = num + jnp.einsum("bnhqk,bkhd->bnqhd", pt.astype(v.dtype), vt, preferred_element_type=f32)
        den = den + jnp.sum(pt, axis=-1)
    oi = (num / jnp.transpose(den, (0, 1, 3, 2))[..., None]).reshape(b, nb * bq, h, d)[:, :n].astype(q.dtype)
    if not text_len:
        return oi
    ot = dense_attention(qt, k, v)
    return jnp.concatenate([ot, oi] if text_first else [oi, ot], axis=1)
