"""Streaming safetensors reader/writer in numpy (bfloat16 included, through ml_dtypes).

The ``safetensors`` package's numpy backend cannot read bfloat16, the dtype of every released FLUX/SD3.5
checkpoint, so the format (8-byte little-endian header length, JSON header, raw little-endian data) is read
here directly from a memory map: a tensor is materialised only when asked for, so a converter holds one
source tensor at a time. Every inconsistency (truncated file, offsets outside the data, bad header) is an
error naming the file and the tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from dfa2_jax.atomic import atomic_open

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read as what it claims to be."""


class SafetensorsFile:
    """Lazy view of one ``.safetensors`` file: ``keys()``, ``shape(key)``, ``dtype(key)``, ``get(key)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such safetensors file")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: header length {n} exceeds the file size {size} "
                                      "(truncated or not a safetensors file)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_len = size - self._start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {key!r} has a malformed header entry {info!r}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {key!r} offsets {begin}..{end} do not match "
                                      f"{info['dtype']}{list(shape)} ({nbytes} bytes)")
            if end > data_len:
                raise CheckpointError(f"{self.path}: tensor {key!r} ends at byte {end} of the data but the file has "
                                      f"only {data_len} data bytes: the file is truncated")
            self._entries[key] = (dtype, shape, begin, end)
        self._mmap: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key)[0]

    def _entry(self, key: str):
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the memory map (copy it to keep it)."""
        dtype, shape, begin, end = self._entry(key)
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self._mmap, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)),
                             offset=self._start + begin).reshape(shape)

    def close(self) -> None:
        # Arrays returned by get() keep the map alive through their buffer; closing only drops our handle.
        self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    path = os.fspath(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for key in sorted(tensors):
        a = np.asarray(tensors[key], order="C")  # ascontiguousarray would make a 0-d tensor 1-d
        if a.dtype not in _NAMES:
            raise TypeError(f"tensor {key!r}: dtype {a.dtype} cannot be stored in safetensors")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        header[key] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


class ShardedCheckpoint:
    """One or more safetensors shards seen as one key space (a diffusers folder or a single file)."""

    def __init__(self, files: list[str]):
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for sf in self.files:
            for key in sf.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._where[key].path} and {sf.path}")
                self._where[key] = sf

    @classmethod
    def from_index(cls, index_path: str) -> ShardedCheckpoint:
        """A ``*.safetensors.index.json`` (``weight_map``: tensor -> shard file name)."""
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index ({e!r})") from None
        folder = os.path.dirname(index_path)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(folder, shard)):
                missing = sorted(k for k, v in weight_map.items() if v == shard)[:3]
                raise CheckpointError(f"{index_path}: shard {shard!r} (holding e.g. {missing}) is missing from "
                                      f"{folder}")
        ckpt = cls([os.path.join(folder, s) for s in shards])
        for key, shard in weight_map.items():
            sf = ckpt._where.get(key)
            if sf is None or os.path.basename(sf.path) != shard:
                raise CheckpointError(f"{index_path}: tensor {key!r} is mapped to {shard!r} but "
                                      + ("is in no shard" if sf is None else f"is in {sf.path}"))
        return ckpt

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: sf.shape(k) for k, sf in self._where.items()}

    def get(self, key: str) -> np.ndarray:
        return self._file(key).get(key)

    def file_of(self, key: str) -> str:
        return self._file(key).path

    def _file(self, key: str) -> SafetensorsFile:
        try:
            return self._where[key]
        except KeyError:
            raise CheckpointError(f"no tensor {key!r} in {[f.path for f in self.files]}") from None

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)
