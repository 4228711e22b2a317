"""CLIP text encoder in Flax NNX, mirroring transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
(``models/clip/modeling_clip.py``, transformers 5.x): names, math and outputs.

SD3 uses CLIP-L and OpenCLIP bigG (``hidden_states[-2]`` as the token features, ``text_embeds`` pooled);
FLUX uses CLIP-L's ``pooled_output``. Both pipelines pass no attention mask, so the only mask is CLIP's causal
one. Leaves: ``Linear.kernel`` [in, out] (torch weight transposed), ``Linear.bias``, ``LayerNorm.scale`` /
``bias``, ``Embedding.embedding`` [num, dim]; every one is the transformers key with ``weight`` renamed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dfa2_jax.models.configs import ConfigError
from dfa2_jax.models.layers import Linear

# Keys a transformers config.json carries that do not change the forward pass (training, generation and
# bookkeeping settings of PretrainedConfig 4.x/5.x). They are ignored; any other unknown key is an error, so a
# misspelled or unsupported architecture key is not silently dropped.
HF_NON_ARCHITECTURE_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_bfloat16",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "tie_word_embeddings", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "num_labels", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type", "use_cache",
    "output_past", "gradient_checkpointing", "quantization_config",
})


def hf_config_kwargs(cls, d: dict[str, Any], source: str, *, ignore: frozenset[str] = frozenset(),
                     model_types: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dataclass kwargs of a transformers config dict: fields of ``cls`` are kept; ``_*`` keys,
    :data:`HF_NON_ARCHITECTURE_KEYS`, ``initializer_*`` / ``*dropout*`` and ``ignore`` are dropped; anything
    else is a :class:`ConfigError` naming the key and ``source``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_types and model_type is not None and model_type not in model_types:
        raise ConfigError(f"{source}: model_type={model_type!r}, expected one of {list(model_types)} "
                          f"(a {cls.__name__} config)")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif (key.startswith("_") or key in HF_NON_ARCHITECTURE_KEYS or key in ignore
              or key.startswith("initializer_") or "dropout" in key):
            continue
        else:
            raise ConfigError(f"{source}: unknown {cls.__name__} config key {key!r} = {value!r} (known "
                              f"architecture keys: {sorted(fields)})")
    return kwargs


ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # transformers QuickGELUActivation (CLIP-L)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's exact erf GELU (OpenCLIP bigG)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation (NewGELUActivation)
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True, slots=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` architecture fields (names and defaults as transformers)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (one of {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id={self.eos_token_id!r}: CLIP pooling needs one integer eos id")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # Presets: the text_encoder*/config.json of the SD3 / FLUX diffusers repositories.
    @classmethod
    def clip_l(cls, **override) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14 text tower (SD3 ``text_encoder``, FLUX ``text_encoder``)."""
        return cls(**{**dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                             num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                             eos_token_id=2), **override})

    @classmethod
    def clip_g(cls, **override) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG/14 text tower (SD3 ``text_encoder_2``, with projection)."""
        return cls(**{**dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                             num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                             hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                             eos_token_id=2), **override})

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> CLIPTextConfig:
        """From a transformers ``CLIPTextConfig`` config.json dict (non-architecture keys ignored)."""
        if d.get("model_type") == "clip" or "text_config" in d:
            raise ConfigError(f"{source}: a full CLIPModel config (model_type 'clip', text_config + vision_config);"
                              " expected a CLIPTextModel / CLIPTextModelWithProjection folder")
        kwargs = hf_config_kwargs(cls, d, source, model_types=("clip_text_model",),
                                  ignore=frozenset({"hidden_dropout", "projection_act"}))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: invalid CLIPTextConfig: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}


class Embedding(nnx.Module):
    """torch ``nn.Embedding``: leaf ``embedding`` [num, dim]."""

    def __init__(self, num: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs, std: float = 0.02):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num, dim), dtype) * std)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class LayerNorm(nnx.Module):
    """torch ``nn.LayerNorm(dim, eps)`` with affine ``scale``/``bias``; statistics in f32, output in x's dtype."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          bias: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """softmax(q·kᵀ·scale + bias [+ causal mask]) · v with logits and softmax in f32 (transformers'
    eager path upcasts the softmax; in f32 params this is its math exactly). q, k, v: [B, L, H, D]; bias
    broadcasts to [B, H, L, L]. Returns [B, L, H, D] in q's dtype."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if causal:
        n_q, n_k = logits.shape[-2:]
        keep = jnp.arange(n_k)[None, :] <= jnp.arange(n_q)[:, None]  # [Lq, Lk]
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.k_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D], causal self-attention."""
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)  # [B, L, H, Dh]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, causal=True)
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.hidden_act = config.hidden_act
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])


class CLIPTextEmbeddings(nnx.Module):
    """token_embedding(ids) + position_embedding(arange(L)); transformers' ``position_ids`` buffer is an
    arange, so it is not a leaf here."""

    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype,
                                            rngs=rngs, std=0.01)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        seq = input_ids.shape[-1]
        table = self.position_embedding.embedding[...]
        return self.token_embedding(input_ids) + table[None, :seq]  # [B, L, D]


class CLIPTextTransformer(nnx.Module):
    """transformers' ``text_model`` (``CLIPTextTransformer`` in 4.x; ``CLIPTextModel`` itself in 5.x)."""

    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class CLIPOutput(NamedTuple):
    """What transformers returns with ``output_hidden_states=True``.

    last_hidden_state: [B, L, D] after ``final_layer_norm``. hidden_states: (embeddings, layer 1, ...,
    layer N) outputs, each [B, L, D], none normalised (SD3 takes ``hidden_states[-2]``). pooled_output: [B, D],
    ``last_hidden_state`` at the eos position (``pooler_output``). text_embeds: [B, projection_dim] =
    ``text_projection(pooled_output)``, or None without a projection.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled_output: jax.Array
    text_embeds: jax.Array | None


class CLIPTextModel(nnx.Module):
    """``CLIPTextModel`` (``with_projection=False``) or ``CLIPTextModelWithProjection`` (True): attribute
    ``text_model`` and, with projection, ``text_projection`` (Linear without bias)."""

    def __init__(self, config: CLIPTextConfig, *, with_projection: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)
        self.text_projection = (Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                       rngs=rngs) if with_projection else None)

    def __call__(self, input_ids: jax.Array) -> CLIPOutput:
        """input_ids: [B, L] integers, L <= max_position_embeddings (no padding mask: CLIP is causal and the
        SD3/FLUX pipelines pass none; the pad tokens after eos do not change the tokens before them)."""
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L]; got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        tm = self.text_model
        x = tm.embeddings(input_ids)
        hidden_states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        last = tm.final_layer_norm(x)
        ids = input_ids.astype(jnp.int32)
        if cfg.eos_token_id == 2:
            # transformers keeps the pre-#24773 rule for configs with the legacy eos id 2 (every released CLIP
            # used by SD3/FLUX): the eos token is the largest id in the sequence.
            eos_pos = jnp.argmax(ids, axis=-1)
        else:
            # First position holding eos_token_id (pad may equal eos); 0 when a row has none, as torch.
            eos_pos = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]  # [B, D]
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPOutput(last, tuple(hidden_states), pooled, text_embeds)


__all__ = ["ACTIVATIONS", "CLIPOutput", "CLIPTextConfig", "CLIPTextModel", "Embedding", "LayerNorm",
           "dot_product_attention", "hf_config_kwargs"]
