"""CLIP score in Flax NNX with a local transformers ``CLIPModel`` folder (never downloaded).

Score of an image and its prompt (Hessel et al. 2021, CLIPScore with w = 100, as torchmetrics' ``CLIPScore``)::

    100 * max(cos(image_embeds, text_embeds), 0)

where ``image_embeds`` / ``text_embeds`` are transformers' ``CLIPModel.get_image_features`` /
``get_text_features`` (the projected class token / eos token). :func:`clip_scores` returns it per image; the mean
over images is the reported number. torchmetrics clamps the *mean* cosine instead of each one; the two agree
whenever every cosine is >= 0 (always the case in practice for a trained CLIP and real captions).

Model (``models/clip/modeling_clip.py``, transformers 5.x; names as its state dict): ``text_model`` is our
:class:`dfa2_jax.models.clip.CLIPTextTransformer` and its forward (:class:`~dfa2_jax.models.clip.CLIPTextModel`:
causal mask, eos pooling by the config's eos rule) and ``text_projection`` (Linear, no bias); ``vision_model`` is a
ViT: ``embeddings`` (``patch_embedding`` conv p x p stride p, no bias; ``class_embedding`` [D] prepended;
``position_embedding`` [1 + (image_size / p)², D] added), ``pre_layrnorm``, ``encoder.layers`` (the text tower's
pre-LN block with bidirectional attention), ``post_layernorm`` on the class token; then ``visual_projection``
(Linear, no bias). ``logit_scale`` is loaded but unused.

Folder: what ``CLIPModel.save_pretrained`` plus the tokenizer's and image processor's ``save_pretrained`` write
(an ``openai/clip-vit-*`` snapshot): ``config.json`` (``text_config`` + ``vision_config``), ``model.safetensors``
(or a sharded ``model.safetensors.index.json``), the CLIP tokenizer (``vocab.json`` + ``merges.txt`` or
``tokenizer.json``) and optionally ``preprocessor_config.json``. Key map: the identity (leaf ``kernel`` / ``scale``
/ ``embedding`` is the key's ``weight``; linear weights transposed, the patch conv OIHW -> HWIO);
``{text,vision}_model.embeddings.position_ids`` (a buffer older checkpoints hold) is ignored; anything else that
fills no leaf, any unfilled leaf and any shape mismatch is a :class:`CheckpointError` naming key and file.

Text: ``tokenizer(prompts, padding="max_length", max_length=L, truncation=True)`` with L = min(the tokenizer's
``model_max_length``, ``max_position_embeddings``), no attention mask (CLIP's text tower is causal and pooled at the
eos, so the pads after it change nothing; torchmetrics pads to the longest prompt with a mask: same embeddings).
Prompts longer than L are cut to L tokens, the last one eos (the tokenizer's truncation).

Images: CLIPImageProcessor's PIL path (transformers 4.x's ``CLIPImageProcessor``, 5.x's ``CLIPImageProcessorPil``;
5.x's default torchvision backend resizes on tensors and differs by a few 8-bit levels), in numpy/PIL
(:func:`preprocess`):

1. ``PIL.Image.convert("RGB")`` (uint8 HxWx3 arrays go through ``Image.fromarray``).
2. Resize so the shorter side is ``shortest_edge`` and the longer one ``int(shortest_edge * long / short)``,
   ``PIL.Image.resize((w, h), Image.BICUBIC, reducing_gap=None)`` on the uint8 image.
3. Center crop to ``crop_size`` (h, w): top = (H - h) // 2, left = (W - w) // 2.
4. ``float64(x) * rescale_factor`` (1/255) cast to float32, then (x - mean) / std per channel in float32, mean =
   (0.48145466, 0.4578275, 0.40821073), std = (0.26862954, 0.26130258, 0.27577711) (OpenAI CLIP).
5. CHW: pixel_values [B, 3, h, w].

Sizes, mean, std and rescale factor come from ``preprocessor_config.json`` when the folder has one (old int
``size`` / ``crop_size`` and new dict forms), else ``vision_config.image_size`` and the OpenAI constants.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import common
from converters.safetensors_io import CheckpointError
from converters.text_encoders import load_tokenizer, read_folder
from dfa2_jax.metrics.lpips import Conv2d
from dfa2_jax.models.clip import (ACTIVATIONS, CLIPAttention, CLIPEncoderLayer, CLIPMLP, CLIPTextConfig,
                                  CLIPTextModel, CLIPTextTransformer, Embedding, LayerNorm, dot_product_attention,
                                  hf_config_kwargs)
from dfa2_jax.models.configs import ConfigError, read_config_json
from dfa2_jax.models.layers import Linear

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))  # either set is a CLIP tokenizer
_LEAF_TO_WEIGHT = ("kernel", "scale", "embedding")
# Sub-config keys that change nothing here: transformers 4.x wrote every PretrainedConfig key into both sub-configs
# (is_decoder; token ids null in the vision one); projection_dim is the top-level one.
_TEXT_IGNORE = frozenset({"is_decoder", "hidden_dropout", "projection_act", "projection_dim"})
_VISION_IGNORE = _TEXT_IGNORE | {"bos_token_id", "eos_token_id", "pad_token_id"}


@dataclasses.dataclass(frozen=True, slots=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionConfig`` architecture fields (names and defaults as transformers)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (one of {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True, slots=True)
class CLIPConfig:
    """transformers ``CLIPConfig``: the two towers and the shared ``projection_dim`` (the text config's
    ``projection_dim`` is set to it: ``CLIPModel`` projects both towers to the top-level value)."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> CLIPConfig:
        """From a ``CLIPModel`` config.json dict; unknown architecture keys are a :class:`ConfigError`."""
        if not isinstance(d, dict) or "text_config" not in d or "vision_config" not in d:
            raise ConfigError(f"{source}: not a CLIPModel config (expected model_type 'clip' with text_config and "
                              "vision_config; a CLIPTextModel or CLIPVisionModel folder has no projections)")
        top = hf_config_kwargs(_Top, d, source, model_types=("clip",),
                               ignore=frozenset({"text_config", "vision_config", "text_config_dict",
                                                 "vision_config_dict", "logit_scale_init_value"}))
        proj = top.get("projection_dim", 512)
        try:
            text = CLIPTextConfig(**{**hf_config_kwargs(CLIPTextConfig, d["text_config"], f"{source}: text_config",
                                                        model_types=("clip_text_model",), ignore=_TEXT_IGNORE),
                                     "projection_dim": proj})
            vision = CLIPVisionConfig(**hf_config_kwargs(CLIPVisionConfig, d["vision_config"],
                                                         f"{source}: vision_config",
                                                         model_types=("clip_vision_model",), ignore=_VISION_IGNORE))
            return cls(text, vision, proj)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: invalid CLIP config: {e}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class _Top:  # the top-level architecture keys of a CLIPModel config.json
    projection_dim: int = 512


# ============================================================================================ model
class CLIPVisionAttention(CLIPAttention):
    """The text tower's attention without the causal mask (the ViT attends both ways)."""

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)  # [B, L, H, Dh]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, causal=False)
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class CLIPVisionEncoderLayer(CLIPEncoderLayer):
    """The text tower's pre-LN block (its ``__call__``) with :class:`CLIPVisionAttention`. The attention is the
    only difference, so the parent's ``__init__`` is not run (it would build the causal one)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPVisionAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class CLIPVisionEncoder(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPVisionEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), dtype))
        self.patch_embedding = Conv2d(config.num_channels, d, config.patch_size, stride=config.patch_size,
                                      use_bias=False, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(config.num_positions, d, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [B, C, H, W] -> [B, 1 + N, D]
        patches = self.patch_embedding(pixel_values.transpose(0, 2, 3, 1))  # [B, H/p, W/p, D]
        b, d = patches.shape[0], patches.shape[-1]
        patches = patches.reshape(b, -1, d)  # row-major over the grid, as torch's flatten(2).transpose(1, 2)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, d))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...][None]


class CLIPVisionTransformer(nnx.Module):
    """transformers' ``vision_model`` (``CLIPVisionTransformer`` in 4.x; the vision model itself in 5.x)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)  # sic, as HF
        self.encoder = CLIPVisionEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, C, image_size, image_size] -> pooled output [B, D] (post-LN class token)."""
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be [B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]; got "
                             f"{pixel_values.shape}")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nnx.Module):
    """transformers ``CLIPModel``: ``text_model``, ``vision_model``, ``text_projection``, ``visual_projection``,
    ``logit_scale``."""

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        p = config.projection_dim
        self.text_model = CLIPTextTransformer(config.text, dtype=dtype, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(config.vision, dtype=dtype, rngs=rngs)
        self.text_projection = Linear(config.text.hidden_size, p, use_bias=False, dtype=dtype, rngs=rngs)
        self.visual_projection = Linear(config.vision.hidden_size, p, use_bias=False, dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, dtype))

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, L] -> text_embeds [B, projection_dim] (``CLIPModel.get_text_features``' pooler_output)."""
        # CLIPTextModel's forward unchanged (eos rules, checks), run on this model's text leaves.
        text = SimpleNamespace(config=self.config.text, text_model=self.text_model,
                               text_projection=self.text_projection)
        return CLIPTextModel.__call__(text, input_ids).text_embeds

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, 3, S, S] -> image_embeds [B, projection_dim]."""
        return self.visual_projection(self.vision_model(pixel_values))


# ============================================================================================ loading
def load_clip_model(folder: str | os.PathLike, dtype="float32") -> tuple[CLIPConfig, nnx.GraphDef, nnx.State]:
    """A transformers ``CLIPModel`` folder -> (config, graphdef, state) in ``dtype``."""
    folder = os.fspath(folder)
    cfg_dict, cfg_path, ckpt = read_folder(folder)
    config = CLIPConfig.from_dict(cfg_dict, cfg_path)
    dt = common.parse_dtype(dtype)
    items = ((key, ckpt.get(key), key, ckpt.file_of(key)) for key in ckpt.keys()
             if key not in ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"))
    graphdef, state = common.fill_state(nnx.eval_shape(lambda: CLIPModel(config, dtype=dt, rngs=nnx.Rngs(0))),
                                        items, root=folder, what="CLIPModel", weight_leaves=_LEAF_TO_WEIGHT)
    return config, graphdef, state


def missing_clip_file(folder: str | os.PathLike) -> str | None:
    """The full path of the first file a CLIP score folder lacks (config.json, the weights, the tokenizer), or
    None when it has them all."""
    folder = os.fspath(folder)
    has = lambda name: os.path.isfile(os.path.join(folder, name))
    if not os.path.isdir(folder):
        return folder
    if not has("config.json"):
        return os.path.join(folder, "config.json")
    if not (has("model.safetensors") or has("model.safetensors.index.json")):
        return os.path.join(folder, "model.safetensors")
    if not any(all(has(n) for n in names) for names in TOKENIZER_FILES):
        return os.path.join(folder, next(n for n in TOKENIZER_FILES[0] if not has(n)))
    return None


# ============================================================================================ preprocessing
@dataclasses.dataclass(frozen=True, slots=True)
class CLIPPreprocess:
    """CLIPImageProcessor settings (see the module docstring for the steps)."""

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, vision: CLIPVisionConfig) -> CLIPPreprocess:
        """From ``<folder>/preprocessor_config.json`` when present, else ``vision.image_size`` and the OpenAI
        mean/std. A setting this module does not implement (another resample filter, a disabled step) is a
        :class:`ConfigError` naming the file and key."""
        path = os.path.join(os.fspath(folder), PREPROCESSOR_CONFIG)
        if not os.path.isfile(path):
            return cls(vision.image_size, (vision.image_size, vision.image_size))
        d = read_config_json(path)
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(key, True) is not True:
                raise ConfigError(f"{path}: {key}={d[key]!r}; CLIP score implements CLIPImageProcessor with every "
                                  "step on")
        if d.get("resample", 3) != 3:
            raise ConfigError(f"{path}: resample={d['resample']!r}; only 3 (bicubic) is implemented")
        size, crop = d.get("size", vision.image_size), d.get("crop_size", vision.image_size)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ConfigError(f"{path}: size={size!r}; expected {{'shortest_edge': n}}")
            size = size["shortest_edge"]
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        return cls(int(size), (int(crop[0]), int(crop[1])), tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
                   tuple(d.get("image_std", OPENAI_CLIP_STD)), float(d.get("rescale_factor", 1 / 255)))


def preprocess(images: Sequence, pre: CLIPPreprocess) -> np.ndarray:
    """PIL images or uint8 HxWx3 arrays -> pixel_values [B, 3, crop_h, crop_w] float32 (module docstring)."""
    from PIL import Image

    out = []
    for im in images:
        if not hasattr(im, "convert"):
            a = np.asarray(im)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
                raise ValueError(f"expected PIL images or uint8 HxWxC arrays; got shape {a.shape} dtype {a.dtype}")
            im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        im = im.convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = pre.shortest_edge, int(pre.shortest_edge * long / short)
        nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
        a = np.array(im.resize((nw, nh), resample=Image.BICUBIC, reducing_gap=None))  # [nh, nw, 3] uint8
        ch, cw = pre.crop_size
        top, left = (nh - ch) // 2, (nw - cw) // 2
        if top < 0 or left < 0:
            raise ValueError(f"crop_size {pre.crop_size} is larger than the resized image {nh}x{nw} (padding is "
                             "not implemented)")
        a = a[top:top + ch, left:left + cw]
        x = (a.astype(np.float64) * pre.rescale_factor).astype(np.float32)
        x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        out.append(x.transpose(2, 0, 1))
    if not out:
        raise ValueError("no images")
    return np.stack(out)


# ============================================================================================ scoring
@dataclasses.dataclass(frozen=True)
class CLIPScorer:
    """A loaded CLIP score folder: :func:`load_clip_scorer`."""

    folder: str
    config: CLIPConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: Any
    preprocess: CLIPPreprocess

    @property
    def max_length(self) -> int:
        m = getattr(self.tokenizer, "model_max_length", None) or self.config.text.max_position_embeddings
        return int(min(m, self.config.text.max_position_embeddings))


def load_clip_scorer(folder: str | os.PathLike, dtype="float32") -> CLIPScorer:
    """Model, tokenizer and preprocessing of a CLIP score folder (module docstring). A missing file is a
    :class:`CheckpointError` naming its full path."""
    folder = os.fspath(folder)
    missing = missing_clip_file(folder)
    if missing is not None:
        raise CheckpointError(f"{missing}: missing (a CLIP score folder needs config.json, model.safetensors and "
                              "the CLIP tokenizer's vocab.json + merges.txt or tokenizer.json)")
    config, graphdef, state = load_clip_model(folder, dtype)
    return CLIPScorer(folder, config, graphdef, state, load_tokenizer(folder),
                      CLIPPreprocess.from_folder(folder, config.vision))


@functools.partial(jax.jit, static_argnums=(0,))
def _image_features(graphdef, state, pixel_values):
    return nnx.merge(graphdef, state).get_image_features(pixel_values)


@functools.partial(jax.jit, static_argnums=(0,))
def _text_features(graphdef, state, input_ids):
    return nnx.merge(graphdef, state).get_text_features(input_ids)


def _batched(fn, graphdef, state, x: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over x in batches of batch_size, the last one padded (one compile per shape); float32 matmuls at full
    precision (no TF32 / bf16 passes on GPU: a metric)."""
    out = []
    with jax.default_matmul_precision("float32"):
        for i in range(0, len(x), batch_size):
            chunk = x[i:i + batch_size]
            n = len(chunk)
            if n < batch_size and len(x) > batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
            out.append(np.asarray(fn(graphdef, state, jnp.asarray(chunk)), np.float32)[:n])
    return np.concatenate(out)


def image_embeds(scorer: CLIPScorer, images: Sequence, batch_size: int = 8) -> np.ndarray:
    """``get_image_features`` of preprocessed images -> float32 [N, projection_dim]."""
    return _batched(_image_features, scorer.graphdef, scorer.state, preprocess(images, scorer.preprocess), batch_size)


def tokenize(scorer: CLIPScorer, prompts: Sequence[str]) -> np.ndarray:
    """input_ids [N, max_length] int32: padded to max_length, truncated (module docstring)."""
    ids = scorer.tokenizer(list(prompts), padding="max_length", max_length=scorer.max_length, truncation=True,
                           return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)


def text_embeds(scorer: CLIPScorer, prompts: Sequence[str], batch_size: int = 8) -> np.ndarray:
    """``get_text_features`` of the tokenized prompts -> float32 [N, projection_dim]."""
    return _batched(_text_features, scorer.graphdef, scorer.state, tokenize(scorer, prompts), batch_size)


def clip_score_from_embeds(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """100 * max(cos(image[i], text[i]), 0) per row, float64 [N]."""
    a, b = np.asarray(image, np.float64), np.asarray(text, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"embeddings must be two [N, D] arrays of one shape; got {a.shape} and {b.shape}")
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return 100.0 * np.maximum(cos, 0.0)


def clip_scores(scorer: CLIPScorer, images: Sequence, prompts: Sequence[str], batch_size: int = 8) -> np.ndarray:
    """CLIP score of each image with its prompt, float64 [N] (their mean is the CLIP score of the set)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images and {len(prompts)} prompts: one prompt per image")
    return clip_score_from_embeds(image_embeds(scorer, images, batch_size), text_embeds(scorer, prompts, batch_size))


__all__ = ["CLIPConfig", "CLIPModel", "CLIPPreprocess", "CLIPScorer", "CLIPVisionConfig", "CLIPVisionTransformer",
           "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_score_from_embeds", "clip_scores", "image_embeds",
           "load_clip_model", "load_clip_scorer", "missing_clip_file", "preprocess", "text_embeds", "tokenize"]
