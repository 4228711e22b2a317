"""``load_transformer``: a jit-compiled drop-in for diffusers' SD3 / FLUX transformer.

    >>> model = dfa2_jax.load_transformer("/models/FLUX.1-dev", dtype="bfloat16")
    >>> sample = model(hidden_states=latents, encoder_hidden_states=t5, pooled_projections=clip,
    ...                timestep=sigmas, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance)

The call takes diffusers' keyword arguments and layouts (numpy or jax arrays) and returns what diffusers
returns in ``.sample``. Params live in ``model.state`` and go into the jitted function as arguments
(``nnx.split`` outside, ``nnx.merge`` inside), so nothing big is closed over.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import cache as param_cache
from converters.hf_cache import resolve_model_path
from converters.transformer import CheckpointError, abstract_model, load_params, parse_dtype, resolve_checkpoint
from dfa2_jax.models.attention import AttentionRuntime
from dfa2_jax.models.configs import FluxConfig, SD3Config, TransformerConfig
from dfa2_jax.models.flux import flux_attention_layer_names
from dfa2_jax.models.layers import rope_frequencies
from dfa2_jax.models.sd3 import sd3_attention_layer_names


@dataclasses.dataclass(frozen=True)
class Transformer2DModelOutput:
    sample: jax.Array


@functools.partial(jax.jit, static_argnums=(0,))
def sd3_forward(graphdef, state, hidden_states, encoder_hidden_states, pooled_projections, timestep):
    """One dense SD3 transformer evaluation, jit-compiled on the nnx split (graphdef static): diffusers' arguments
    -> the velocity [B, C, H, W]. What :meth:`Transformer.__call__` runs; benchmarks lower it directly."""
    model = nnx.merge(graphdef, state)
    return model(hidden_states, encoder_hidden_states, pooled_projections, timestep)


@functools.partial(jax.jit, static_argnums=(0,))
def flux_forward(graphdef, state, hidden_states, encoder_hidden_states, pooled_projections, timestep, rope,
                 guidance):
    """One dense FLUX transformer evaluation, jit-compiled on the nnx split: packed latents [B, N, C·4], T5
    embeddings, pooled CLIP, timestep / 1000, ``rope`` (cos, sin) from :func:`flux_rope`, guidance [B] or None ->
    the velocity, the latents' shape."""
    model = nnx.merge(graphdef, state)
    return model(hidden_states, encoder_hidden_states, pooled_projections, timestep, rope, guidance)


class Transformer:
    """A loaded SD3 / FLUX transformer: ``config``, ``graphdef``/``state`` (the nnx split), ``module()``."""

    def __init__(self, config: TransformerConfig, graphdef: nnx.GraphDef, state: nnx.State, *, dtype,
                 source: str = "random", path: str | None = None):
        self.config = config
        self.graphdef = graphdef
        self.state = state
        self.dtype = jnp.dtype(dtype)
        self.source = source  # "diffusers" | "single_file" | "orbax" | "random"
        self.path = path

    @property
    def family(self) -> str:
        return self.config.family

    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)

    def attention_layer_names(self) -> list[str]:
        if isinstance(self.config, SD3Config):
            return sd3_attention_layer_names(self.config)
        return flux_attention_layer_names(self.config)

    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(self.state))

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 img_ids=None, txt_ids=None, guidance=None, return_dict: bool = False, **unused: Any):
        if unused:
            raise TypeError(f"unsupported arguments {sorted(unused)} (dfa2_jax takes diffusers' core forward "
                            "arguments only)")
        for name, value in (("encoder_hidden_states", encoder_hidden_states),
                            ("pooled_projections", pooled_projections), ("timestep", timestep)):
            if value is None:
                raise TypeError(f"`{name}` is required")
        timestep = jnp.asarray(timestep, jnp.float32).reshape(-1)
        if isinstance(self.config, SD3Config):
            out = sd3_forward(self.graphdef, self.state, jnp.asarray(hidden_states), jnp.asarray(encoder_hidden_states),
                               jnp.asarray(pooled_projections), timestep)
        else:
            rope = flux_rope(self.config, txt_ids, img_ids)
            if guidance is not None:
                guidance = jnp.asarray(guidance, jnp.float32).reshape(-1)
            if self.config.guidance_embeds and guidance is None:
                raise ValueError("this FLUX model has a guidance embedding (FLUX.1-dev): pass `guidance`")
            if not self.config.guidance_embeds and guidance is not None:
                raise ValueError("this FLUX model has no guidance embedding (FLUX.1-schnell): `guidance` must be None")
            out = flux_forward(self.graphdef, self.state, jnp.asarray(hidden_states),
                                jnp.asarray(encoder_hidden_states), jnp.asarray(pooled_projections), timestep, rope,
                                guidance)
        return Transformer2DModelOutput(out) if return_dict else out


def flux_rope(config: FluxConfig, txt_ids, img_ids) -> tuple[jax.Array, jax.Array]:
    """RoPE tables for the joint [text, image] sequence from diffusers-style ids ([S, 3]; a leading batch axis
    is dropped as diffusers does), computed on the host in float64 like diffusers."""
    if txt_ids is None or img_ids is None:
        raise TypeError("FLUX needs `txt_ids` [T, 3] and `img_ids` [N, 3]")
    txt, img = np.asarray(txt_ids), np.asarray(img_ids)
    txt = txt[0] if txt.ndim == 3 else txt
    img = img[0] if img.ndim == 3 else img
    cos, sin = rope_frequencies(np.concatenate([txt, img], axis=0), config.axes_dims_rope)
    return jnp.asarray(cos), jnp.asarray(sin)


def load_transformer(path: str | os.PathLike, *, dtype="float32", cache_dir: str | None | bool = None,
                     config_overrides: dict | None = None, verbose: bool = False) -> Transformer:
    """Load an SD3/SD3.5/FLUX.1 transformer from a diffusers folder (pipeline root or ``transformer/``), an
    original single ``.safetensors`` file, or a Hugging Face repo id ``org/name[@revision]`` already in the local
    hub cache (:func:`converters.hf_cache.resolve_model_path`; nothing is downloaded), cast to ``dtype``
    ("float32" | "bfloat16" | "float16").

    The converted params are kept as an orbax checkpoint under ``cache_dir`` (default ``$DFA2_CACHE_DIR`` or
    ``~/.cache/dfa2_jax``; ``False`` disables it); a second load of the same files reads that copy.

    ``config_overrides`` (single files only; an error for folders): diffusers config keys that replace the
    ones inferred from the tensor shapes, for what the weights do not record: ``axes_dims_rope`` of a FLUX
    whose head_dim is not 128, ``attention_head_dim`` of an SD3 without qk-norm whose head_dim is not 64,
    ``sample_size``. See ``converters.transformer.resolve_checkpoint``.
    """
    jdtype = parse_dtype(dtype)
    path = resolve_model_path(path)
    resolved = resolve_checkpoint(path, config_overrides=config_overrides)
    if cache_dir is False:
        entry = None
    else:
        root = cache_dir if isinstance(cache_dir, str) else param_cache.default_cache_dir()
        entry = os.path.join(root, param_cache.cache_key(resolved.files, jdtype.name, resolved.config.to_diffusers()))
    t0 = time.perf_counter()
    if entry is not None and param_cache.is_complete(entry):
        graphdef, abstract = nnx.split(abstract_model(resolved.config, jdtype))
        state = param_cache.restore(entry, abstract)
        source = "orbax"
    else:
        graphdef, state = load_params(resolved, jdtype)
        source = resolved.kind
        if entry is not None:
            param_cache.save(entry, state, {"config": resolved.config.to_diffusers(), "dtype": jdtype.name,
                                            "source": os.path.abspath(os.fspath(path)), "files": resolved.files})
    if verbose:
        print(f"loaded {resolved.config.diffusers_class} from {source} in {time.perf_counter() - t0:.1f}s")
    return Transformer(resolved.config, graphdef, state, dtype=jdtype, source=source, path=os.fspath(path))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_leaf(key, shape, dtype, kind):
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "kernel":  # torch.nn.Linear-style: uniform ±1/sqrt(fan_in); fan_in = all but the last axis
        bound = float(np.prod(shape[:-1])) ** -0.5
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_transformer(config: TransformerConfig, *, dtype="bfloat16", seed: int = 0) -> Transformer:
    """A transformer with random weights, generated leaf by leaf on the device (no host copy; one small
    compiled generator per distinct leaf shape, so a 12B-parameter FLUX is ready in seconds) — for benchmarks
    at full size without a checkpoint."""
    jdtype = parse_dtype(dtype)
    graphdef, abstract = nnx.split(abstract_model(config, jdtype))
    key = jax.random.key(seed)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        name = str(path[-1])
        kind = "kernel" if name == "kernel" else "ones" if name == "scale" else "normal"
        leaves.append((path, var.replace(_random_leaf(jax.random.fold_in(key, i), tuple(var.shape), jdtype, kind))))
    return Transformer(config, graphdef, nnx.from_flat_state(leaves), dtype=jdtype, source="random")


def config_of(path: str | os.PathLike) -> TransformerConfig:
    """The transformer config of a checkpoint (diffusers config.json or inferred for single files); ``path`` as
    :func:`load_transformer` takes it (a repo id included)."""
    return resolve_checkpoint(path).config


__all__ = ["Transformer", "Transformer2DModelOutput", "load_transformer", "random_transformer", "config_of",
           "sd3_forward", "flux_forward", "flux_rope",
           "CheckpointError", "AttentionRuntime"]
