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
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


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


BATCH_AXES = ("cfg", "data")  # mesh axes that split the model batch, major first (dfa2_jax.sharding)
HEADS_AXIS = "heads"


def per_device(fn: Callable[..., jax.Array], bshd: Sequence[jax.Array], per_head: Sequence[jax.Array] = ()):
    """``fn(*bshd, *per_head)`` -> [B, S, H, D], run on each device's own batch rows and heads under the context
    mesh (``jax.set_mesh``; :func:`dfa2_jax.sharding.shard_denoise` sets it), else called as is.

    Attention is independent per (batch row, head), so it needs no collectives: ``jax.shard_map`` splits the
    [B, S, H, D] operands on B over the mesh's ``cfg``/``data`` axes and on H over ``heads``, and the [H]
    operands on ``heads``. Custom calls (the Pallas kernel, cuDNN) then see local shapes instead of being
    gathered by the partitioner. An axis that does not divide its dim is left replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*bshd, *per_head)
    sizes = dict(mesh.shape)
    b, h = bshd[0].shape[0], bshd[0].shape[2]
    batch = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if batch and b % math.prod(sizes[a] for a in batch):
        batch = ()
    heads = HEADS_AXIS if sizes.get(HEADS_AXIS, 1) > 1 and h % sizes[HEADS_AXIS] == 0 else None
    if not batch and heads is None:
        return fn(*bshd, *per_head)
    x, hs = P(batch or None, None, heads, None), P(heads)
    return jax.shard_map(fn, mesh=mesh, in_specs=(x,) * len(bshd) + (hs,) * len(per_head), out_specs=x,
                         check_vma=False)(*bshd, *per_head)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """Non-causal scaled dot-product attention, q/k/v and output [B, S, H, D], scale 1/sqrt(D); per device
    under a context mesh (:func:`per_device`)."""
    impl = implementation or _pick_implementation(q)
    return per_device(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl), (q, k, v))


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
