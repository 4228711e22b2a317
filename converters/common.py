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
