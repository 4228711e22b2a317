"""Import and export of the official DiTFastAttn plan files (thu-nics/DiTFastAttnV2 and V1), without torch.

Official V2 files (docs/PLAN_FORMAT.md, "The official DiTFastAttn files"), torch.save pickles despite the
``.json`` suffix:
- ``{model}_{res}_head_option_{delta}.json``: {layer_name: {step (int): int32 tensor [H, 2]}}, (left, right)
  half-window per head: −1 full, 0 cached, else N_img // (2k) (``dfa_processor_*_flash.py``:
  ``wt[head] = (S - n_text) // (int(ws) * 2)``, then ``repeat_interleave(2).view(-1, 2)``);
- ``{model}_{res}_outputshare_option_{delta}.json``: {layer_name: {step: [cached head indices]}}.
Both hold every step ≥ 1 (step 0 runs dense attention and has no entry); a layer missing from the files is dense.
V1 (thu-nics/DiTFastAttn ``dit_fast_attention.py``): a list (one entry per block) or a dict {block: ...} of
{"attn1": [method per step], "attn2": ..., "ff": ...} with methods ``full_attn``, ``output_share`` (AST),
``residual_window_attn`` (WA-RS) and the ``+cfg_attn_share`` suffix (ASC); stored as a torch pickle or JSON.

The files are read and written by the restricted torch-pickle codec :mod:`converters.torch_pickle`, which never
runs code from a file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from converters.torch_pickle import TorchFileError, load_torch_file, save_torch_file
from dfa2_jax.plan.methods import ARROW, CACHE, CFG_SHARE, CFG_SHARE_ARROW, FULL, WARS, parse_method
from dfa2_jax.plan.format import Plan

DEFAULT_KS = (8, 16, 32)  # the official arrow candidates (arrow_attn_8/16/32)


class OfficialFormatError(ValueError):
    """An official plan file that cannot be read or converted; the message names the file and the entry."""


def _load(path) -> Any:
    try:
        return load_torch_file(path)
    except TorchFileError as e:
        raise OfficialFormatError(str(e)) from None


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
    ho = _load(head_option) if isinstance(head_option, (str, os.PathLike)) else head_option
    os_ = _load(output_share) if isinstance(output_share, (str, os.PathLike)) else output_share
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
            data = _load(source)
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
    # V1 calibrated FLUX without classifier-free guidance: its cfg_attn_share has nothing to share there
    plan.validate(model_info, cfg=False if model_info["family"] == "flux" else None)
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


__all__ = ["OfficialFormatError", "k_for_half_window",
           "import_official", "import_v1", "export_dicts", "export_official", "official_file_names", "DEFAULT_KS"]
