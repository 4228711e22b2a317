"""SD3 / SD3.5 MMDiT in Flax NNX, mirroring diffusers' ``SD3Transformer2DModel`` (names and math).

Joint attention order is [image, text] (``text_first=False``). The last block is ``context_pre_only``: its
text stream gets an ``AdaLayerNormContinuous`` and no output projection / feed-forward. SD3.5-medium's dual
blocks add an image-only self-attention ``attn2`` after the joint attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dfa2_jax.models.attention import AttentionRuntime
from dfa2_jax.parallel.mesh import token_split
from dfa2_jax.models.configs import SD3Config
from dfa2_jax.models.layers import (AdaLayerNormContinuous, AdaLayerNormZero, Attention,
                                    CombinedTimestepTextProjEmbeddings, FeedForward, Linear, layer_norm,
                                    modulate)


class PatchProj(nnx.Module):
    """diffusers' ``Conv2d(C, D, kernel_size=p, stride=p)`` weights: kernel HWIO [p, p, C, D], bias [D]."""

    def __init__(self, p: int, c: int, d: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (p, p, c, d), dtype) * (p * p * c) ** -0.5)
        self.bias = nnx.Param(jnp.zeros((d,), dtype))


class PatchEmbed(nnx.Module):
    """Conv(k = s = patch) as a matmul over patches + the centre-cropped learned/sincos table.

    ``proj.kernel`` is HWIO [p, p, C, D]; ``pos_embed`` is the checkpoint's [1, M², D] buffer.
    """

    def __init__(self, config: SD3Config, *, dtype, rngs: nnx.Rngs):
        p, c, d, m = config.patch_size, config.in_channels, config.inner_dim, config.pos_embed_max_size
        self.patch_size, self.max_size = p, m
        self.proj = PatchProj(p, c, d, dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (1, m * m, d), dtype) * 0.02)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, C, H, W] latents -> [B, (H/p)·(W/p), D] tokens (row-major over the patch grid)."""
        b, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        if gh > self.max_size or gw > self.max_size:
            raise ValueError(f"latent grid {gh}x{gw} exceeds pos_embed_max_size={self.max_size}")
        kernel = self.proj.kernel[...]
        patches = x.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
        tokens = jnp.dot(patches.astype(kernel.dtype), kernel.reshape(p * p * c, -1)) + self.proj.bias[...]
        top, left = (self.max_size - gh) // 2, (self.max_size - gw) // 2
        table = self.pos_embed[...].reshape(self.max_size, self.max_size, -1)
        pos = jax.lax.dynamic_slice(table, (top, left, 0), (gh, gw, table.shape[-1])).reshape(1, gh * gw, -1)
        return (tokens + pos.astype(jnp.float32)).astype(tokens.dtype)


class JointTransformerBlock(nnx.Module):
    def __init__(self, config: SD3Config, index: int, *, dtype, rngs: nnx.Rngs):
        dim, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.context_pre_only = index == config.num_layers - 1
        self.use_dual_attention = index in config.dual_attention_layers
        qk = config.qk_norm == "rms_norm"
        self.norm1 = AdaLayerNormZero(dim, 9 if self.use_dual_attention else 6, dtype=dtype, rngs=rngs)
        if self.context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dim, dtype=dtype, rngs=rngs)
        else:
            self.norm1_context = AdaLayerNormZero(dim, 6, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, heads, hd, added_kv=True, context_pre_only=self.context_pre_only,
                              qk_norm=qk, dtype=dtype, rngs=rngs)
        self.attn2 = (Attention(dim, heads, hd, qk_norm=qk, dtype=dtype, rngs=rngs)
                      if self.use_dual_attention else None)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.ff_context = None if self.context_pre_only else FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array, *, layer: int, layer2: int | None,
                 runtime: AttentionRuntime | None) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, N, D] image stream, context: [B, T, D] text stream -> (x, context or None)."""
        mods = self.norm1(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = layer_norm(x)
        norm_x = modulate(normed, shift_msa, scale_msa)
        if self.context_pre_only:
            norm_ctx = self.norm1_context(context, temb)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            norm_ctx = modulate(layer_norm(context), c_shift_msa, c_scale_msa)

        attn_out, ctx_attn_out = self.attn(norm_x, norm_ctx, layer=layer, text_first=False, runtime=runtime)
        x = x + gate_msa * attn_out
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            attn2_out, _ = self.attn2(modulate(normed, shift_msa2, scale_msa2), None, layer=layer2,
                                      text_first=False, runtime=runtime)
            x = x + gate_msa2 * attn2_out
        x = x + gate_mlp * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa * ctx_attn_out
        context = context + c_gate_mlp * self.ff_context(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


def sd3_attention_layer_names(config: SD3Config) -> list[str]:
    """Attention sites in call order: ``transformer_blocks.i.attn`` (joint) then, for dual blocks,
    ``transformer_blocks.i.attn2`` (image-only). The index in this list is the ``layer`` argument."""
    names = []
    for i in range(config.num_layers):
        names.append(f"transformer_blocks.{i}.attn")
        if i in config.dual_attention_layers:
            names.append(f"transformer_blocks.{i}.attn2")
    return names


class SD3Transformer2DModel(nnx.Module):
    text_first = False

    def __init__(self, config: SD3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        dim = config.inner_dim
        self.pos_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, config.pooled_projection_dim, dtype=dtype,
                                                                  rngs=rngs)
        self.context_embedder = Linear(config.joint_attention_dim, config.caption_projection_dim, dtype=dtype,
                                       rngs=rngs)
        self.transformer_blocks = nnx.List(
            [JointTransformerBlock(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dim, dtype=dtype, rngs=rngs)
        p = config.patch_size
        self.proj_out = Linear(dim, p * p * config.out_ch, dtype=dtype, rngs=rngs)

    def attention_layer_names(self) -> list[str]:
        return sd3_attention_layer_names(self.config)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 timestep: jax.Array, *, runtime: AttentionRuntime | None = None) -> jax.Array:
        """hidden_states [B, C, H, W], encoder_hidden_states [B, T, joint_dim], pooled [B, P],
        timestep [B] in 0..1000 -> [B, C_out, H, W] (diffusers' ``.sample``)."""
        cfg = self.config
        b, _, h, w = hidden_states.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent height/width ({h}, {w}) must be divisible by patch_size={p}")
        dtype = self.proj_out.kernel.dtype
        x = self.pos_embed(hidden_states.astype(dtype))
        pooled = pooled_projections.astype(dtype)
        temb = self.time_text_embed(jnp.broadcast_to(jnp.asarray(timestep), (b,)), pooled)
        context = self.context_embedder(encoder_hidden_states.astype(dtype))
        x, context = token_split(x), token_split(context)  # a mesh's seq axis splits the streams on tokens
        layer = 0
        for block in self.transformer_blocks:
            layer2 = layer + 1 if block.attn2 is not None else None
            x, context = block(x, context, temb, layer=layer, layer2=layer2, runtime=runtime)
            x, context = token_split(x), token_split(context)
            layer += 2 if block.attn2 is not None else 1
        x = self.proj_out(self.norm_out(x, temb))  # [B, N, p·p·C]
        gh, gw, c = h // p, w // p, cfg.out_ch
        x = x.reshape(b, gh, gw, p, p, c).transpose(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
        return x.reshape(b, c, h, w)
