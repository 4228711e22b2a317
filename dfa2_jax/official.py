"""Import and export of the official DiTFastAttn plan files (thu-nics/DiTFastAttnV2 and V1), without torch.

Official V2 files (shared/REFERENCE.md, "Plan format"), torch.save pickles despite the ``.json`` suffix:
- ``{model}_{res}_head_option_{delta}.json``: {layer_name: {step (int): int32 tensor [H, 2]}}, (left, right)
  half-window per head: −1 full, 0 cached, else N_img // (2k) (``dfa_processor_*_flash.py``:
  ``wt[head] = (S - n_text) // (int(ws) * 2)``, then ``repeat_interleave(2).view(-1, 2)``);
- ``{model}_{res}_outputshare_option_{delta}.json``: {layer_name: {step: [cached head indices]}}.
Both hold every step ≥ 1 (step 0 runs dense attention and has no entry); a layer missing from the files is dense.
V1 (thu-nics/DiTFastAttn ``dit_fast_attention.py``): a list (one entry per block) or a dict {block: ...} of
{"attn1": [method per step], "attn2": ..., "ff": ...} with methods ``full_attn``, ``output_share`` (AST),
``residual_window_attn`` (WA-RS) and the ``+cfg_attn_share`` suffix (ASC); stored as a torch pickle or JSON.

Reading never runs code from the file: a restricted unpickler over torch's zip format (``<root>/data.pkl`` +
``<root>/data/<key>`` raw storages) or torch's legacy format, which resolves only ``torch._utils.
_rebuild_tensor_v2``, the typed storage classes and ``collections.OrderedDict``; any other global (``os.system``,
``builtins.eval``, ...) is refused before anything is called. Tensors come back as numpy arrays.
Writing emits the same zip layout and protocol-2 pickle as ``torch.save`` (by hand, without torch), so that
``torch.load`` (``weights_only`` True or False) and the official code read the files.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import re
import struct
import zipfile
from typing import Any

import numpy as np

from dfa2_jax.atomic import write_atomic
from dfa2_jax.methods import ARROW, CACHE, CFG_SHARE, CFG_SHARE_ARROW, FULL, WARS, parse_method
from dfa2_jax.plan import Plan

DEFAULT_KS = (8, 16, 32)  # the official arrow candidates (arrow_attn_8/16/32)
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c

# torch typed-storage class names <-> numpy dtypes (little-endian)
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}
_DTYPE_STORAGES = {np.dtype(v).str: k for k, v in _STORAGE_DTYPES.items()}


class OfficialFormatError(ValueError):
    """An official plan file that cannot be read or converted; the message names the file and the entry."""


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
        raise OfficialFormatError(f"{path}: no such file") from None
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
            raise OfficialFormatError(f"{path}: refusing to load: {msg}, which could run code; official plan files "
                                      "hold only tensors, dicts, lists, numbers and strings") from None
        raise OfficialFormatError(f"{path}: cannot read: {msg}") from None
    except OfficialFormatError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, RecursionError, MemoryError) as e:
        raise OfficialFormatError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from None


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


# ============================================================================================ V2 import
def k_for_half_window(w: int, n_img: int, prefer=DEFAULT_KS) -> int:
    """The k of ``arrow:k`` whose half-width at ``n_img`` image tokens is ``w`` (N_img // (2k) == w): a preferred
    k when one fits, else a power of two, else the largest. ValueError when no integer k gives ``w``."""
    if w < 1:
        raise ValueError(f"half-window {w} is not a band")
    # N // (2k) == w  <=>  N / (2(w+1)) < k <= N / (2w)
    hi = n_img // (2 * w)
    lo = n_img // (2 * (w + 1)) + 1
    if hi < max(lo, 1):
        raise ValueError(f"half-window {w} is not N_img // (2k) for any integer k at {n_img} image tokens")
    for k in prefer:
        if lo <= k <= hi:
            return int(k)
    p = 1
    while p <= hi:
        if p >= lo:
            return p
        p *= 2
    return hi


def _file_delta(path: str) -> str | None:
    m = re.search(r"_(?:head|outputshare)_option_(.+)\.json$", os.path.basename(path))
    return m.group(1) if m else None


def _method_list(names: set[str]) -> list[str]:
    order = {FULL: 0, CACHE: 1, ARROW: 2, WARS: 3, CFG_SHARE: 4, CFG_SHARE_ARROW: 5}
    return sorted(names, key=lambda n: (order[parse_method(n).code], parse_method(n).k))


def _plan_from_names(names: list, model_info: dict, calibration: dict | None) -> Plan:
    """names: nested [T][L][H] method names -> Plan (methods ordered full, cache, arrow by k, ...)."""
    flat = {n for step in names for layer in step for n in layer} | {"full"}
    methods = _method_list(flat)
    index = {m: i for i, m in enumerate(methods)}
    a = np.array([[[index[n] for n in layer] for layer in step] for step in names], np.int32)
    return Plan(dict(model_info), len(names), methods, a, calibration)


def import_official(head_option, output_share, model_info: dict, n_img: int, *, steps: int | None = None,
                    candidates=DEFAULT_KS, resolution=None) -> Plan:
    """A plan from the official V2 files (paths, or the already-loaded dicts).

    ``head_option`` {layer: {step: [H, 2] (or [H]) half-windows}}: −1 full, 0 cache, w > 0 ``arrow:k`` with
    N_img // (2k) == w (k chosen from ``candidates`` when one fits); ``output_share`` {layer: {step: [heads]}}:
    those heads are ``cache`` (either may be None). Steps without an entry (always step 0) and layers missing from
    the files are ``full``; ``steps`` defaults to the last step in the files + 1.
    """
    src_h = os.fspath(head_option) if isinstance(head_option, (str, os.PathLike)) else "head_option"
    src_s = os.fspath(output_share) if isinstance(output_share, (str, os.PathLike)) else "output_share"
    ho = load_torch_file(head_option) if isinstance(head_option, (str, os.PathLike)) else head_option
    os_ = load_torch_file(output_share) if isinstance(output_share, (str, os.PathLike)) else output_share
    if ho is None and os_ is None:
        raise OfficialFormatError("give a head_option file, an outputshare file, or both")
    layers = list(model_info["layers"])
    n_heads = int(model_info["num_heads"])
    found: list[int] = []
    for src, d in ((src_h, ho), (src_s, os_)):
        if d is None:
            continue
        if not isinstance(d, dict):
            raise OfficialFormatError(f"{src}: expected {{layer_name: {{step: ...}}}}, got {type(d).__name__}")
        for layer, per_step in d.items():
            if layer not in layers:
                raise OfficialFormatError(f"{src}: layer {layer!r} is not an attention layer of the model "
                                          f"(e.g. {layers[:2]} ... {layers[-1:]})")
            if not isinstance(per_step, dict):
                raise OfficialFormatError(f"{src}: [{layer!r}] must be {{step: ...}}, got {type(per_step).__name__}")
            for s in per_step:
                if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                    raise OfficialFormatError(f"{src}: [{layer!r}] has step key {s!r}; steps are integers >= 0")
                found.append(s)
    n_steps = steps if steps is not None else (max(found) + 1 if found else 1)
    if found and max(found) >= n_steps:
        raise OfficialFormatError(f"{src_h}: step {max(found)} is beyond the {n_steps} steps asked for")
    names = [[["full"] * n_heads for _ in layers] for _ in range(n_steps)]
    for layer, per_step in (ho or {}).items():
        li = layers.index(layer)
        for s, wt in per_step.items():
            wt = np.asarray(wt)
            where = f"{src_h}: [{layer!r}][{s}]"
            if wt.dtype.kind not in "iu":
                raise OfficialFormatError(f"{where}: expected an integer tensor, got dtype {wt.dtype}")
            if wt.ndim == 1:  # the ASC variant stores one window per head
                wt = np.stack([wt, wt], axis=1)
            if wt.shape != (n_heads, 2):
                raise OfficialFormatError(f"{where}: shape {list(wt.shape)}, expected [{n_heads}, 2] (heads, "
                                          "(left, right))")
            for h in range(n_heads):
                left, right = int(wt[h, 0]), int(wt[h, 1])
                if left != right:
                    raise OfficialFormatError(f"{where} head {h}: (left, right) = ({left}, {right}); only symmetric "
                                              "windows are supported")
                if left == -1:
                    continue
                if left == 0:
                    names[s][li][h] = "cache"
                    continue
                if left < -1:
                    raise OfficialFormatError(f"{where} head {h}: window {left} (expected -1, 0 or a half-width)")
                try:
                    names[s][li][h] = f"arrow:{k_for_half_window(left, n_img, candidates)}"
                except ValueError as e:
                    raise OfficialFormatError(f"{where} head {h}: {e} (resolution {resolution})") from None
    for layer, per_step in (os_ or {}).items():
        li = layers.index(layer)
        for s, heads in per_step.items():
            heads = np.asarray(heads).reshape(-1).tolist() if isinstance(heads, np.ndarray) else heads
            if not isinstance(heads, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                              for h in heads):
                raise OfficialFormatError(f"{src_s}: [{layer!r}][{s}] must be a list of head indices")
            for h in heads:
                if not 0 <= h < n_heads:
                    raise OfficialFormatError(f"{src_s}: [{layer!r}][{s}] head {h} is outside [0, {n_heads})")
                names[s][li][h] = "cache"
    calibration = {"source": "DiTFastAttnV2"}
    if resolution is not None:
        calibration["resolution"] = list(resolution) if isinstance(resolution, (list, tuple)) else [resolution] * 2
    calibration["image_tokens"] = int(n_img)
    delta = _file_delta(src_h) or _file_delta(src_s)
    if delta is not None:
        calibration["delta"] = _number_or_str(delta)
    plan = _plan_from_names(names, model_info, calibration)
    plan.source = src_h
    plan.validate(model_info, n_img=n_img)
    return plan


def _number_or_str(s: str):
    try:
        return int(s) if re.fullmatch(r"-?\d+", s) else float(s)
    except ValueError:
        return s


# ============================================================================================ V1 import
_V1_BASE = {"full_attn": "full", "output_share": "cache", "residual_window_attn": "wars",
            "residual_window_attn+without_residual": "arrow"}


def _v1_method(name: str, k: int) -> str:
    cfg = name.endswith("+cfg_attn_share")
    base = name[:-len("+cfg_attn_share")] if cfg else name
    if base not in _V1_BASE:
        raise ValueError(f"unknown V1 method {name!r} (full_attn, output_share, residual_window_attn, with an "
                         "optional +cfg_attn_share)")
    ours = _V1_BASE[base]
    if not cfg:
        return f"{ours}:{k}" if ours in ("wars", "arrow") else ours
    if ours == "full":
        return "cfg_share"
    if ours in ("wars", "arrow"):  # ASC on top of the window: our cfg_share+arrow (without the residual)
        return f"cfg_share+arrow:{k}"
    raise ValueError(f"V1 method {name!r} has no equivalent (output sharing is already free)")


def _v1_layer(block, attn: str) -> str:
    suffix = ".attn" if attn == "attn1" else ".attn2"
    if isinstance(block, int) or (isinstance(block, str) and block.isdigit()):
        name = f"transformer_blocks.{int(block)}{suffix}"
    elif isinstance(block, str):
        b = block[:-len(".attn1")] if block.endswith(".attn1") else block
        name = b if b.endswith((".attn", ".attn2")) else b + suffix
    else:
        raise ValueError(f"block key {block!r} must be an index or a block name")
    return name


def import_v1(source, model_info: dict, *, window_k: int = 8, steps: int | None = None) -> Plan:
    """A plan from a V1 (DiTFastAttn) plan: per block {"attn1": [method per step], "attn2": ..., "ff": ...}, as a
    list (block i = ``transformer_blocks.i``) or a dict keyed by block index or name; a torch pickle or JSON.

    full_attn → full, output_share → every head ``cache`` (V1's AST: the same output as caching each head),
    residual_window_attn → ``wars:{window_k}``, +cfg_attn_share → ``cfg_share`` / ``cfg_share+arrow:k``.
    ``attn2`` lists map to the model's ``.attn2`` layers (SD3.5); ``ff`` is ignored.
    """
    src = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "v1 plan"
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            head = f.read(4)
        if head[:1] in (b"[", b"{") or head[:1].isspace():
            try:
                with open(source, encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise OfficialFormatError(f"{src}: not valid JSON ({e})") from None
        else:
            data = load_torch_file(source)
    else:
        data = source
    if isinstance(data, list):
        items = list(enumerate(data))
    elif isinstance(data, dict):
        items = list(data.items())
    else:
        raise OfficialFormatError(f"{src}: expected a list or dict of blocks, got {type(data).__name__}")
    layers = list(model_info["layers"])
    n_heads = int(model_info["num_heads"])
    per_layer: dict[int, list[str]] = {}
    for block, entry in items:
        if not isinstance(entry, dict):
            raise OfficialFormatError(f"{src}: block {block!r} must be {{'attn1': [...], ...}}")
        for attn in ("attn1", "attn2"):
            seq = entry.get(attn)
            if seq is None:
                continue
            if not isinstance(seq, (list, tuple)) or not all(isinstance(x, str) for x in seq):
                raise OfficialFormatError(f"{src}: block {block!r} {attn} must be a list of method names")
            try:
                name = _v1_layer(block, attn)
                ours = [_v1_method(x, window_k) for x in seq]
            except ValueError as e:
                raise OfficialFormatError(f"{src}: block {block!r} {attn}: {e}") from None
            if name not in layers:
                if all(x == "full" for x in ours):
                    continue
                raise OfficialFormatError(f"{src}: block {block!r} {attn} -> layer {name!r}, which the model does not "
                                          "have")
            per_layer[layers.index(name)] = ours
    lengths = {len(v) for v in per_layer.values()}
    if len(lengths) > 1:
        raise OfficialFormatError(f"{src}: blocks have different step counts {sorted(lengths)}")
    n_steps = steps if steps is not None else (lengths.pop() if lengths else 1)
    names = [[["full"] * n_heads for _ in layers] for _ in range(n_steps)]
    for li, seq in per_layer.items():
        if len(seq) != n_steps:
            raise OfficialFormatError(f"{src}: layer {layers[li]!r} has {len(seq)} steps, expected {n_steps}")
        for s, m in enumerate(seq):
            names[s][li] = [m] * n_heads
    plan = _plan_from_names(names, model_info, {"source": "DiTFastAttn V1", "window_k": int(window_k)})
    plan.source = src
    plan.validate(model_info)
    return plan


# ============================================================================================ export
def official_file_names(name: str, resolution, delta) -> tuple[str, str]:
    """(head_option, outputshare_option) file names as the official scripts write them."""
    res = resolution if not isinstance(resolution, (list, tuple)) else (
        resolution[0] if resolution[0] == resolution[1] else f"{resolution[0]}_{resolution[1]}")
    return f"{name}_{res}_head_option_{delta}.json", f"{name}_{res}_outputshare_option_{delta}.json"


def export_dicts(plan: Plan, n_img: int) -> tuple[dict, dict]:
    """The official ({layer: {step: int32 [H, 2]}}, {layer: {step: [cached heads]}}) for steps 1..T−1."""
    plan.validate(n_img=n_img)
    methods = plan.parsed_methods()
    for i, m in enumerate(methods):
        if m.code in (WARS, CFG_SHARE, CFG_SHARE_ARROW) and (plan.assignment == i).any():
            s, li, h = (int(x) for x in np.argwhere(plan.assignment == i)[0])
            layer = plan.model["layers"][li]
            raise OfficialFormatError(f"{plan.source}: method {m.name!r} (step {s}, layer {layer!r}, head {h}) has no "
                                      "DiTFastAttnV2 equivalent: the official files hold only full, cache and arrow:k")
    wt_of = np.array([-1 if m.code == FULL else 0 if m.code == CACHE else m.half_window(n_img) for m in methods],
                     np.int32)
    head_option, output_share = {}, {}
    for li, layer in enumerate(plan.model["layers"]):
        head_option[layer], output_share[layer] = {}, {}
        for s in range(1, plan.steps):
            w = wt_of[plan.assignment[s, li]]  # [H]
            head_option[layer][s] = np.repeat(w, 2).reshape(-1, 2).astype(np.int32)  # repeat_interleave(2)
            output_share[layer][s] = [int(h) for h in np.nonzero(w == 0)[0]]
    return head_option, output_share


def export_official(plan: Plan, out_dir: str | os.PathLike, *, n_img: int, resolution, name: str | None = None,
                    delta=None) -> tuple[str, str]:
    """Write ``{name}_{res}_head_option_{delta}.json`` and ``..._outputshare_option_{delta}.json`` into
    ``out_dir``; returns their paths. ``name`` defaults to the model family, ``delta`` to the plan's
    calibration delta."""
    if name is None:
        name = plan.model["family"]
    if delta is None:
        delta = (plan.calibration or {}).get("delta")
        if delta is None:
            raise ValueError(f"{plan.source}: the plan records no calibration delta: give one for the file names")
    head_option, output_share = export_dicts(plan, n_img)
    os.makedirs(out_dir, exist_ok=True)
    f_h, f_s = official_file_names(name, resolution, delta)
    p_h, p_s = os.path.join(out_dir, f_h), os.path.join(out_dir, f_s)
    save_torch_file(head_option, p_h)
    save_torch_file(output_share, p_s)
    return p_h, p_s


__all__ = ["OfficialFormatError", "load_torch_file", "save_torch_file", "torch_file_bytes", "k_for_half_window",
           "import_official", "import_v1", "export_dicts", "export_official", "official_file_names", "DEFAULT_KS"]
