"""The VAE decoder of SD3 / FLUX (diffusers ``AutoencoderKL``), latents -> images, in Flax NNX.

Only the decoding half is built: the pipelines here never encode images. Attribute names mirror diffusers
(``decoder.conv_in``, ``decoder.mid_block.resnets.0.norm1``, ``decoder.mid_block.attentions.0.to_q``,
``decoder.up_blocks.0.upsamplers.0.conv``, ``post_quant_conv``, ...), so ``converters/vae.py`` is a rename of
leaf names only: ``Conv2d.kernel`` is torch's OIHW weight as HWIO, ``Linear.kernel`` torch's weight transposed,
``GroupNorm.scale`` torch's ``weight``.

The math is diffusers' ``AutoencoderKL.decode`` -> ``Decoder.forward`` (models/autoencoders/vae.py) with its
``UNetMidBlock2D`` / ``UpDecoderBlock2D`` / ``ResnetBlock2D`` / ``Upsample2D``: GroupNorm eps 1e-6, SiLU, nearest
2x upsampling, one mid-block self-attention with a single head as wide as the channels, residual
``output_scale_factor`` 1. The public call takes and returns NCHW like ``vae.decode(z).sample``; inside, the
activations are NHWC for ``jax.lax.conv_general_dilated``.

``decode_latents`` undoes the pipelines' latent normalisation (``z / scaling_factor + shift_factor``) and
decodes; ``to_pil`` is ``VaeImageProcessor.postprocess(..., output_type="pil")``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfa2_jax.models.configs import ConfigError, read_config_json
from dfa2_jax.models.layers import Linear

VAE_CLASS = "AutoencoderKL"
GROUP_NORM_EPS = 1e-6  # diffusers' Decoder passes resnet_eps=1e-6 everywhere (resnets, attention, conv_norm_out)

# diffusers.models.activations.ACT2CLS (get_activation lower-cases the name)
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True, slots=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config (field names and defaults as diffusers' ``__init__``).

    The encoder-only fields (``in_channels``, ``down_block_types``, ``use_quant_conv``) are kept so that a
    ``config.json`` round-trips; the decoder does not use them.
    """

    diffusers_class: ClassVar[str] = VAE_CLASS

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError(f"len(up_block_types)={len(self.up_block_types)} must equal "
                             f"len(block_out_channels)={len(self.block_out_channels)}")
        bad = sorted({t for t in self.up_block_types if t != "UpDecoderBlock2D"})
        if bad:
            raise ValueError(f"up_block_types {bad} are not supported (only 'UpDecoderBlock2D', the type of every "
                             "SD/SDXL/SD3/FLUX VAE)")
        if self.act_fn.lower() not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not one of diffusers' {sorted(ACTIVATIONS)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} must be >= 1")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each axis, as the pipelines compute it: 2 ** (len(block_out_channels) - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    # Presets: vae/config.json of the released checkpoints.
    @classmethod
    def sd3(cls, **override) -> VAEConfig:
        """stabilityai/stable-diffusion-3-medium-diffusers (SD3.5 medium/large: the same architecture and factors)."""
        return cls(**{**dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                             layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32,
                             sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, latents_mean=None,
                             latents_std=None, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=True), **override})

    @classmethod
    def flux(cls, **override) -> VAEConfig:
        """black-forest-labs/FLUX.1-dev and FLUX.1-schnell."""
        return cls.sd3(**{**dict(scaling_factor=0.3611, shift_factor=0.1159), **override})

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> VAEConfig:
        """From a diffusers ``vae/config.json`` dict: ``_``-keys are ignored, unknown keys are an error."""
        name = d.get("_class_name", VAE_CLASS)
        if name != VAE_CLASS:
            raise ConfigError(f"{source}: _class_name={name!r}, expected {VAE_CLASS!r} (is this the VAE's config?)")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
        if unknown:
            raise ConfigError(f"{source}: unknown {VAE_CLASS} config key(s) {unknown} (known: {sorted(fields)})")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if not k.startswith("_")}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: invalid {VAE_CLASS} config: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> VAEConfig:
        return cls.from_dict(read_config_json(path), os.fspath(path))

    def to_diffusers(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"_class_name": VAE_CLASS, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


# ------------------------------------------------------------------------------------------------ layers ---
class Conv2d(nnx.Module):
    """torch ``nn.Conv2d`` (stride 1, 'same' zero padding) on NHWC; ``kernel`` HWIO, torch's default init."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dtype, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = (kernel_size - 1) // 2
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, kernel_size, in_channels,
                                                                   out_channels), dtype, -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), dtype, -bound, bound))

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H, W, Cout]
        kernel = self.kernel[...]
        p = self.padding
        y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, window_strides=(1, 1),
                                         padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...]


class GroupNorm(nnx.Module):
    """torch ``nn.GroupNorm(groups, C, eps)`` over the last (channel) axis; statistics in float32."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = GROUP_NORM_EPS, dtype):
        if num_channels % num_groups:
            raise ValueError(f"{num_channels=} must be a multiple of {num_groups=}")
        self.num_groups, self.eps = num_groups, eps
        self.scale = nnx.Param(jnp.ones((num_channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, ..., C], statistics over every axis but B per group
        b, c = x.shape[0], x.shape[-1]
        xf = x.astype(jnp.float32).reshape(b, -1, self.num_groups, c // self.num_groups)  # [B, S, G, C/G]
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` without time embedding (temb_channels=None), pre-norm, output_scale_factor 1."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, act: str, dtype, rngs: nnx.Rngs):
        self.act = act
        self.norm1 = GroupNorm(groups, in_channels, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_channels, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H, W, Cout]
        act = ACTIVATIONS[self.act]
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))  # dropout p=0 in eval
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nnx.Module):
    """The mid block's ``Attention(C, heads=1, dim_head=C, norm_num_groups=groups, residual_connection=True)``:
    GroupNorm -> q, k, v -> softmax(q kᵀ / sqrt(C)) v (float32 softmax, ``upcast_softmax``) -> ``to_out.0`` ->
    + input."""

    def __init__(self, channels: int, *, groups: int, dtype, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, channels, dtype=dtype)
        self.to_q = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(channels, channels, dtype=dtype, rngs=rngs)])  # to_out[1] is dropout

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)  # [B, S, C]
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        # One head of width C; the [B, S, S] scores are materialised (1 GiB per image at a 128x128 latent, f32).
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c).astype(x.dtype)  # residual, rescale_output_factor 1


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x (``F.interpolate(scale_factor=2.0, mode="nearest")``) then a 3x3 ``conv``."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class UNetMidBlock2D(nnx.Module):
    """resnets[0] -> (attentions[i] -> resnets[i + 1]) for one layer, as the Decoder builds it."""

    def __init__(self, channels: int, *, groups: int, act: str, add_attention: bool, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, act=act, dtype=dtype, rngs=rngs)
                                 for _ in range(2)])
        # diffusers keeps a None slot when add_attention=False, so indices (and keys) line up either way
        self.attentions = nnx.List([AttentionBlock(channels, groups=groups, dtype=dtype, rngs=rngs)
                                    if add_attention else None])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_upsample: bool, groups: int,
                 act: str, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, act=act,
                          dtype=dtype, rngs=rngs) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nnx.Module):
    """diffusers ``Decoder`` (norm_type "group"): conv_in -> mid_block -> up_blocks -> GroupNorm, SiLU -> conv_out."""

    def __init__(self, config: VAEConfig, *, dtype, rngs: nnx.Rngs):
        cfg, act, groups = config, config.act_fn.lower(), config.norm_num_groups
        channels = tuple(reversed(cfg.block_out_channels))
        self.conv_in = Conv2d(cfg.latent_channels, channels[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(channels[0], groups=groups, act=act,
                                        add_attention=cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=cfg.layers_per_block + 1,
                             add_upsample=i != len(channels) - 1, groups=groups, act=act, dtype=dtype, rngs=rngs)
            for i in range(len(channels))])
        self.conv_norm_out = GroupNorm(groups, cfg.block_out_channels[0], dtype=dtype)
        self.conv_out = Conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:  # [B, h, w, latent] -> [B, H, W, out]
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # conv_act is always nn.SiLU in diffusers


class AutoencoderKLDecoder(nnx.Module):
    """``AutoencoderKL.decode`` without the encoder: ``post_quant_conv`` (when the config has it) -> ``decoder``.

    ``__call__(z)``: z [B, latent_channels, h, w] (NCHW, already unscaled: see :func:`decode_latents`) ->
    [B, out_channels, h·s, w·s] with s = ``config.vae_scale_factor``, roughly in [-1, 1] (not clipped), in the
    params' dtype, like ``vae.decode(z).sample``.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.post_quant_conv = (Conv2d(config.latent_channels, config.latent_channels, 1, dtype=dtype, rngs=rngs)
                                if config.use_post_quant_conv else None)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be NCHW [B, {self.config.latent_channels}, h, w]; got shape {z.shape}")
        x = jnp.transpose(z, (0, 2, 3, 1))  # NCHW -> NHWC
        if self.post_quant_conv is not None:
            x = self.post_quant_conv(x)
        return jnp.transpose(self.decoder(x), (0, 3, 1, 2))  # NHWC -> NCHW


# ------------------------------------------------------------------------------------------- pipeline ---
def unscale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """The SD3 / FLUX pipelines' ``latents / scaling_factor + shift_factor`` (shift only when not None)."""
    latents = latents / config.scaling_factor
    if config.shift_factor is not None:
        latents = latents + config.shift_factor
    return latents


def decode_latents(decoder: AutoencoderKLDecoder, latents: jax.Array, config: VAEConfig | None = None) -> jax.Array:
    """Denoiser latents (NCHW, normalised as the transformer sees them) -> images NCHW in ~[-1, 1].

    As ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (after unpacking) do before ``vae.decode``. ``config``
    defaults to the decoder's own.
    """
    config = decoder.config if config is None else config
    return decoder(unscale_latents(latents, config))


@jax.jit(static_argnames=("graphdef", "unscale"))
def decode(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array, *, unscale: bool = True) -> jax.Array:
    """Jitted decode of (graphdef, state) as ``load_vae_decoder`` returns them (merge inside jit: smaller HLO).

    ``unscale=True``: ``latents`` are the denoiser's (:func:`decode_latents`); False: raw ``vae.decode`` input.
    """
    decoder = nnx.merge(graphdef, state)
    return decode_latents(decoder, latents) if unscale else decoder(latents)


def to_pil(images) -> list:
    """NCHW images in ~[-1, 1] -> list of PIL images, as ``VaeImageProcessor.postprocess(output_type="pil")``:
    ``(x / 2 + 0.5).clip(0, 1)`` -> NHWC -> ``(x * 255).round().astype("uint8")`` (round half to even); one
    channel gives mode "L". Computed in float32 numpy (diffusers denormalises in the tensor's dtype first, so a
    bf16/fp16 input can differ there by one level)."""
    from PIL import Image

    x = np.asarray(jax.device_get(images), dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must be NCHW [B, C, H, W]; got shape {x.shape}")
    x = np.clip(x * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    x = (x * 255).round().astype("uint8")
    if x.shape[-1] == 1:
        return [Image.fromarray(im[..., 0]) for im in x]  # a 2-D uint8 array is mode "L"
    return [Image.fromarray(im) for im in x]


__all__ = ["VAEConfig", "AutoencoderKLDecoder", "Decoder", "decode_latents", "unscale_latents", "decode", "to_pil"]
