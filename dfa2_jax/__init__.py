"""dfa2-jax: DiTFastAttnV2 head-wise attention compression for SD3 / SD3.5 / FLUX.1 in JAX/Flax."""

from dfa2_jax.models.configs import FluxConfig, SD3Config, config_from_dict, config_from_json
from dfa2_jax.transformer import (Transformer, Transformer2DModelOutput, config_of, load_transformer,
                                  random_transformer)

__version__ = "0.1.0"

__all__ = ["FluxConfig", "SD3Config", "Transformer", "Transformer2DModelOutput", "config_from_dict",
           "config_from_json", "config_of", "load_transformer", "random_transformer"]
