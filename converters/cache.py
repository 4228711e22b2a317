"""Orbax copy of converted params, so a second load of the same checkpoint skips the conversion.

Cache entry ``<root>/<key>/`` with ``params/`` (an orbax ``StandardCheckpointer`` tree of the flat
diffusers-named dict) and ``meta.json`` (config, source, dtype). The key hashes the converter version, the
target dtype and every source file's real path, size and mtime, so an edited checkpoint is converted again.
orbax finalises ``params/`` atomically; ``meta.json`` is written (atomically) after it, and an entry without
it is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np
from flax import nnx

from dfa2_jax.atomic import write_atomic

CONVERTER_VERSION = 1


def default_cache_dir() -> str:
    return os.environ.get("DFA2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dfa2_jax")


def cache_key(files: list[str], dtype: str, config_json: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CONVERTER_VERSION, "dtype": str(dtype), "config": config_json}, sort_keys=True).encode())
    for f in sorted(os.path.realpath(f) for f in files):
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _flat(state: nnx.State) -> dict[str, jax.Array]:
    return {".".join(str(p) for p in path): var[...] for path, var in nnx.to_flat_state(state)}


def save(entry: str, state: nnx.State, meta: dict) -> None:
    import orbax.checkpoint as ocp

    os.makedirs(entry, exist_ok=True)
    params_dir = os.path.join(entry, "params")
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(params_dir), _flat(state))
        ckptr.wait_until_finished()
    write_atomic(os.path.join(entry, "meta.json"), json.dumps(meta, indent=2))


def is_complete(entry: str) -> bool:
    return os.path.isfile(os.path.join(entry, "meta.json")) and os.path.isdir(os.path.join(entry, "params"))


def restore(entry: str, abstract: nnx.State) -> nnx.State:
    """Restore into the structure of ``abstract`` (ShapeDtypeStruct leaves), bitwise."""
    import orbax.checkpoint as ocp

    flat_abstract = list(nnx.to_flat_state(abstract))
    target = {".".join(str(p) for p in path): jax.ShapeDtypeStruct(v.shape, v.dtype) for path, v in flat_abstract}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(os.path.join(entry, "params")), target)
    leaves = []
    for path, var in flat_abstract:
        arr = restored[".".join(str(p) for p in path)]
        if arr.shape != var.shape or np.dtype(arr.dtype) != np.dtype(var.dtype):
            raise ValueError(f"{entry}: cached leaf {path} is {arr.dtype}{arr.shape}, expected {var.dtype}{var.shape}")
        leaves.append((path, var.replace(arr)))
    return nnx.from_flat_state(leaves)
