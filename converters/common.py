"""Leaf conventions shared by every converter: torch/diffusers key <-> our nnx state path, and the per-leaf
transforms (Linear weight [out, in] -> ``kernel`` [in, out]; conv OIHW -> HWIO)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def leaf_key(path: tuple, weight_leaves: tuple[str, ...] = ("kernel", "scale")) -> str:
    """Our state path -> the torch state-dict key it is filled from (``weight_leaves`` are torch ``weight``)."""
    parts = [str(p) for p in path]
    if parts[-1] in weight_leaves:
        parts[-1] = "weight"
    return ".".join(parts)


def to_leaf(name: str, array: np.ndarray) -> np.ndarray:
    """A torch tensor -> our leaf layout (a view; no copy)."""
    if name == "kernel":
        if array.ndim == 2:
            return array.T  # torch Linear [out, in] -> [in, out]
        if array.ndim == 4:
            return array.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
    return array


def from_leaf(name: str, array: np.ndarray) -> np.ndarray:
    """Our leaf -> the torch layout (inverse of :func:`to_leaf`)."""
    if name == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
    return array


def torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a leaf of our ``shape`` (for error messages)."""
    return tuple(from_leaf(name, np.empty(shape, np.int8)).shape)


def fill_state(abstract_module, items, *, root: str, what: str, weight_leaves: tuple[str, ...] = ("kernel", "scale"),
               put=None):
    """Stream checkpoint tensors into an abstract nnx module's leaves -> (graphdef, state).

    ``items`` yields ``(our_key, array, source_key, file)`` lazily (one tensor in memory at a time); ``our_key``
    is the torch-style key :func:`leaf_key` gives our leaf. Each tensor is moved to our layout
    (:func:`to_leaf`), cast to its leaf's dtype and placed with ``put(array, path)`` (default
    ``jax.device_put``). Every unused source, shape mismatch and unfilled leaf is a ``CheckpointError`` naming
    the key and the file (``root``: the folder or file the user named; ``what``: the model, for messages).
    """
    import jax
    from flax import nnx

    from converters.safetensors_io import CheckpointError

    graphdef, abstract = nnx.split(abstract_module)
    flat = dict(nnx.to_flat_state(abstract))
    by_key = {leaf_key(path, weight_leaves): path for path in flat}
    put = put or (lambda a, _: jax.device_put(a))
    filled = {}
    for key, arr, src, file in items:
        path = by_key.get(key)
        if path is None:
            raise CheckpointError(f"{file}: tensor {src!r} has no place in the {what} built from the config "
                                  "(unused key; does the config match the weights?)")
        target, name = flat[path], str(path[-1])
        leaf = to_leaf(name, arr)
        if tuple(leaf.shape) != tuple(target.shape):
            raise CheckpointError(f"{file}: tensor {src!r} has shape {tuple(arr.shape)}, the config expects "
                                  f"{torch_shape(name, tuple(target.shape))}")
        host = np.ascontiguousarray(leaf, dtype=target.dtype)  # one host copy in the target dtype
        filled[path] = put(host, path)
        del host
    missing = sorted(leaf_key(p, weight_leaves) for p in flat if p not in filled)
    if missing:
        raise CheckpointError(f"{root}: the checkpoint lacks {len(missing)} tensor(s) that the {what} config needs "
                              f"(the weights lack them), e.g. {missing[:5]} (does the config match the weights?)")
    return graphdef, nnx.from_flat_state([(p, flat[p].replace(filled[p])) for p in flat])
