"""Pieces shared by the SD3 and FLUX MMDiTs: linear, norms, AdaLN, timestep embeddings, feed-forward,
attention projections, RoPE.

Attribute names mirror diffusers (``to_q``, ``add_k_proj``, ``to_add_out``, ``norm_added_q``, ``linear_1``,
``net``, ...) so the converter is a rename table. Leaves: ``Linear.kernel`` [in, out] (torch weight
transposed), ``Linear.bias``, ``RMSNorm.scale``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfa2_jax.models.attention import AttentionRuntime, TokenLayout, joint_attention
from dfa2_jax.parallel.mesh import head_split_rows, heads_axis_size, heads_replicated, token_split


class Linear(nnx.Module):
    """y = x @ kernel + bias with torch.nn.Linear's default init (uniform ±1/sqrt(in))."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        self.kernel = nnx.Param(
            jax.random.uniform(rngs.params(), (in_features, out_features), dtype, -bound, bound))
        self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (out_features,), dtype, -bound, bound))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x, self.kernel[...])

    def _apply(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(kernel.dtype), kernel)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def own_input(self, x: jax.Array) -> jax.Array:
        """``self(x)`` with ``x`` tied to this layer's kernel (an optimization barrier), so XLA keeps it a dot of
        its own. XLA merges dots that share an operand (every block's modulation of the same SiLU(temb); q, k, v
        and the MLP of one input) by concatenating the merged layers' weights into one matrix at every step (2.3
        GB for FLUX.1's modulations), then reading them again."""
        kernel, x = jax.lax.optimization_barrier((self.kernel[...], x))
        return self._apply(x, kernel)

    def concat_in(self, parts: Sequence[jax.Array]) -> jax.Array:
        """``self(jnp.concatenate(parts, -1))``. Under a mesh's ``heads`` axis: one dot per part on its own rows
        of the kernel (partial sums in f32), without the concatenated input, so that each part may be split on
        its last dim (head-split attention output, column-split MLP hidden) and the partials summed across it.

        Otherwise one dot over the concatenation: XLA writes the parts' producers straight into it, and slicing
        the kernel instead would copy its row blocks and send the partial sums through memory in f32 (FLUX.1's
        single blocks: ~0.4 GB of extra traffic per block at 1024²)."""
        if heads_axis_size() <= 1:
            return self(jnp.concatenate(parts, -1))
        kernel = heads_replicated(self.kernel[...])
        acc, row = None, 0
        for x in parts:
            n = x.shape[-1]
            # The row slice is a copy of part of a weight that depends on nothing computed: XLA's GPU scheduler
            # then runs every layer's slices at the top of the sampler's step and keeps them all alive (3.4 GiB
            # for FLUX.1's 38 single blocks). Tying the weight to this part's input makes the slice wait for it.
            kernel, x = jax.lax.optimization_barrier((kernel, x))
            # Under a mesh's heads axis every part comes split on its features (head-split attention output,
            # column-split MLP hidden): each device takes its own rows of the part's block.
            y = jnp.dot(x.astype(kernel.dtype), head_split_rows(kernel[row:row + n]),
                        preferred_element_type=jnp.float32)
            acc, row = (y if acc is None else acc + y), row + n
        if row != kernel.shape[0]:
            raise ValueError(f"parts have {row} features in all; the kernel has {kernel.shape[0]} rows")
        y = acc.astype(kernel.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters (diffusers' ``elementwise_affine=False``), statistics in f32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """diffusers/torch RMSNorm over the last axis: x * rsqrt(mean(x²) + eps) * scale, statistics in f32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """RMSNorm of ``x``; with ``rope`` (cos, sin) [S, D], then the rotary embedding (:func:`apply_rope`) of
        the result, x [B, S, H, D], rounded to x's dtype once at the end.

        The rotation swaps and negates the elements of each pair; done on the input (an exact shuffle of x)
        rather than on the normalised value, norm and rotation are one fusion for XLA, whose normalisation
        fusions do not take the shuffle: otherwise the normalised q and k went through memory in f32."""
        xf = x.astype(jnp.float32)
        r = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if rope is None:
            return (xf * r * scale).astype(x.dtype)
        cos, sin = rope
        # rope(n) = n·cos + rotate(n)·sin, n = x·r·scale, rotate(v)[2i] = -v[2i+1], rotate(v)[2i+1] = v[2i];
        # rotate(n) = r · rotate(x) · swap(scale), where swap exchanges each pair.
        rotated = _rotate_pairs(x).astype(jnp.float32)
        swapped = scale.reshape(-1, 2)[:, ::-1].reshape(-1)
        out = (xf * scale * cos[None, :, None, :] + rotated * swapped * sin[None, :, None, :]) * r
        return out.astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding as diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.

    t: [B] (fractional allowed) -> [B, dim] float32, order [cos, sin].
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_channels: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_channels, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TextProjection(nnx.Module):
    """diffusers ``PixArtAlphaTextProjection(act_fn="silu")``: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_features: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """temb = timestep_embedder(sin(t)) [+ guidance_embedder(sin(g))] + text_embedder(pooled)."""

    def __init__(self, dim: int, pooled_projection_dim: int, *, guidance: bool = False, dtype,
                 rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs) if guidance else None
        self.text_embedder = TextProjection(pooled_projection_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
        emb = self.timestep_embedder(timestep_embedding(timestep).astype(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model has a guidance embedding: `guidance` must be given")
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).astype(pooled.dtype))
        elif guidance is not None:
            raise ValueError("this model has no guidance embedding (e.g. FLUX.1-schnell): `guidance` must be None")
        return emb + self.text_embedder(pooled)


class AdaLayerNormZero(nnx.Module):
    """SiLU -> Linear(D, n·D) -> chunks; n = 6 (AdaLayerNormZero), 9 (SD35AdaLayerNormZeroX),
    3 (AdaLayerNormZeroSingle). Returns the chunks; callers modulate (order as in diffusers)."""

    def __init__(self, dim: int, chunks: int, *, dtype, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim, dtype=dtype, rngs=rngs)

    def __call__(self, emb: jax.Array) -> list[jax.Array]:
        out = self.linear.own_input(jax.nn.silu(emb))  # [B, n·D]
        return [c[:, None, :] for c in jnp.split(out, self.chunks, axis=-1)]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class AdaLayerNormContinuous(nnx.Module):
    """diffusers ``AdaLayerNormContinuous``: Linear(SiLU(c)) -> (scale, shift) — note the order."""

    def __init__(self, dim: int, cond_dim: int, *, dtype, rngs: nnx.Rngs):
        self.linear = Linear(cond_dim, 2 * dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear.own_input(jax.nn.silu(cond).astype(x.dtype)), 2, axis=-1)
        return modulate(layer_norm(x), shift[:, None, :], scale[:, None, :])


class GELUProj(nnx.Module):
    """diffusers ``GELU(approximate="tanh")``: the ``proj`` linear then tanh-GELU."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: net.0 (GELU proj), net.2 (Linear)."""

    def __init__(self, dim: int, *, mult: int = 4, dtype, rngs: nnx.Rngs):
        # net[1] is dropout in diffusers; kept as a None slot so indices (and checkpoint keys) line up.
        self.net = nnx.List([GELUProj(dim, mult * dim, dtype=dtype, rngs=rngs), None,
                             Linear(mult * dim, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


def _rotate_pairs(x: jax.Array) -> jax.Array:
    """(x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) on the last axis (exact in any dtype): each pair reversed, its first
    element negated (a reverse and a multiply, which fuse with their neighbours; a stack would be a concatenate)."""
    swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    sign = jnp.tile(jnp.asarray([-1, 1], x.dtype), x.shape[-1] // 2)
    return swapped * sign


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """FLUX rotary embedding on interleaved pairs (x[2i], x[2i+1]); x: [B, S, H, D], cos/sin: [S, D]."""
    xf = x.astype(jnp.float32)
    out = xf * cos[None, :, None, :] + _rotate_pairs(xf) * sin[None, :, None, :]
    return out.astype(x.dtype)


def rope_frequencies(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float = 10000.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """FLUX RoPE tables from position ids [S, n_axes] (host, float64 as diffusers) -> cos, sin [S, D] f32."""
    ids = np.asarray(ids, dtype=np.float64)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"ids must have shape [S, {len(axes_dims)}]; got {ids.shape}")
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim/2]
        angles = np.outer(ids[:, axis], freqs)  # [S, dim/2]
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return (np.concatenate(cos, axis=1).astype(np.float32), np.concatenate(sin, axis=1).astype(np.float32))


class Attention(nnx.Module):
    """Projections around one attention site (diffusers ``Attention`` / ``FluxAttention``).

    ``added_kv``: the text stream's add_{q,k,v}_proj (+ ``to_add_out`` unless ``context_pre_only``).
    ``pre_only``: no ``to_out`` (FLUX single blocks). ``qk_norm``: RMSNorm(head_dim) on q/k (and the
    added ones). The attention itself goes through :func:`joint_attention` with this site's ``layer``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, added_kv: bool = False,
                 context_pre_only: bool = False, pre_only: bool = False, qk_norm: bool = False,
                 dtype, rngs: nnx.Rngs):
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = Linear(dim, inner, dtype=dtype, rngs=rngs)
        self.to_k = Linear(dim, inner, dtype=dtype, rngs=rngs)
        self.to_v = Linear(dim, inner, dtype=dtype, rngs=rngs)
        self.norm_q = RMSNorm(head_dim, dtype=dtype) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, dtype=dtype) if qk_norm else None
        self.to_out = None if pre_only else nnx.List([Linear(inner, dim, dtype=dtype, rngs=rngs)])
        if added_kv:
            self.add_q_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
            self.add_k_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
            self.add_v_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
            self.norm_added_q = RMSNorm(head_dim, dtype=dtype) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim, dtype=dtype) if qk_norm else None
            self.to_add_out = None if context_pre_only else Linear(inner, dim, dtype=dtype, rngs=rngs)
        else:
            self.add_q_proj = self.add_k_proj = self.add_v_proj = None
            self.norm_added_q = self.norm_added_k = self.to_add_out = None

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)  # [B, S, H, D]

    def _qkv(self, x: jax.Array, q_proj, k_proj, v_proj, norm_q, norm_k, rope):
        """q, k, v [B, S, H, D] of one stream; ``rope``: this stream's rows of the (cos, sin) tables, or None."""
        # Each projection its own dot (Linear.own_input): XLA otherwise merges the dots that share x, which copies
        # their weights into one matrix at every step (FLUX.1: 4.6 ms of a 137 ms step at 1024² on an H100).
        q, k, v = (self._heads(p.own_input(x)) for p in (q_proj, k_proj, v_proj))
        if norm_q is not None:
            q, k = norm_q(q, rope), norm_k(k, rope)
        elif rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, layer: int, text_first: bool,
                 rope: tuple[jax.Array, jax.Array] | None = None, joint_text_len: int = 0,
                 runtime: AttentionRuntime | None = None) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, N, dim] (image or joint stream), context: [B, T, dim] text stream or None.

        Returns (image/joint output after ``to_out`` when present, text output after ``to_add_out`` or
        None). ``text_first`` is the joint order: True [text, image] (FLUX), False [image, text] (SD3).
        ``joint_text_len``: when ``context`` is None but ``x`` already is a joint sequence (FLUX single
        blocks), how many of its tokens are text.
        """
        def compute():
            text_len = joint_text_len if context is None else context.shape[1]
            x_rope = ctx_rope = rope
            if rope is not None and context is not None:  # the tables cover the joint sequence: split them
                n_img = x.shape[1]
                rows = (slice(text_len, None), slice(0, text_len)) if text_first else (slice(0, n_img),
                                                                                      slice(n_img, None))
                x_rope, ctx_rope = ((rope[0][r], rope[1][r]) for r in rows)
            q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, x_rope)
            if context is not None:
                cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                       self.norm_added_q, self.norm_added_k, ctx_rope)
                order = (lambda a, b: (b, a)) if text_first else (lambda a, b: (a, b))
                q, k, v = (jnp.concatenate(order(a, b), axis=1) for a, b in ((q, cq), (k, ck), (v, cv)))
            # Computed on the token split (a mesh's seq axis) and moved to the head split inside attention by
            # an all-to-all. Without the constraint the partitioner gathered the tokens of q, k, v instead, and
            # inside a skippable layer's lax.cond (where the stream's split is not seen) sliced the weights by
            # heads, every slice kept alive for the whole step by the scheduler.
            q, k, v = token_split(q), token_split(k), token_split(v)
            out = joint_attention(q, k, v, layer=layer, layout=TokenLayout(text_len, text_first), runtime=runtime)
            out = out.reshape(*out.shape[:2], -1)  # [B, S, H·D]
            ctx_out = None
            if context is not None:
                n_img = x.shape[1]
                if text_first:
                    ctx_out, out = out[:, :text_len], out[:, text_len:]
                else:
                    out, ctx_out = out[:, :n_img], out[:, n_img:]
                ctx_out = token_split(ctx_out)  # back to the token split (seq axis) before the projection
            out = token_split(out)
            if context is not None:
                if self.to_add_out is not None:
                    ctx_out = self.to_add_out(ctx_out)
            if self.to_out is not None:
                out = self.to_out[0](out)
            return out, ctx_out

        if runtime is None:
            return compute()
        # The runtime may skip the whole site (projections included) when every head is cached.
        return runtime.run_layer(layer, compute)
