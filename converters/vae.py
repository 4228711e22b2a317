"""diffusers ``AutoencoderKL`` checkpoint -> Flax params of :class:`dfa2_jax.models.vae.AutoencoderKLDecoder`.

Source: a diffusers pipeline root (``model_index.json`` and/or a ``vae/`` subfolder) or the ``vae/`` folder
itself, with ``config.json`` and ``diffusion_pytorch_model.safetensors`` or a sharded
``*.safetensors.index.json``. Tensors are streamed one at a time (``ShardedCheckpoint``; bf16/fp16 files are
cast to the target dtype).

Our modules mirror diffusers' names, so diffusers key ``a.b.weight`` is our leaf ``a/b/kernel`` (conv: OIHW ->
HWIO; Linear: transposed) or ``a/b/scale`` (GroupNorm); ``bias`` keeps its name.

The encoder half (``encoder.*``, ``quant_conv.*``) is skipped on purpose: the pipelines here only decode.
Everything else must map: a source key under ``decoder.*`` / ``post_quant_conv.*`` (or any other prefix) that
the config has no place for, a model leaf no source key fills, and a shape mismatch are each a
``CheckpointError`` naming the key and the file. Old checkpoints' attention names (``query``, ``key``,
``value``, ``proj_attn`` of the pre-0.14 ``AttentionBlock``) are renamed to ``to_q``, ``to_k``, ``to_v``,
``to_out.0`` as diffusers' ``_convert_deprecated_attention_blocks`` does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.common import fill_state, leaf_key, parse_dtype  # noqa: F401 (leaf_key re-exported)
from converters.safetensors_io import CheckpointError, ShardedCheckpoint
from dfa2_jax.models.configs import ConfigError
from dfa2_jax.models.vae import AutoencoderKLDecoder, VAEConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SKIPPED_PREFIXES = ("encoder.", "quant_conv.")  # the encoder half: never used to decode
_LEGACY_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

__all__ = ["CheckpointError", "ConfigError", "load_vae_decoder", "vae_folder", "abstract_decoder", "leaf_key",
           "SKIPPED_PREFIXES"]


def vae_folder(path: str | os.PathLike) -> str:
    """The folder holding the VAE's config.json: ``path/vae`` for a pipeline root, else ``path``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        raise CheckpointError(f"{path}: expected a diffusers pipeline folder or its vae/ folder (config.json + "
                              f"{WEIGHTS_NAME}); single-file VAEs are not read")
    sub = os.path.join(path, "vae")
    if os.path.isdir(sub):
        return sub
    if os.path.isfile(os.path.join(path, "model_index.json")):
        raise CheckpointError(f"{path}: a diffusers pipeline folder (model_index.json) without a vae/ subfolder")
    return path


def _open_weights(folder: str) -> ShardedCheckpoint:
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(index):
        return ShardedCheckpoint.from_index(index)
    if os.path.isfile(single):
        return ShardedCheckpoint([single])
    others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json"))
    if others:
        return ShardedCheckpoint.from_index(os.path.join(folder, others[0]))
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} and no {WEIGHTS_INDEX_NAME} (missing VAE weights; "
                          ".bin/.pt weights are not read: they are pickles)")


def abstract_decoder(config: VAEConfig, dtype=jnp.float32) -> AutoencoderKLDecoder:
    """The decoder with ShapeDtypeStruct leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: AutoencoderKLDecoder(config, dtype=dtype, rngs=nnx.Rngs(0)))


def _renamed(ckpt: ShardedCheckpoint) -> dict[str, str]:
    """Our diffusers key -> the checkpoint key it is read from (legacy attention names renamed)."""
    out: dict[str, str] = {}
    for key in ckpt.keys():
        m = _LEGACY_ATTN.match(key)
        new = f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key
        if new in out:
            raise CheckpointError(f"{ckpt.file_of(key)}: tensors {out[new]!r} and {key!r} both name {new!r} "
                                  "(old and new attention names mixed)")
        out[new] = key
    return out


def load_vae_decoder(path: str | os.PathLike, dtype="float32",
                     put: Callable[[np.ndarray, tuple], jax.Array] | None = None
                     ) -> tuple[VAEConfig, nnx.GraphDef, nnx.State]:
    """Read ``path`` (pipeline root or vae/ folder) into ``(config, graphdef, state)`` of the decoder in ``dtype``.

    ``nnx.merge(graphdef, state)`` is the :class:`AutoencoderKLDecoder`; or pass both to
    :func:`dfa2_jax.models.vae.decode` (jitted). ``put(array, path)`` places one host array (default
    ``jax.device_put``). Raises ``ConfigError`` for a bad config.json, ``CheckpointError`` (naming the key and
    the file) for missing / unused / mis-shaped tensors.
    """
    dtype = parse_dtype(dtype)
    folder = vae_folder(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no VAE config.json in {folder} (expected a diffusers pipeline folder or "
                              "its vae/ folder)")
    config = VAEConfig.from_json(config_path)
    ckpt = _open_weights(folder)
    items = ((key, ckpt.get(src), src, ckpt.file_of(src)) for key, src in _renamed(ckpt).items()
             if not src.startswith(SKIPPED_PREFIXES))
    graphdef, state = fill_state(abstract_decoder(config, dtype), items, root=folder,
                                 what=f"decoder ({config_path})", put=put)
    return config, graphdef, state
