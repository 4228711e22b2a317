"""The one joint-attention entry point shared by every MMDiT in dfa2_jax.

Every attention site of the SD3 and FLUX models calls :func:`joint_attention` with its layer index and the
token layout of the joint sequence. Without a runtime it is dense attention; the compression runtime
(:class:`dfa2_jax.runtime.PlanRuntime`) plugs in as ``runtime`` and applies per-head methods (full / arrow / cache /
...) there, so the models never change when a plan is active.

Layouts: SD3 joint sequence = [image, text] (``text_first=False``);
FLUX = [text, image] (``text_first=True``). An image-only self-attention (SD3.5 ``attn2``) has
``text_len=0``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from dfa2_jax.parallel.mesh import per_device


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLayout:
    """Where the text tokens sit in a joint sequence of ``text_len + N_img`` tokens."""

    text_len: int
    text_first: bool


class AttentionRuntime(Protocol):
    """What the compression runtime implements (``dfa2_jax.runtime.PlanRuntime``)."""

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int, layout: TokenLayout) -> jax.Array:
        """Per-head attention output [B, S, H, D] of ``layer`` under this step's plan."""

    def run_layer(self, layer: int, compute):
        """Run (or skip) a whole attention site: ``compute() -> (out, ctx)`` with projections."""


_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _pick_implementation(q: jax.Array) -> str:
    """cuDNN flash attention on NVIDIA GPUs for half dtypes with a head_dim it supports; XLA elsewhere."""
    head_dim = q.shape[-1]
    if (
        jax.default_backend() == "gpu"
        and q.dtype in _CUDNN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "xla"


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """Non-causal scaled dot-product attention, q/k/v and output [B, S, H, D], scale 1/sqrt(D); per device
    under a context mesh (:func:`per_device`)."""
    impl = implementation or _pick_implementation(q)
    return per_device(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl), (q, k, v))


def arrow_attention_banded(q: jax.Array, k: jax.Array, v: jax.Array, half_window: int, *, text_len: int,
                           text_first: bool, block: int = 256) -> jax.Array:
    """Arrow attention with one static half-window for every head, in O(S·(T + block + 2w)) memory and work
    instead of O(S²): the same function as :func:`pallas_kernels.arrow_attention_reference` (tests compare them). Calibration uses it to
    probe one method on every head of a layer at once.

    Text query rows attend to every key (dense attention). Image query rows attend to the text keys and to
    the image keys of their band; the band is computed per block of ``block`` queries against the
    ``block + 2w`` image keys around it, and the two parts are merged with a shared max (log-sum-exp).
    q, k, v: [B, S, H, D] -> [B, S, H, D].
    """
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


def joint_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    layer: int,
    layout: TokenLayout,
    runtime: AttentionRuntime | None = None,
) -> jax.Array:
    """Attention of one layer over the joint sequence; q, k, v, out: [B, S, H, D].

    ``layer`` is the attention site's index in the model's ``attention_layer_names()`` order; ``layout``
    tells where the text tokens are. ``runtime`` (None = dense) applies a compression plan.
    """
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape [B, S, H, D]; got {q.shape=}, {k.shape=}, {v.shape=}")
    if not 0 <= layout.text_len <= q.shape[1]:
        raise ValueError(f"{layout.text_len=} must lie in [0, S={q.shape[1]}]")
    if runtime is None:
        return dense_attention(q, k, v)
    return runtime(q, k, v, layer=layer, layout=layout)
