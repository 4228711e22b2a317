"""transformers text-encoder folders -> Flax params: CLIP (``load_clip``), T5 encoder (``load_t5``), tokenizers.

A source folder is what transformers' ``save_pretrained`` writes (a diffusers pipeline's ``text_encoder``,
``text_encoder_2``, ``text_encoder_3`` subfolders): ``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Our modules mirror transformers' names, so the rename table is implicit:
key ``a.b.weight`` is our leaf ``a/b/kernel`` (Linear, transposed), ``a/b/scale`` (norms) or
``a/b/embedding`` (embeddings); ``bias`` keeps its name. Any model leaf no key fills, any unused key and any
shape mismatch is a :class:`CheckpointError` naming the key and the file.

Keys read differently or ignored on purpose:

- CLIP: transformers 5.x saves ``CLIPTextModel`` without the ``text_model.`` prefix (``embeddings.…``,
  ``encoder.…``, ``final_layer_norm.…``); released 4.x checkpoints and ``CLIPTextModelWithProjection`` have
  it. Both map to our ``text_model.…``. ``[text_model.]embeddings.position_ids`` (an ``arange`` buffer that
  checkpoints before transformers 4.31 contain) is ignored: positions are always ``arange(L)``.
  ``text_projection.weight`` decides ``with_projection`` unless it is given.
- T5: ``encoder.embed_tokens.weight`` is tied to ``shared.weight`` (transformers ties them always): either
  fills ``shared``; when both are present they must be equal. ``decoder.*`` and ``lm_head.weight`` (a full
  ``T5ForConditionalGeneration`` / ``T5Model`` checkpoint) are ignored: SD3/FLUX use only the encoder.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import common
from converters.common import parse_dtype  # noqa: F401
from converters.safetensors_io import CheckpointError, ShardedCheckpoint
from dfa2_jax.models.clip import CLIPOutput, CLIPTextConfig, CLIPTextModel
from dfa2_jax.models.configs import ConfigError, read_config_json
from dfa2_jax.models.t5 import T5Config, T5EncoderModel

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_LEAF_TO_WEIGHT = ("kernel", "scale", "embedding")
_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm.")  # transformers 5.x CLIPTextModel keys


def read_folder(folder: str | os.PathLike) -> tuple[dict, str, ShardedCheckpoint]:
    """(config dict, config path, checkpoint) of a transformers ``save_pretrained`` folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder (expected a transformers save_pretrained folder with "
                              f"config.json and {WEIGHTS_NAME})")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder}: no config.json (expected a transformers save_pretrained folder, e.g. a "
                              "diffusers pipeline's text_encoder/ subfolder)")
    config = read_config_json(config_path)
    index, single = os.path.join(folder, WEIGHTS_INDEX_NAME), os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(index):
        ckpt = ShardedCheckpoint.from_index(index)
    elif os.path.isfile(single):
        ckpt = ShardedCheckpoint([single])
    else:
        raise CheckpointError(f"{folder}: missing weights: no {WEIGHTS_NAME} and no {WEIGHTS_INDEX_NAME} "
                              "(.bin / .pt weights are not read: they are pickles)")
    return config, config_path, ckpt


def leaf_key(path: tuple) -> str:
    """Our state path -> the transformers key it is filled from."""
    return common.leaf_key(path, _LEAF_TO_WEIGHT)


def _fill(model_fn: Callable[[], nnx.Module], sources: dict[str, tuple[str, str]], ckpt: ShardedCheckpoint,
          folder: str, model_name: str, put) -> tuple[nnx.GraphDef, nnx.State]:
    """Stream ``sources`` (our key -> (checkpoint key, file)) into the abstract model's leaves, each cast to
    the leaf's dtype; every leaf must be filled and every source used."""
    items = ((ours, ckpt.get(src), src, file) for ours, (src, file) in sources.items())
    return common.fill_state(nnx.eval_shape(model_fn), items, root=folder, what=model_name,
                             weight_leaves=_LEAF_TO_WEIGHT, put=put)


def _add(sources: dict, ours: str, src: str, ckpt: ShardedCheckpoint) -> None:
    if ours in sources:
        raise CheckpointError(f"{ckpt.file_of(src)}: tensors {sources[ours][0]!r} and {src!r} both map to {ours!r}")
    sources[ours] = (src, ckpt.file_of(src))


def load_clip(folder: str | os.PathLike, dtype="float32", *, with_projection: bool | None = None,
              put: Callable[[np.ndarray, tuple], jax.Array] | None = None
              ) -> tuple[CLIPTextConfig, nnx.GraphDef, nnx.State]:
    """A ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folder -> (config, graphdef, state) in ``dtype``.

    ``with_projection``: None follows the checkpoint (``text_projection.weight`` present or not); True
    requires it; False drops it (ignored on purpose). ``put(array, path)`` places one host array.
    """
    folder = os.fspath(folder)
    cfg_dict, cfg_path, ckpt = read_folder(folder)
    config = CLIPTextConfig.from_dict(cfg_dict, cfg_path)
    keys = ckpt.keys()
    has_proj = "text_projection.weight" in keys
    if with_projection is None:
        with_projection = has_proj
    elif with_projection and not has_proj:
        raise CheckpointError(f"{folder}: with_projection=True but the checkpoint has no 'text_projection.weight' "
                              "(a CLIPTextModel, not a CLIPTextModelWithProjection)")
    sources: dict[str, tuple[str, str]] = {}
    for key in keys:
        bare = key.removeprefix("text_model.")
        if bare == "embeddings.position_ids" or (key == "text_projection.weight" and not with_projection):
            continue
        if key == "text_projection.weight":
            ours = key
        elif key.startswith("text_model.") or key.startswith(_CLIP_TOP):
            ours = "text_model." + bare
        else:
            raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} is not part of a CLIP text model (unused "
                                  "key; a full CLIPModel or another model's weights?)")
        _add(sources, ours, key, ckpt)
    dt = parse_dtype(dtype)
    name = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    graphdef, state = _fill(lambda: CLIPTextModel(config, with_projection=with_projection, dtype=dt,
                                                  rngs=nnx.Rngs(0)), sources, ckpt, folder, name, put)
    return config, graphdef, state


def load_t5(folder: str | os.PathLike, dtype="float32", *,
            put: Callable[[np.ndarray, tuple], jax.Array] | None = None
            ) -> tuple[T5Config, nnx.GraphDef, nnx.State]:
    """A ``T5EncoderModel`` folder (or a full T5 one: the decoder is ignored) -> (config, graphdef, state).

    In float16 the ``wo`` kernels stay float32, as transformers does (see ``dfa2_jax.models.t5``).
    """
    folder = os.fspath(folder)
    cfg_dict, cfg_path, ckpt = read_folder(folder)
    config = T5Config.from_dict(cfg_dict, cfg_path)
    keys = set(ckpt.keys())
    sources: dict[str, tuple[str, str]] = {}
    tied = "encoder.embed_tokens.weight"
    for key in sorted(keys):
        if key.startswith("decoder.") or key == "lm_head.weight":
            continue
        if key == tied:
            if "shared.weight" in keys:
                a, b = ckpt.get("shared.weight"), ckpt.get(tied)
                if a.shape != b.shape or not np.array_equal(a, b):
                    raise CheckpointError(f"{ckpt.file_of(tied)}: {tied!r} differs from 'shared.weight' "
                                          f"({ckpt.file_of('shared.weight')}); T5 ties them, expected equal tensors")
                continue
            _add(sources, "shared.weight", key, ckpt)
            continue
        _add(sources, key, key, ckpt)
    dt = parse_dtype(dtype)
    graphdef, state = _fill(lambda: T5EncoderModel(config, dtype=dt, rngs=nnx.Rngs(0)), sources, ckpt, folder,
                            "T5EncoderModel", put)
    return config, graphdef, state


def load_tokenizer(folder: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(folder)`` from local files only (a pipeline's ``tokenizer*/``)."""
    from transformers import AutoTokenizer

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such tokenizer folder")
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in known):
        raise CheckpointError(f"{folder}: not a tokenizer folder (none of {list(known)})")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@functools.partial(jax.jit, static_argnums=(0,))
def encode(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array) -> CLIPOutput | jax.Array:
    """Run a loaded text encoder: CLIP -> :class:`CLIPOutput`, T5 -> last_hidden_state [B, L, d_model].
    One compile per (graphdef, input shape); params go in as an argument (nothing closed over)."""
    model = nnx.merge(graphdef, state)
    return model(jnp.asarray(input_ids, jnp.int32))


def state_to_transformers(state: nnx.State) -> dict[str, np.ndarray]:
    """Our params back to transformers-named numpy arrays (``text_model.`` prefixed for CLIP)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        a = np.asarray(var[...])
        out[leaf_key(path)] = a.T if str(path[-1]) == "kernel" else a
    return out


__all__ = ["CheckpointError", "ConfigError", "encode", "leaf_key", "load_clip", "load_t5", "load_tokenizer",
           "read_folder", "state_to_transformers"]
