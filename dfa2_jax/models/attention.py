"""The one joint-attention entry point shared by every MMDiT in dfa2_jax.

Every attention site of the SD3 and FLUX models calls :func:`joint_attention` with its layer index and the
token layout of the joint sequence. Without a runtime it is dense attention; the compression runtime (plan
issue) plugs in as ``runtime`` and applies per-head methods (full / arrow / cache / ...) there, so the
models never change when a plan is active.

Layouts (shared/DESIGN.md): SD3 joint sequence = [image, text] (``text_first=False``);
FLUX = [text, image] (``text_first=True``). An image-only self-attention (SD3.5 ``attn2``) has
``text_len=0``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp


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
    """Non-causal scaled dot-product attention, q/k/v and output [B, S, H, D], scale 1/sqrt(D)."""
    impl = implementation or _pick_implementation(q)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


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
