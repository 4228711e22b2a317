"""T5 encoder in Flax NNX, mirroring transformers' ``T5EncoderModel`` (``models/t5/modeling_t5.py``,
transformers 5.x): names, math and dtype handling.

SD3 / FLUX use google/t5-v1_1-xxl's encoder (gated-GELU feed-forward, tanh GELU) and pass no attention mask.
T5 specifics: RMS layer norm without mean subtraction or bias (statistics in f32), no 1/sqrt(d) attention
scaling, one learned relative position bias (block 0's ``relative_attention_bias``, bidirectional buckets)
shared by every block, ``encoder.embed_tokens`` tied to ``shared`` (one leaf here: ``shared``).

float16: transformers keeps ``wo`` in float32 for fp16 models (``_keep_in_fp32_modules``), which also turns
the residual stream f32 after the first feed-forward, and clamps fp16 activations to the finite range; both
are reproduced (T5-XXL overflows fp16 otherwise). bfloat16 and float32 compute in the param dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfa2_jax.models.clip import ACTIVATIONS, Embedding, dot_product_attention, hf_config_kwargs
from dfa2_jax.models.configs import ConfigError
from dfa2_jax.models.layers import Linear


@dataclasses.dataclass(frozen=True, slots=True)
class T5Config:
    """transformers ``T5Config`` architecture fields of the encoder (names and defaults as transformers)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT' "
                             "(e.g. 'relu', 'gated-gelu')")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: activation {self.dense_act_fn!r} is "
                             f"not supported (one of {sorted(ACTIVATIONS)})")

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        # transformers' T5Config: "gated-gelu" means the tanh approximation ("gelu_new"), for backwards
        # compatibility with T5 v1.1; any other "gated-ACT" / "ACT" means ACT.
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def v1_1_xxl(cls, **override) -> T5Config:
        """google/t5-v1_1-xxl encoder (SD3 ``text_encoder_3``, FLUX ``text_encoder_2``)."""
        return cls(**{**dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                             relative_attention_num_buckets=32, relative_attention_max_distance=128,
                             layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu"), **override})

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> T5Config:
        """From a transformers ``T5Config`` config.json dict (decoder-only and derived keys ignored:
        ``num_decoder_layers``; ``dense_act_fn`` / ``is_gated_act``, which transformers re-derives from
        ``feed_forward_proj``; token ids)."""
        if d.get("is_decoder"):
            raise ConfigError(f"{source}: is_decoder=true: a T5 decoder stack, expected an encoder")
        kwargs = hf_config_kwargs(cls, d, source, model_types=("t5", "mt5"), ignore=frozenset({
            "num_decoder_layers", "dense_act_fn", "is_gated_act", "is_decoder", "pad_token_id", "eos_token_id",
            "bos_token_id", "n_positions", "scale_decoder_outputs", "dropout_rate", "classifier_dropout"}))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: invalid T5Config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "t5", **dataclasses.asdict(self)}


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """transformers' ``T5Attention._relative_position_bucket`` on the host (Mesh TensorFlow's rule).

    relative_position = memory - query. Half the buckets per direction (bidirectional); within a direction
    distances below ``num_buckets // 4`` get their own bucket, larger ones share log-spaced buckets up to
    ``max_distance``. The log is taken in float32 with the same op order as transformers, so the bucket
    boundaries (exact powers, e.g. distance 16/32/64 for 32/128) round the same way.
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)
    large = max_exact + (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, rel, large)


class RMSNorm(nnx.Module):
    """transformers ``T5LayerNorm``: x · rsqrt(mean(x²) + eps) in f32, cast to the weight dtype when that is
    half precision, times ``scale`` (the weight) in the resulting dtype."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(var + self.eps)  # promotes to f32 like torch
        scale = self.scale[...]
        if scale.dtype in (jnp.float16, jnp.bfloat16):
            y = y.astype(scale.dtype)
        return scale * y


class T5Attention(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype, rngs: nnx.Rngs):
        d, inner = config.d_model, config.inner_dim
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.q = Linear(d, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.k = Linear(d, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.v = Linear(d, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.o = Linear(inner, d, use_bias=False, dtype=dtype, rngs=rngs)
        self.relative_attention_bias = (
            Embedding(config.relative_attention_num_buckets, config.num_heads, dtype=dtype, rngs=rngs,
                      std=d ** -0.5) if has_relative_attention_bias else None)

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        """x: [B, L, d_model], position_bias: [1, H, L, L] -> [B, L, d_model]. No 1/sqrt(d) scaling (T5
        folds it into the init of q)."""
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.d_kv)  # [B, L, H, d_kv]
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        out = dot_product_attention(q, k, v, scale=1.0, bias=position_bias)
        return self.o(out.reshape(*x.shape[:-1], -1))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(config, has_relative_attention_bias=has_relative_attention_bias,
                                         dtype=dtype, rngs=rngs)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseActDense(nnx.Module):
    """wi -> act -> wo (original T5: relu)."""

    def __init__(self, config: T5Config, *, dtype, wo_dtype, rngs: nnx.Rngs):
        self.act = config.dense_act_fn
        self.wi = Linear(config.d_model, config.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
        self.wo = Linear(config.d_ff, config.d_model, use_bias=False, dtype=wo_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(ACTIVATIONS[self.act](self.wi(x)))  # Linear casts to wo's dtype, as transformers


class T5DenseGatedActDense(nnx.Module):
    """act(wi_0 x) * wi_1 x -> wo (T5 v1.1: tanh GELU)."""

    def __init__(self, config: T5Config, *, dtype, wo_dtype, rngs: nnx.Rngs):
        self.act = config.dense_act_fn
        self.wi_0 = Linear(config.d_model, config.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
        self.wi_1 = Linear(config.d_model, config.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
        self.wo = Linear(config.d_ff, config.d_model, use_bias=False, dtype=wo_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(ACTIVATIONS[self.act](self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nnx.Module):
    def __init__(self, config: T5Config, *, dtype, rngs: nnx.Rngs):
        # transformers' _keep_in_fp32_modules = ["wo"] applies to float16 models only.
        wo_dtype = jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype
        cls = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
        self.DenseReluDense = cls(config, dtype=dtype, wo_dtype=wo_dtype, rngs=rngs)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: jax.Array) -> jax.Array:
    """transformers T5Block: fp16 activations are clamped to ±(max - 1000 if any inf else max)."""
    if x.dtype != jnp.float16:
        return x
    big = jnp.finfo(jnp.float16).max
    limit = jnp.where(jnp.isinf(x).any(), big - 1000, big).astype(jnp.float16)
    return jnp.clip(x, -limit, limit)


class T5Block(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([
            T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype,
                                 rngs=rngs),
            T5LayerFF(config, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        x = _clamp_fp16(self.layer[0](x, position_bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nnx.Module):
    """The encoder stack; its ``embed_tokens`` is the model's ``shared`` (tied), so it has no leaf here."""

    def __init__(self, config: T5Config, *, dtype, rngs: nnx.Rngs):
        self.config = config
        self.block = nnx.List([T5Block(config, has_relative_attention_bias=i == 0, dtype=dtype, rngs=rngs)
                               for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def position_bias(self, length: int) -> jax.Array:
        """Block 0's learned bias for a length-L self-attention: [1, H, L, L] (buckets built on the host)."""
        cfg = self.config
        rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # memory - query, [L, L]
        buckets = relative_position_bucket(rel, bidirectional=True, num_buckets=cfg.relative_attention_num_buckets,
                                           max_distance=cfg.relative_attention_max_distance)
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias.embedding[...]  # [buckets, H]
        values = jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=0)  # [L, L, H]
        return values.transpose(2, 0, 1)[None]

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.position_bias(x.shape[1])
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
    """transformers ``T5EncoderModel``: ``shared`` embedding and the ``encoder`` stack."""

    def __init__(self, config: T5Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs, std=1.0)
        self.encoder = T5Stack(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, L] integers -> last_hidden_state [B, L, d_model] (no attention mask: the SD3/FLUX
        pipelines pass none, so pad tokens are attended to, as there)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L]; got shape {input_ids.shape}")
        return self.encoder(self.shared(input_ids))


__all__ = ["RMSNorm", "T5Config", "T5EncoderModel", "relative_position_bucket"]
