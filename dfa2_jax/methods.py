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
