"""Frozen, hashable configs for the MMDiTs, with presets equal to the real models' ``config.json``.

``from_diffusers(dict)`` reads a diffusers transformer ``config.json`` (``_class_name`` picks the family);
keys diffusers does not use for the architecture (``_diffusers_version``, ``_name_or_path``) are ignored, an
unknown architecture key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

SD3_CLASS = "SD3Transformer2DModel"
FLUX_CLASS = "FluxTransformer2DModel"


class ConfigError(ValueError):
    """A config.json that does not describe a supported transformer."""


def _from_dict(cls, d: dict[str, Any], source: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key not in fields:
            raise ConfigError(f"{source}: unknown {cls.diffusers_class} config key {key!r} "
                              f"(known: {sorted(fields)})")
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid {cls.diffusers_class} config: {e}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class SD3Config:
    """diffusers ``SD3Transformer2DModel`` config (field names and defaults as diffusers)."""

    diffusers_class: ClassVar[str] = SD3_CLASS
    family: ClassVar[str] = "sd3"

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported (None or 'rms_norm')")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal "
                             f"num_attention_heads·attention_head_dim={self.inner_dim}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside [0, num_layers={self.num_layers})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_ch(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    # Presets: the transformer/config.json of the released checkpoints.
    @classmethod
    def medium(cls, **override) -> SD3Config:
        """stabilityai/stable-diffusion-3-medium."""
        return cls(**{**dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192), **override})

    @classmethod
    def v35_medium(cls, **override) -> SD3Config:
        """stabilityai/stable-diffusion-3.5-medium: RMS qk-norm, dual attention in layers 0..12."""
        return cls.medium(**{**dict(pos_embed_max_size=384, qk_norm="rms_norm",
                                    dual_attention_layers=tuple(range(13))), **override})

    @classmethod
    def v35_large(cls, **override) -> SD3Config:
        """stabilityai/stable-diffusion-3.5-large (and large-turbo)."""
        return cls(**{**dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                             qk_norm="rms_norm"), **override})

    @classmethod
    def from_diffusers(cls, d: dict[str, Any], source: str = "config") -> SD3Config:
        return _from_dict(cls, d, source)

    def to_diffusers(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": SD3_CLASS, **d}


@dataclasses.dataclass(frozen=True, slots=True)
class FluxConfig:
    """diffusers ``FluxTransformer2DModel`` config (field names and defaults as diffusers)."""

    diffusers_class: ClassVar[str] = FLUX_CLASS
    family: ClassVar[str] = "flux"

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal "
                             f"attention_head_dim={self.attention_head_dim}")
        if self.patch_size != 1:
            raise ValueError(f"patch_size={self.patch_size}: FLUX packs 2x2 patches in the pipeline; only 1 "
                             "is supported by diffusers' FluxTransformer2DModel as well")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_ch(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @classmethod
    def dev(cls, **override) -> FluxConfig:
        """black-forest-labs/FLUX.1-dev (guidance-distilled: guidance embedding)."""
        return cls(**{**dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                      **override})

    @classmethod
    def schnell(cls, **override) -> FluxConfig:
        """black-forest-labs/FLUX.1-schnell (timestep-distilled: no guidance embedding)."""
        return cls.dev(**{**dict(guidance_embeds=False), **override})

    @classmethod
    def from_diffusers(cls, d: dict[str, Any], source: str = "config") -> FluxConfig:
        return _from_dict(cls, d, source)

    def to_diffusers(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": FLUX_CLASS, **d}


TransformerConfig = SD3Config | FluxConfig
_BY_CLASS = {SD3_CLASS: SD3Config, FLUX_CLASS: FluxConfig}


def config_from_dict(d: dict[str, Any], source: str = "config") -> TransformerConfig:
    """A transformer config from a diffusers config dict; ``_class_name`` picks SD3 or FLUX."""
    name = d.get("_class_name")
    if name not in _BY_CLASS:
        raise ConfigError(f"{source}: unknown model type _class_name={name!r}; supported: {sorted(_BY_CLASS)}")
    return _BY_CLASS[name].from_diffusers(d, source)


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """A config.json as a dict; ConfigError naming the file when it is not a JSON object."""
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def config_from_json(path: str | os.PathLike) -> TransformerConfig:
    return config_from_dict(read_config_json(path), str(path))
