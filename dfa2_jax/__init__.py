"""dfa2-jax: DiTFastAttnV2 head-wise attention compression for SD3 / SD3.5 / FLUX.1 in JAX/Flax."""

from dfa2_jax.models.configs import FluxConfig, SD3Config, config_from_dict, config_from_json

__version__ = "0.1.0"

# The loader pulls in the converters, which import dfa2_jax.models themselves: resolve it on first use
# (PEP 562) so that importing any converter first does not meet a half-initialised package.
_LAZY = {"Transformer", "Transformer2DModelOutput", "config_of", "load_transformer", "random_transformer"}


def __getattr__(name: str):
    if name in _LAZY:
        from dfa2_jax import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'dfa2_jax' has no attribute {name!r}")


__all__ = ["FluxConfig", "SD3Config", "Transformer", "Transformer2DModelOutput", "config_from_dict",
           "config_from_json", "config_of", "load_transformer", "random_transformer"]
