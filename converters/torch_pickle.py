"""A restricted reader and a writer of ``torch.save`` files, without torch.

Reading never runs code from the file: a restricted unpickler over torch's zip format (``<root>/data.pkl`` +
``<root>/data/<key>`` raw storages) or torch's legacy format, which resolves only ``torch._utils.
_rebuild_tensor_v2``, the typed storage classes and ``collections.OrderedDict``; any other global (``os.system``,
``builtins.eval``, ...) is refused before anything is called. Tensors come back as numpy arrays.
Writing emits the same zip layout and protocol-2 pickle as ``torch.save`` (by hand, without torch), so that
``torch.load`` (``weights_only`` True or False) reads the files. Used for the official DiTFastAttn plan files
(:mod:`dfa2_jax.plan.official`) and for plain state-dict checkpoints (LPIPS heads, torchvision backbones).
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any

import numpy as np

from dfa2_jax.atomic import write_atomic

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c

# torch typed-storage class names <-> numpy dtypes (little-endian)
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}
_DTYPE_STORAGES = {np.dtype(v).str: k for k, v in _STORAGE_DTYPES.items()}


class TorchFileError(ValueError):
    """A file that is not a readable ``torch.save`` file, or one that asks to run code; the message names it."""


# ============================================================================================ safe reading
class _Refused(Exception):
    pass


class _StorageType:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __setstate__(self, state):
        raise _Refused(f"BUILD on torch.{self.name}")


class _Storage:
    __slots__ = ("dtype", "numel", "key", "data")

    def __init__(self, dtype: np.dtype, numel: int, key: str):
        self.dtype, self.numel, self.key, self.data = dtype, numel, key, None

    def __setstate__(self, state):
        raise _Refused("BUILD on a storage")


class _Tensor:
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __setstate__(self, state):
        raise _Refused("BUILD on a tensor")

    def to_numpy(self) -> np.ndarray:
        st = self.storage
        if st.data is None:
            raise _Refused(f"storage {st.key!r} has no data in the file")
        flat = np.frombuffer(st.data, dtype=st.dtype, count=st.numel)
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise _Refused(f"negative tensor size/stride/offset {self.size}/{self.stride}/{self.offset}")
        if 0 in self.size:
            return np.zeros(self.size, st.dtype.newbyteorder("="))
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= st.numel:
            raise _Refused(f"tensor view (offset {self.offset}, size {self.size}, stride {self.stride}) runs past "
                           f"its storage of {st.numel} elements")
        item = st.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride], writeable=False)
        return np.array(view, dtype=st.dtype.newbyteorder("="))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise _Refused("_rebuild_tensor_v2 called on something that is not a storage")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(x, int) for x in size + stride)):
        raise _Refused("malformed _rebuild_tensor_v2 arguments")
    return _Tensor(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what torch.save writes for tensors in containers; everything else is refused."""

    def __init__(self, file, storages: dict[str, bytes] | None, legacy: bool = False):
        super().__init__(file)
        self._storages = storages
        self._legacy = legacy
        self.created: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _Refused(f"the pickle asks for {module}.{name}")

    def persistent_load(self, pid):
        n = 6 if self._legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == n and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused(f"unexpected persistent id {pid!r:.200}")
        _, stype, key, _location, numel = pid[:5]
        if self._legacy and pid[5] is not None:
            raise _Refused("legacy storage views are not supported")
        if key in self.created:
            return self.created[key]
        st = _Storage(np.dtype(_STORAGE_DTYPES[stype.name]), numel, key)
        if self._storages is not None:
            data = self._storages.get(key)
            if data is None:
                raise _Refused(f"storage {key!r} is missing from the archive")
            if len(data) < numel * st.dtype.itemsize:
                raise _Refused(f"storage {key!r} holds {len(data)} bytes, fewer than {numel} elements")
            st.data = data
        self.created[key] = st
        return st


def _materialise(x):
    if isinstance(x, _Tensor):
        return x.to_numpy()
    if isinstance(x, collections.OrderedDict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in x.items())
    if isinstance(x, dict):
        return {k: _materialise(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_materialise(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_materialise(v) for v in x)
    if isinstance(x, (_Storage, _StorageType)):
        raise _Refused("a bare storage object in the file")
    return x


def load_torch_file(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file (zip or legacy format) holding dicts / lists / numbers / strings / tensors,
    tensors as numpy arrays, without torch and without running any code from the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise TorchFileError(f"{path}: no such file") from None
    try:
        if raw[:4] == b"PK\x03\x04":
            obj = _load_zip(raw)
        elif raw[:2] == b"\x80\x02":
            obj = _load_legacy(raw)
        else:
            raise _Refused("not a torch.save file (neither torch's zip format nor its legacy pickle format)")
        return _materialise(obj)
    except _Refused as e:
        msg = str(e)
        if msg.startswith("the pickle asks for"):
            raise TorchFileError(f"{path}: refusing to load: {msg}, which could run code; plan and weight files "
                                 "hold only tensors, dicts, lists, numbers and strings") from None
        raise TorchFileError(f"{path}: cannot read: {msg}") from None
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, RecursionError, MemoryError) as e:
        raise TorchFileError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from None


def _load_zip(raw: bytes):
    zf = zipfile.ZipFile(io.BytesIO(raw))
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise _Refused("zip archive without a <root>/data.pkl record: not a torch.save file")
    root = pkl[0][:-len("data.pkl")]
    prefix = root + "data/"
    storages = {n[len(prefix):]: zf.read(n) for n in names if n.startswith(prefix)}
    order = zf.read(root + "byteorder").decode().strip() if root + "byteorder" in names else "little"
    if order != "little":
        raise _Refused(f"byteorder {order!r}: only little-endian files are supported")
    return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storages).load()


def _load_legacy(raw: bytes):
    f = io.BytesIO(raw)
    magic = _RestrictedUnpickler(f, None).load()
    if magic != LEGACY_MAGIC:
        raise _Refused("a pickle without torch's magic number: not a torch.save file")
    proto = _RestrictedUnpickler(f, None).load()
    if proto != 1001:
        raise _Refused(f"legacy torch protocol {proto!r} is not supported (expected 1001)")
    sys_info = _RestrictedUnpickler(f, None).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise _Refused("big-endian legacy file")
    up = _RestrictedUnpickler(f, None, legacy=True)
    obj = up.load()
    keys = _RestrictedUnpickler(f, None).load()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _Refused("malformed storage key list")
    for key in keys:
        st = up.created.get(key)
        if st is None:
            raise _Refused(f"storage {key!r} listed but never used")
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * st.dtype.itemsize
        data = f.read(nbytes)
        if numel != st.numel or len(data) != nbytes:
            raise _Refused(f"storage {key!r} is truncated")
        st.data = data
    return obj


# ============================================================================================ writing
class _PickleWriter:
    """Protocol-2 pickle opcodes for dict / list / tuple / int / str / float / bool / None / numpy arrays (as
    torch tensors via ``torch._utils._rebuild_tensor_v2``), the way ``torch.save`` writes them."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.storages: list[tuple[str, bytes]] = []

    def dump(self, obj) -> bytes:
        self._save(obj)
        self.out += b"."
        return bytes(self.out)

    def _global(self, module: str, name: str):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def _tuple(self, items):
        if not items:
            self.out += b")"
            return
        if len(items) > 3:
            self.out += b"("
        for x in items:
            self._save(x)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")

    def _save(self, obj):
        o = self.out
        if obj is None:
            o += b"N"
        elif obj is True:
            o += b"\x88"
        elif obj is False:
            o += b"\x89"
        elif isinstance(obj, (int, np.integer)):
            v = int(obj)
            if 0 <= v < 256:
                o += b"K" + bytes([v])
            elif 0 <= v < 65536:
                o += b"M" + struct.pack("<H", v)
            elif -2**31 <= v < 2**31:
                o += b"J" + struct.pack("<i", v)
            else:
                n = (v.bit_length() + 8) // 8
                o += b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)
        elif isinstance(obj, float):
            o += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            b = obj.encode("utf-8")
            o += b"X" + struct.pack("<I", len(b)) + b
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            o += b"]"
            if obj:
                o += b"("
                for x in obj:
                    self._save(x)
                o += b"e"
        elif isinstance(obj, dict):
            o += b"}"
            if obj:
                o += b"("
                for k, v in obj.items():
                    self._save(k)
                    self._save(v)
                o += b"u"
        else:
            raise TypeError(f"cannot write {type(obj).__name__} into a torch file")

    def _tensor(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        dt = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
        sname = _DTYPE_STORAGES.get(np.dtype(dt).str)
        if sname is None:
            raise TypeError(f"no torch storage type for dtype {a.dtype}")
        key = str(len(self.storages))
        self.storages.append((key, a.astype(dt, copy=False).tobytes()))
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # args of _rebuild_tensor_v2
        self.out += b"("  # persistent id ('storage', storage_type, key, location, numel)
        self._save("storage")
        self._global("torch", sname)
        self._save(key)
        self._save("cpu")
        self._save(int(a.size))
        self.out += b"t" + b"Q"
        self._save(0)  # storage offset
        self._tuple(tuple(int(x) for x in a.shape))
        strides, acc = [], 1
        for n in reversed(a.shape):
            strides.append(acc)
            acc *= int(n)
        self._tuple(tuple(reversed(strides)))
        self._save(False)  # requires_grad
        self._global("collections", "OrderedDict")
        self.out += b")R"  # backward hooks: OrderedDict()
        self.out += b"tR"


def torch_file_bytes(obj, root: str = "archive") -> bytes:
    """``torch.save(obj)``'s bytes (zip format, 64-byte aligned records), built without torch."""
    w = _PickleWriter()
    pkl = w.dump(obj)
    digest = hashlib.sha1(pkl + b"".join(d for _, d in w.storages)).hexdigest()
    records = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little")]
    records += [(f"data/{k}", d) for k, d in w.storages]
    records += [("version", b"3\n"), (".data/serialization_id", str(int(digest, 16))[-40:].zfill(40).encode())]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f"{root}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            # pad the local header's extra field ('FB' as torch's writer) so the data starts 64-byte aligned
            header = 30 + len(info.filename.encode()) + 4
            pad = (-(buf.tell() + header)) % 64
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, data)
    return buf.getvalue()


def save_torch_file(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as ``torch.save`` would (atomically: temp file in the same folder + os.replace)."""
    path = os.fspath(path)
    root = os.path.splitext(os.path.basename(path))[0] or "archive"
    root = re.sub(r"[^A-Za-z0-9_.\-]", "_", root)
    write_atomic(path, torch_file_bytes(obj, root))


__all__ = ["TorchFileError", "load_torch_file", "save_torch_file", "torch_file_bytes"]
