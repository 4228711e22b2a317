"""FLUX.1 MMDiT in Flax NNX, mirroring diffusers' ``FluxTransformer2DModel`` (names and math).

19 double-stream blocks (``transformer_blocks``) and 38 single-stream blocks (``single_transformer_blocks``);
joint order [text, image] (``text_first=True``); RoPE over the joint sequence from (text ids, image ids).
Latents come in packed: [B, N, 64] (2x2 patches of 16 channels, done by the pipeline).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dfa2_jax.models.attention import AttentionRuntime
from dfa2_jax.parallel.mesh import token_split
from dfa2_jax.models.configs import FluxConfig
from dfa2_jax.models.layers import (AdaLayerNormContinuous, AdaLayerNormZero, Attention,
                                    CombinedTimestepTextProjEmbeddings, FeedForward, Linear, layer_norm,
                                    modulate)


class FluxTransformerBlock(nnx.Module):
    """Double-stream block: separate AdaLN / FF per stream, one joint attention."""

    def __init__(self, config: FluxConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.inner_dim
        self.norm1 = AdaLayerNormZero(dim, 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLayerNormZero(dim, 6, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, config.num_attention_heads, config.attention_head_dim, added_kv=True,
                              qk_norm=True, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.ff_context = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, context, temb, rope, *, layer: int, runtime: AttentionRuntime | None):
        """x [B, N, D] image, context [B, T, D] text -> (x, context)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        attn_out, ctx_attn_out = self.attn(modulate(layer_norm(x), shift_msa, scale_msa),
                                           modulate(layer_norm(context), c_shift_msa, c_scale_msa),
                                           layer=layer, text_first=True, rope=rope, runtime=runtime)
        x = x + gate_msa * attn_out
        x = x + gate_mlp * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        context = context + c_gate_msa * ctx_attn_out
        context = context + c_gate_mlp * self.ff_context(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block on the joint [text, image] sequence: parallel attention and MLP, one proj_out."""

    def __init__(self, config: FluxConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.inner_dim
        mlp = 4 * dim
        self.norm = AdaLayerNormZero(dim, 3, dtype=dtype, rngs=rngs)
        self.proj_mlp = Linear(dim, mlp, dtype=dtype, rngs=rngs)
        self.proj_out = Linear(dim + mlp, dim, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, config.num_attention_heads, config.attention_head_dim, pre_only=True,
                              qk_norm=True, dtype=dtype, rngs=rngs)

    def __call__(self, h, temb, rope, *, text_len: int, layer: int, runtime: AttentionRuntime | None):
        """h: [B, T + N, D] joint stream -> same."""
        shift, scale, gate = self.norm(temb)
        normed = modulate(layer_norm(h), shift, scale)
        mlp = jax.nn.gelu(self.proj_mlp.own_input(normed), approximate=True)
        attn_out, _ = self.attn(normed, None, layer=layer, text_first=True, rope=rope, joint_text_len=text_len,
                                runtime=runtime)
        return h + gate * self.proj_out.concat_in([attn_out, mlp])  # = proj_out(concat([attn_out, mlp]))


def flux_attention_layer_names(config: FluxConfig) -> list[str]:
    """Attention sites in call order; the index in this list is the ``layer`` argument."""
    return ([f"transformer_blocks.{i}.attn" for i in range(config.num_layers)]
            + [f"single_transformer_blocks.{i}.attn" for i in range(config.num_single_layers)])


class FluxTransformer2DModel(nnx.Module):
    text_first = True

    def __init__(self, config: FluxConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        dim = config.inner_dim
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, config.pooled_projection_dim,
                                                                  guidance=config.guidance_embeds, dtype=dtype,
                                                                  rngs=rngs)
        self.context_embedder = Linear(config.joint_attention_dim, dim, dtype=dtype, rngs=rngs)
        self.x_embedder = Linear(config.in_channels, dim, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [FluxTransformerBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nnx.List(
            [FluxSingleTransformerBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_single_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dim, dtype=dtype, rngs=rngs)
        self.proj_out = Linear(dim, config.patch_size ** 2 * config.out_ch, dtype=dtype, rngs=rngs)

    def attention_layer_names(self) -> list[str]:
        return flux_attention_layer_names(self.config)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 timestep: jax.Array, image_rotary_emb: tuple[jax.Array, jax.Array], guidance: jax.Array | None = None,
                 *, runtime: AttentionRuntime | None = None) -> jax.Array:
        """hidden_states [B, N, C_in] packed latents, encoder_hidden_states [B, T, joint_dim], pooled [B, P],
        timestep [B] = sigma in 0..1 (scaled by 1000 here, as diffusers), guidance [B] (dev) or None,
        image_rotary_emb (cos, sin) [T + N, head_dim] -> [B, N, C_out]."""
        dtype = self.proj_out.kernel.dtype
        b = hidden_states.shape[0]
        x = self.x_embedder(hidden_states.astype(dtype))
        t = jnp.broadcast_to(jnp.asarray(timestep), (b,)).astype(dtype) * 1000
        g = None
        if guidance is not None:
            g = jnp.broadcast_to(jnp.asarray(guidance), (b,)).astype(dtype) * 1000
        temb = self.time_text_embed(t, pooled_projections.astype(dtype), g)
        context = self.context_embedder(encoder_hidden_states.astype(dtype))
        text_len = context.shape[1]
        expected = text_len + x.shape[1]
        if image_rotary_emb[0].shape[0] != expected:
            raise ValueError(f"rotary tables have {image_rotary_emb[0].shape[0]} positions; the joint sequence has "
                             f"{expected} (text {text_len} + image {x.shape[1]})")
        x, context = token_split(x), token_split(context)  # a mesh's seq axis splits the streams on tokens
        layer = 0
        for block in self.transformer_blocks:
            x, context = block(x, context, temb, image_rotary_emb, layer=layer, runtime=runtime)
            x, context = token_split(x), token_split(context)
            layer += 1
        h = token_split(jnp.concatenate([context, x], axis=1))
        for block in self.single_transformer_blocks:
            h = token_split(block(h, temb, image_rotary_emb, text_len=text_len, layer=layer, runtime=runtime))
            layer += 1
        x = h[:, text_len:]
        return self.proj_out(self.norm_out(x, temb))
