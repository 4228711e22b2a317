"""Flax NNX models mirroring diffusers' names: SD3/SD3.5 (``sd3``) and FLUX.1 (``flux``)."""

from dfa2_jax.models.configs import FluxConfig, SD3Config
from dfa2_jax.models.flux import FluxTransformer2DModel
from dfa2_jax.models.sd3 import SD3Transformer2DModel

__all__ = ["FluxConfig", "FluxTransformer2DModel", "SD3Config", "SD3Transformer2DModel"]
