"""The arrow mask (the one definition) and the pure-jnp arrow attention every backend is checked against.

Semantics: with S = text_len + N_img tokens, query i sees key j iff i is text, or j is text, or both are image
tokens with |img(i) − img(j)| ≤ w, w the head's half-window:

* ``w == -1`` (any w < 0): full attention;
* ``w == 0`` with ``cache`` given: the head is cached, its output is copied from ``cache`` (no compute);
* ``w == 0`` with ``cache=None``: there are no cached heads; w = 0 is then a band of width 0 (each image query
  sees itself and the text keys). ``half_window`` is runtime data, so this cannot be checked at trace time:
  a caller whose plan may hold cached heads must pass ``cache``;
* ``w > 0``: the arrow band.

Token layout: ``text_first`` True is FLUX's [text, image], False SD3's [image, text].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .common import on_cache_rows, validate


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


def arrow_attention_reference(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None,
                              sm_scale=None):
    """Pure-jnp arrow attention (O(S²) memory), the same arguments and cache rule as
    :func:`pallas_kernels.arrow_attention`: q, k, v [B, S, H, D], cache [B, S' >= S, H, D], half_window int32 [H]
    -> [B, S (S' with a cache), H, D]. Softmax and both matmuls in float32 at HIGHEST precision; sm_scale defaults
    to D ** −0.5."""
    validate(q, k, v, half_window, text_len, cache, kernel=False)
    return on_cache_rows(lambda c: _reference(q, k, v, half_window, text_len, text_first, c, sm_scale), q, cache)


def _reference(q, k, v, half_window, text_len, text_first, cache, sm_scale):
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
