"""The plan file (format v1, docs/PLAN_FORMAT.md): which method every (step, layer, head) uses.

```
{"format": "dfa2-plan", "version": 1,
 "model": {"family", "layers", "num_heads", "head_dim", "text_tokens", "text_position"},
 "steps": T, "methods": [names], "assignment": int [T][L][H] indexing methods,
 "calibration": {...} | null, "stats": {...} | null}
```
Windows are fractions of the image-token count (``arrow:k`` = half-width N_img // (2k)), so one plan serves every
resolution of its model; :meth:`Plan.to_arrays` turns it into the int arrays the scanned sampler consumes for
one resolution.

Semantic rules checked by :meth:`Plan.validate` (besides shapes and types):
- step 0 is ``full`` for every head: the head cache holds each head's latest output and every step writes it,
  so ``cache`` at step t ≥ 1 always has step t−1's output to read; only step 0 has nothing before it;
- ``wars:k`` reads the residual (full − window) stored at an earlier ``full`` step of the same (layer, head),
  computed there with that head's one k: all ``wars`` steps of a (layer, head) use the same k;
- ``cfg_share`` / ``cfg_share+arrow:k`` need classifier-free guidance (SD3 with guidance, FLUX with true CFG: a
  negative prompt and true_cfg_scale > 1); a run without it (``validate(cfg=False)``) rejects them;
- at a given resolution every windowed method has a non-empty band (N_img // (2k) ≥ 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from dfa2_jax.atomic import write_atomic
from dfa2_jax.plan.methods import CACHE, CFG_CODES, FULL, WARS, Method, parse_method

FORMAT = "dfa2-plan"
VERSION = 1
FAMILIES = ("sd3", "flux")
TEXT_POSITION = {"sd3": "last", "flux": "first"}  # SD3 joint order [image, text]; FLUX [text, image]
DEFAULT_TEXT_TOKENS = {"sd3": 333, "flux": 512}  # SD3: 77 CLIP + 256 T5; FLUX: 512 T5 (dev)
MODEL_KEYS = ("family", "layers", "num_heads", "head_dim", "text_tokens", "text_position")
_KEY_ORDER = ("format", "version", "model", "steps", "methods", "assignment", "calibration", "stats")


class PlanError(ValueError):
    """A plan that is not a valid v1 plan (or does not fit a model); the message names the file and field."""


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def image_tokens(resolution: int | tuple[int, int], vae_scale_factor: int = 8, patch: int = 2) -> int:
    """N_img for an image of ``resolution`` (int = square, or (height, width)) pixels: (H/(f·p))·(W/(f·p))."""
    h, w = (resolution, resolution) if _is_int(resolution) else tuple(resolution)
    div = vae_scale_factor * patch
    if h <= 0 or w <= 0 or h % div or w % div:
        raise ValueError(f"resolution {h}x{w} must be positive multiples of vae_scale_factor·patch = "
                         f"{vae_scale_factor}·{patch} = {div}")
    return (h // div) * (w // div)


def model_info_for(transformer_config, text_tokens: int | None = None) -> dict[str, Any]:
    """The plan's ``model`` dict for one of our transformer configs (``SD3Config`` / ``FluxConfig``).

    ``text_tokens`` defaults to the pipelines' default text length (SD3 333 = 77 CLIP + 256 T5; FLUX 512).
    """
    family = transformer_config.family
    if family == "sd3":
        from dfa2_jax.models.sd3 import sd3_attention_layer_names as names_of
    elif family == "flux":
        from dfa2_jax.models.flux import flux_attention_layer_names as names_of
    else:  # pragma: no cover - configs only come in these two families
        raise ValueError(f"unknown model family {family!r}")
    return {"family": family, "layers": list(names_of(transformer_config)),
            "num_heads": int(transformer_config.num_attention_heads),
            "head_dim": int(transformer_config.attention_head_dim),
            "text_tokens": int(DEFAULT_TEXT_TOKENS[family] if text_tokens is None else text_tokens),
            "text_position": TEXT_POSITION[family]}


@dataclasses.dataclass(eq=False)
class Plan:
    """A v1 plan. ``assignment`` is an int32 array [steps, layers, heads] (nested lists are accepted and
    converted; malformed input is kept as given so that :meth:`validate` can name the bad entry)."""

    model: dict[str, Any]
    steps: int
    methods: list[str]
    assignment: Any
    calibration: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    source: str = dataclasses.field(default="plan", repr=False)  # file name used in error messages

    def __post_init__(self):
        self.methods = list(self.methods) if isinstance(self.methods, (list, tuple)) else self.methods
        self.assignment = _as_int_array(self.assignment)

    # ----------------------------------------------------------------------------------------------- build
    @classmethod
    def all_full(cls, model_info: dict[str, Any], steps: int) -> Plan:
        """The dense plan: every head ``full`` at every step."""
        shape = (steps, len(model_info["layers"]), model_info["num_heads"])
        plan = cls(dict(model_info), steps, ["full"], np.zeros(shape, np.int32))
        plan.validate()
        return plan

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> Plan:
        """A plan from its JSON object (validated)."""
        if not isinstance(d, dict):
            raise PlanError(f"{source}: expected a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        if fmt != FORMAT:
            raise PlanError(f"{source}: format = {fmt!r}: not a dfa2 plan (expected format {FORMAT!r})")
        ver = d.get("version")
        if ver != VERSION:
            raise PlanError(f"{source}: version = {ver!r} is not supported (expected {VERSION})")
        for key in ("model", "steps", "methods", "assignment"):
            if key not in d:
                raise PlanError(f"{source}: missing field {key!r}")
        unknown = sorted(set(d) - set(_KEY_ORDER))
        if unknown:
            raise PlanError(f"{source}: unknown field(s) {unknown} (known: {list(_KEY_ORDER)})")
        plan = cls(d["model"], d["steps"], d["methods"], d["assignment"], d.get("calibration"), d.get("stats"),
                   source=source)
        plan.validate()
        return plan

    def to_dict(self) -> dict[str, Any]:
        a = self.assignment
        return {"format": FORMAT, "version": VERSION, "model": self.model, "steps": self.steps,
                "methods": list(self.methods), "assignment": a.tolist() if isinstance(a, np.ndarray) else a,
                "calibration": self.calibration, "stats": self.stats}

    def __eq__(self, other):
        if not isinstance(other, Plan):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    # ------------------------------------------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = os.fspath(path)
        name = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise PlanError(f"{name}: no such plan file") from None
        except OSError as e:
            raise PlanError(f"{name}: cannot read the plan ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise PlanError(f"{name}: not a JSON plan (binary content; an official DiTFastAttnV2 *_head_option_* "
                            "file is a torch pickle: convert it with `dfa2 plan import`)") from None
        if not text.strip():
            raise PlanError(f"{name}: empty file (expected a JSON plan)")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            what = "truncated" if e.pos >= len(text.rstrip()) else "not valid JSON"
            raise PlanError(f"{name}: {what} (line {e.lineno} column {e.colno}: {e.msg})") from None
        except RecursionError:  # e.g. "[[[[...]]]]" deeper than the decoder's recursion limit
            raise PlanError(f"{name}: not a plan (JSON nested deeper than Python's recursion limit)") from None
        try:
            return cls.from_dict(d, source=name)
        except RecursionError:
            raise PlanError(f"{name}: not a plan (values nested too deeply)") from None

    def save(self, path: str | os.PathLike) -> None:
        """Validate, then write atomically (temp file in the same folder + os.replace)."""
        self.validate()
        write_atomic(path, self.to_json())

    def to_json(self) -> str:
        """Stable key order; the assignment one line per step; everything else indented."""
        d = self.to_dict()
        lines = ["{"]
        for i, key in enumerate(_KEY_ORDER):
            end = "," if i < len(_KEY_ORDER) - 1 else ""
            if key == "assignment":
                rows = [json.dumps(step, separators=(",", ":")) for step in d[key]]
                body = "[\n" + ",\n".join("    " + r for r in rows) + "\n  ]" if rows else "[]"
            elif key == "model":
                # layers on one line: a model has up to 57 of them
                m = d[key]
                items = [f"    {json.dumps(k)}: {json.dumps(m[k], default=_json_default)}" for k in MODEL_KEYS]
                body = "{\n" + ",\n".join(items) + "\n  }"
            elif key == "methods":
                body = json.dumps(d[key])
            else:
                body = json.dumps(d[key], indent=2, ensure_ascii=False, default=_json_default).replace("\n", "\n  ")
            lines.append(f"  {json.dumps(key)}: {body}{end}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------------------------------- validate
    def _err(self, msg: str) -> PlanError:
        return PlanError(f"{self.source}: {msg}")

    def parsed_methods(self) -> list[Method]:
        return [parse_method(m) for m in self.methods]

    def validate(self, model_info: dict[str, Any] | None = None, *, n_img: int | None = None,
                 cfg: bool | None = None) -> Plan:
        """Check the plan (and, when given, that it fits ``model_info``, that every used window is non-empty at
        ``n_img`` image tokens, and that CFG methods are only used when ``cfg`` is not False: None = not known
        here, as when a plan is loaded or saved; the run checks with its own ``cfg``). Returns self."""
        self._validate_model()
        if not _is_int(self.steps) or self.steps < 1:
            raise self._err(f"steps = {self.steps!r} must be an integer >= 1")
        methods = self._validate_methods()
        a = self._validate_assignment()
        for key in ("calibration", "stats"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), dict):
                raise self._err(f"{key} must be an object or null, got {type(getattr(self, key)).__name__}")
        used = sorted(set(np.unique(a).tolist()))
        # step 0 full
        bad = np.argwhere(~np.isin(a[0], [i for i, m in enumerate(methods) if m.code == FULL]))
        if bad.size:
            li, hi = (int(x) for x in bad[0])
            m = self.methods[a[0, li, hi]]
            why = " (nothing is cached before the first step)" if methods[a[0, li, hi]].code == CACHE else ""
            raise self._err(f"assignment[0][{li}][{hi}] = {a[0, li, hi]} ({m!r}): step 0 must be 'full' for every "
                            f"head{why}")
        self._validate_wars(methods, a)
        fam = self.model["family"]
        if cfg is False:
            for i in used:
                if methods[i].code in CFG_CODES:
                    s, li, hi = (int(x) for x in np.argwhere(a == i)[0])
                    why = ("FLUX has no classifier-free guidance here (true CFG needs a negative prompt and "
                           "true_cfg_scale > 1; cfg=False)" if fam == "flux" else "the run has no CFG (cfg=False)")
                    raise self._err(f"assignment[{s}][{li}][{hi}] = {i} ({self.methods[i]!r}): a CFG-sharing method "
                                    f"needs classifier-free guidance, but {why}")
        if n_img is not None:
            if not _is_int(n_img) or n_img < 1:
                raise ValueError(f"n_img = {n_img!r} must be a positive integer")
            for i in used:
                m = methods[i]
                if m.k and m.half_window(n_img) == 0:
                    raise self._err(f"method {m.name!r} at {n_img} image tokens: the band half-width "
                                    f"{n_img} // (2·{m.k}) = 0 is empty (window larger than the image); use "
                                    f"k <= {n_img // 2} or a larger resolution")
        if model_info is not None:
            self._validate_against(model_info)
        return self

    def _validate_model(self):
        m = self.model
        if not isinstance(m, dict):
            raise self._err(f"model must be an object with keys {list(MODEL_KEYS)}, got {type(m).__name__}")
        for k in MODEL_KEYS:
            if k not in m:
                raise self._err(f"missing field model.{k}")
        unknown = sorted(set(m) - set(MODEL_KEYS))
        if unknown:
            raise self._err(f"unknown field(s) model.{unknown} (known: {list(MODEL_KEYS)})")
        if m["family"] not in FAMILIES:
            raise self._err(f"model.family = {m['family']!r} must be one of {list(FAMILIES)}")
        layers = m["layers"]
        if not isinstance(layers, list) or not layers or not all(isinstance(x, str) and x for x in layers):
            raise self._err("model.layers must be a non-empty list of layer names")
        if len(set(layers)) != len(layers):
            dup = next(x for x in layers if layers.count(x) > 1)
            raise self._err(f"model.layers: {dup!r} appears more than once")
        for k, lo in (("num_heads", 1), ("head_dim", 1), ("text_tokens", 0)):
            if not _is_int(m[k]) or m[k] < lo:
                raise self._err(f"model.{k} = {m[k]!r} must be an integer >= {lo}")
        want = TEXT_POSITION[m["family"]]
        if m["text_position"] != want:
            raise self._err(f"model.text_position = {m['text_position']!r}: the {m['family']} family has its text "
                            f"tokens {want!r} (expected {want!r})")

    def _validate_methods(self) -> list[Method]:
        if not isinstance(self.methods, list) or not self.methods:
            raise self._err("methods must be a non-empty list of method names")
        out = []
        for i, name in enumerate(self.methods):
            try:
                m = parse_method(name)
            except ValueError as e:
                raise self._err(f"methods[{i}]: {e}") from None
            if m.name != name:
                raise self._err(f"methods[{i}] = {name!r}: write it as {m.name!r}")
            out.append(m)
        if len(set(self.methods)) != len(self.methods):
            dup = next(x for x in self.methods if self.methods.count(x) > 1)
            raise self._err(f"methods: {dup!r} appears more than once")
        return out

    def _validate_assignment(self) -> np.ndarray:
        t, n_layers, n_heads = self.steps, len(self.model["layers"]), self.model["num_heads"]
        a = self.assignment
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
            a = a.tolist() if isinstance(a, np.ndarray) else a
            _walk_assignment(a, (t, n_layers, n_heads), self._err)  # raises on the first malformed entry
            a = np.asarray(a, dtype=np.int64)
            if a.size and (a.min() < -2**31 or a.max() >= 2**31):
                raise self._err("assignment: values outside the int32 range")
            self.assignment = a = a.astype(np.int32)  # normalise lists set after construction
        if a.ndim != 3:
            raise self._err(f"assignment must be nested lists [steps][layers][heads], got {a.ndim} levels")
        for axis, (got, want, what) in enumerate(zip(a.shape, (t, n_layers, n_heads),
                                                     ("steps (steps)", "layers (model.layers)",
                                                      "heads (model.num_heads)"))):
            if got != want:
                where = "assignment" + "[0]" * axis
                raise self._err(f"{where} has {got} entries but the plan has {want} {what}")
        bad = np.argwhere((a < 0) | (a >= len(self.methods)))
        if bad.size:
            s, li, hi = (int(x) for x in bad[0])
            raise self._err(f"assignment[{s}][{li}][{hi}] = {a[s, li, hi]} is not an index into methods "
                            f"({len(self.methods)} methods)")
        return a

    def _validate_wars(self, methods: list[Method], a: np.ndarray):
        wars = [i for i, m in enumerate(methods) if m.code == WARS]
        if not wars:
            return
        full = [i for i, m in enumerate(methods) if m.code == FULL]
        is_wars = np.isin(a, wars)
        seen_full = np.maximum.accumulate(np.isin(a, full), axis=0)
        bad = np.argwhere(is_wars & ~seen_full)
        if bad.size:
            s, li, hi = (int(x) for x in bad[0])
            raise self._err(f"assignment[{s}][{li}][{hi}] = {a[s, li, hi]} ({self.methods[a[s, li, hi]]!r}): wars "
                            "needs an earlier 'full' step of the same head (the residual is stored there)")
        ks = np.where(is_wars, np.array([m.k for m in methods])[a], 0)  # [T, L, H]
        kmax, kmin = ks.max(axis=0), np.where(ks > 0, ks, np.iinfo(np.int64).max).min(axis=0)
        bad = np.argwhere((kmax > 0) & (kmax != kmin))
        if bad.size:
            li, hi = (int(x) for x in bad[0])
            steps = [int(s) for s in np.nonzero(is_wars[:, li, hi])[0]]
            names = sorted({self.methods[a[s, li, hi]] for s in steps})
            raise self._err(f"assignment[*][{li}][{hi}]: layer {self.model['layers'][li]!r} head {hi} uses {names} "
                            f"at steps {steps}: one head must use a single wars k (its residual is computed at the "
                            "full steps with that window)")

    def _validate_against(self, model_info: dict[str, Any]):
        m = self.model
        for key in ("family", "num_heads", "head_dim", "text_tokens", "text_position"):
            if key in model_info and model_info[key] != m[key]:
                raise self._err(f"model.{key} = {m[key]!r} but the model has {key} = {model_info[key]!r}")
        if "layers" in model_info:
            theirs = list(model_info["layers"])
            if len(theirs) != len(m["layers"]):
                raise self._err(f"model.layers has {len(m['layers'])} layers but the model has {len(theirs)} "
                                "attention layers")
            for i, (a, b) in enumerate(zip(m["layers"], theirs)):
                if a != b:
                    raise self._err(f"model.layers[{i}] = {a!r} but the model's layer {i} is {b!r}")

    # ----------------------------------------------------------------------------------------- runtime data
    def to_arrays(self, n_img: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes int32 [T, L, H], half_windows int32 [T, L, H] in tokens (−1: no band), resid_windows int32 [L, H]:
        the half-window of each head's ``wars`` residual, −1 for heads that never use ``wars``)."""
        self.validate(n_img=n_img)
        methods = self.parsed_methods()
        a = self.assignment
        codes = np.array([m.code for m in methods], np.int32)[a]
        hw = np.array([m.half_window(n_img) for m in methods], np.int32)[a]
        resid = np.where(codes == WARS, hw, -1).max(axis=0).astype(np.int32)
        return codes, hw, resid

    def residual_steps(self) -> np.ndarray:
        """bool [T, L, H]: the ``full`` steps at which a head must also compute its window residual: a later
        ``wars`` step comes before its next ``full`` step (V1's ``compute_need_compute_residual``)."""
        self.validate()
        methods = self.parsed_methods()
        codes = np.array([m.code for m in methods], np.int32)[self.assignment]
        out = np.zeros(codes.shape, bool)
        pending = np.zeros(codes.shape[1:], bool)  # a wars step after this one, before the next full step
        for s in range(codes.shape[0] - 1, -1, -1):
            is_full = codes[s] == FULL
            out[s] = is_full & pending
            pending = np.where(codes[s] == WARS, True, np.where(is_full, False, pending))
        return out

    @property
    def num_layers(self) -> int:
        return len(self.model["layers"])

    @property
    def num_heads(self) -> int:
        return int(self.model["num_heads"])


def _json_default(x):
    """numpy scalars / arrays in calibration metadata and stats are written as plain JSON numbers / lists."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _as_int_array(a):
    if isinstance(a, np.ndarray) and a.dtype.kind in "iu":
        return a.astype(np.int32) if a.size == 0 or (a.min() >= -2**31 and a.max() < 2**31) else a
    if isinstance(a, (list, tuple)):
        try:
            arr = np.asarray(a)
            # np.asarray turns [True, 2] into ints: keep lists with JSON booleans for validate() to name them
            if arr.dtype.kind in "iu" and arr.ndim == 3 and not any(
                    type(v) is bool for step in a for layer in step for v in layer):
                return _as_int_array(arr)
        except (ValueError, TypeError):  # ragged or not nested lists
            pass
    return a


def _walk_assignment(a, shape, err):
    """Raise an error naming the first malformed entry of a nested-list assignment (returns if there is none)."""
    names = ("steps (steps)", "layers (model.layers)", "heads (model.num_heads)")

    def walk(x, depth, where):
        if depth == 3:
            if not _is_int(x):
                raise err(f"{where} = {x!r} must be an integer index into methods")
            return
        if not isinstance(x, (list, tuple)):
            raise err(f"{where} = {x!r} must be a list ({names[depth].split()[0]})")
        if len(x) != shape[depth]:
            raise err(f"{where} has {len(x)} entries but the plan has {shape[depth]} {names[depth]}")
        for i, y in enumerate(x):
            walk(y, depth + 1, f"{where}[{i}]")

    walk(a, 0, "assignment")


__all__ = ["Plan", "PlanError", "model_info_for", "image_tokens", "FORMAT", "VERSION", "DEFAULT_TEXT_TOKENS",
           "TEXT_POSITION"]
