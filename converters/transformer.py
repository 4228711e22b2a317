"""Checkpoint -> Flax params for the SD3 / FLUX transformers.

Sources (``resolve_checkpoint``; a Hugging Face repo id ``org/name[@revision]`` is first resolved to its snapshot in
the local hub cache, ``converters.hf_cache``):
- a diffusers pipeline root (``model_index.json`` + ``transformer/``) or its ``transformer/`` folder, with
  ``config.json`` and ``diffusion_pytorch_model.safetensors`` or sharded ``*.safetensors.index.json``;
- an original single file (BFL ``flux1-dev.safetensors`` layout, SAI SD3/SD3.5 layout) or a diffusers-named
  single file; its config is inferred from the tensor shapes (``converters.single_file.infer_config``).

Our modules mirror diffusers' names, so the rename table is implicit: diffusers key ``a.b.weight`` is our leaf
``a/b/kernel`` (Linear: transposed; conv: OIHW -> HWIO) or ``a/b/scale`` (RMSNorm); ``bias`` and
``pos_embed.pos_embed`` keep their names. Any model leaf no source key fills, any unused source key and any
shape mismatch is an error naming the key and the file.

Tensors are streamed: each is read from the memory-mapped shard, transformed, cast to the target dtype and
put on the device before the next is read, so the host holds about one tensor at a time (plus, on the CPU
backend, the params themselves: one copy in the target dtype).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from converters import single_file
from converters.common import fill_state, from_leaf, leaf_key, parse_dtype
from converters.hf_cache import resolve_model_path
from converters.safetensors_io import CheckpointError, ShardedCheckpoint
from dfa2_jax.models.configs import (ConfigError, FluxConfig, SD3Config, TransformerConfig, config_from_dict,
                                     config_from_json)
from dfa2_jax.models.flux import FluxTransformer2DModel
from dfa2_jax.models.sd3 import SD3Transformer2DModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


@dataclasses.dataclass
class ResolvedCheckpoint:
    """Where the transformer weights are and how to read them."""

    kind: str  # "diffusers" | "single_file"
    layout: str  # converters.single_file.LAYOUTS
    config: TransformerConfig
    checkpoint: ShardedCheckpoint
    root: str  # the folder or file the user named

    @property
    def files(self) -> list[str]:
        return [f.path for f in self.checkpoint.files]


def model_class(config: TransformerConfig):
    return SD3Transformer2DModel if isinstance(config, SD3Config) else FluxTransformer2DModel


def _transformer_folder(path: str) -> str:
    if os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isdir(os.path.join(path, "transformer")):
        sub = os.path.join(path, "transformer")
        if not os.path.isdir(sub):
            raise CheckpointError(f"{path}: a diffusers pipeline folder (model_index.json) without a transformer/ "
                                  "subfolder")
        return sub
    return path


# config keys that single_file.infer_config needs to know while inferring (the rest is applied afterwards)
_INFER_KWARGS = {"attention_head_dim": "head_dim", "axes_dims_rope": "axes_dims_rope", "sample_size": "sample_size"}


def resolve_checkpoint(path: str | os.PathLike, config_overrides: dict | None = None) -> ResolvedCheckpoint:
    """Find the transformer weights and config under ``path`` (see the module docstring): a folder, a file, or a
    Hugging Face repo id ``org/name[@revision]`` in the local hub cache
    (:func:`converters.hf_cache.resolve_model_path`).

    ``config_overrides`` (single files only): diffusers config keys that replace the ones inferred from the
    tensor shapes, for what the weights do not record, e.g. ``{"axes_dims_rope": [4, 4, 8]}`` for a FLUX
    with head_dim != 128 or ``{"attention_head_dim": 8}`` for an SD3 without qk-norm and head_dim != 64.
    ``attention_head_dim``, ``axes_dims_rope`` and ``sample_size`` are used during inference (so the head
    count follows from them); every key is then written over the inferred dict before the config is built.
    """
    path = resolve_model_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: not a model: expected a diffusers folder or a .safetensors file")
        ckpt = ShardedCheckpoint([path])
        layout = single_file.detect_layout(ckpt.keys())
        if layout is None:
            raise CheckpointError(f"{path}: unknown model type: the keys (e.g. {sorted(ckpt.keys())[:3]}) are "
                                  "neither an SD3 nor a FLUX transformer (SAI, BFL or diffusers layout)")
        overrides = dict(config_overrides or {})
        kwargs = {arg: overrides[key] for key, arg in _INFER_KWARGS.items() if key in overrides}
        try:
            cfg_dict = single_file.infer_config(layout, ckpt.shapes(), **kwargs)
        except ValueError as e:  # CheckpointKeyError included
            raise CheckpointError(f"{path}: cannot infer the transformer config from the weights: {e} (through "
                                  "load_transformer / resolve_checkpoint: config_overrides= with the diffusers "
                                  "key, e.g. {'attention_head_dim': 8} or {'axes_dims_rope': [4, 4, 8]})") from None
        cfg_dict.update(overrides)
        return ResolvedCheckpoint("single_file", layout, config_from_dict(cfg_dict, path), ckpt, path)
    if config_overrides:
        raise CheckpointError(f"{path}: config_overrides applies to single .safetensors files only; a diffusers "
                              "folder has its config.json")

    folder = _transformer_folder(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: not a model: no config.json in {folder} (expected a diffusers pipeline "
                              "folder, its transformer/ folder, or a .safetensors file)")
    config = config_from_json(config_path)
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(index):
        ckpt = ShardedCheckpoint.from_index(index)
    elif os.path.isfile(single):
        ckpt = ShardedCheckpoint([single])
    else:
        others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json"))
        if others:
            ckpt = ShardedCheckpoint.from_index(os.path.join(folder, others[0]))
        else:
            raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} and no {WEIGHTS_INDEX_NAME} (missing weights; "
                                  ".bin/.pt weights are not read: they are pickles)")
    layout = "diffusers_sd3" if isinstance(config, SD3Config) else "diffusers_flux"
    return ResolvedCheckpoint("diffusers", layout, config, ckpt, path)


def abstract_model(config: TransformerConfig, dtype) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves (nothing allocated)."""
    cls = model_class(config)
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))


def diffusers_tensors(resolved: ResolvedCheckpoint) -> Iterator[tuple[str, np.ndarray, str]]:
    """(diffusers key, tensor, source file) for every transformer tensor of the checkpoint, streamed."""
    ckpt = resolved.checkpoint
    src_file = {}

    def get(key: str) -> np.ndarray:
        src_file["last"] = ckpt.file_of(key)
        return ckpt.get(key)

    try:
        for key, arr in single_file.original_to_diffusers(resolved.layout, ckpt.keys(), get,
                                                          resolved.config.to_diffusers()):
            yield key, arr, src_file.get("last", resolved.root)
    except single_file.CheckpointKeyError as e:
        raise CheckpointError(f"{resolved.root}: {e}") from None


def load_params(resolved: ResolvedCheckpoint, dtype="float32",
                put: Callable[[np.ndarray, tuple], jax.Array] | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Stream the checkpoint into (graphdef, state) of the model in ``dtype``.

    ``put(array, path)`` places one host array (default ``jax.device_put`` on the default device); a
    sharded load passes a per-leaf sharding here.
    """
    items = ((key, arr, key, file) for key, arr, file in diffusers_tensors(resolved))
    return fill_state(abstract_model(resolved.config, parse_dtype(dtype)), items, root=resolved.root,
                      what=type(resolved.config).__name__ + " model", put=put)


def state_to_diffusers(state: nnx.State) -> dict[str, np.ndarray]:
    """Our params back to a diffusers-named state dict (numpy), e.g. to compare or to write files."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[leaf_key(path)] = np.asarray(from_leaf(str(path[-1]), np.asarray(var[...])))
    return out


def write_diffusers_folder(folder: str, config: TransformerConfig, tensors: dict[str, np.ndarray],
                           max_shard_bytes: int | None = None) -> None:
    """Write a diffusers transformer folder (config.json + one or several safetensors shards)."""
    from converters.safetensors_io import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_diffusers(), f, indent=2)
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(folder, WEIGHTS_NAME))
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        if size and size + tensors[key].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += tensors[key].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
                  f, indent=2)


__all__ = ["CheckpointError", "ConfigError", "ResolvedCheckpoint", "resolve_checkpoint", "load_params",
           "abstract_model", "state_to_diffusers", "write_diffusers_folder", "FluxConfig", "SD3Config"]
