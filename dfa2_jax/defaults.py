"""Generation defaults that travel with a model: ``dfa2_defaults.json`` in a diffusers pipeline folder.

A pipeline folder may carry the settings it should be sampled with, next to ``model_index.json``::

    {
      "_comment": "anything under a key starting with '_' is ignored",
      "height": 64,
      "width": 64,
      "num_inference_steps": 28,
      "guidance_scale": 4.0,
      "max_sequence_length": 32,
      "dtype": "float32"
    }

Every field is optional; a missing one (or a folder without the file) takes the family's published default,
as diffusers' pipelines have them (:func:`family_defaults`):

===================  ========================  =====================  ===========================
field                SD3 / SD3.5               FLUX.1-dev             FLUX.1-schnell (no guidance
                                                                      embedding)
===================  ========================  =====================  ===========================
height, width        sample_size · VAE scale   128 · VAE scale        128 · VAE scale
                     (1024)                    (1024)                 (1024)
num_inference_steps  28                        28                     4
guidance_scale       7.0 (CFG when > 1;        3.5 (embedded)         null (the model takes none;
                     null = 1.0: no CFG)                              0 reads as null)
max_sequence_length  256 (T5 tokens)           512                    256 (diffusers' docs: at most)
dtype                bfloat16                  bfloat16               bfloat16
===================  ========================  =====================  ===========================

Field rules (:func:`read_defaults` checks each, naming the file and the field): height, width,
num_inference_steps and max_sequence_length are integers >= 1 (max_sequence_length <= 512, T5's limit);
guidance_scale is a finite number >= 0, or null for a model without guidance; dtype is one of
float32, bfloat16, float16. Unknown fields are errors (a typo must not be silently ignored).

``dfa2 generate | calibrate | eval`` and the Python pipelines (``pipe(prompt)`` with the arguments left None)
take these as their defaults (:func:`pipeline_defaults`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

DEFAULTS_FILE = "dfa2_defaults.json"
DTYPES = ("float32", "bfloat16", "float16")
MAX_T5_TOKENS = 512  # diffusers' SD3 and FLUX pipelines refuse longer T5 sequences


class DefaultsError(ValueError):
    """A bad ``dfa2_defaults.json`` (names the file and the field)."""


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Recommended generation settings of one model (``pipe(...)`` keyword names)."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float | None  # None: the model takes no guidance (FLUX.1-schnell, the FLUX-style testbed)
    max_sequence_length: int  # T5 tokens the prompt is padded / truncated to
    dtype: str = "bfloat16"

    @classmethod
    def sd3(cls, **override) -> GenerationDefaults:
        """diffusers' ``StableDiffusion3Pipeline``: 1024² (sample_size 128 x VAE scale 8), 28 steps, CFG 7.0,
        T5 256."""
        return dataclasses.replace(cls(1024, 1024, 28, 7.0, 256), **override)

    @classmethod
    def flux_dev(cls, **override) -> GenerationDefaults:
        """diffusers' ``FluxPipeline`` (FLUX.1-dev): 1024², 28 steps, guidance embedding 3.5, T5 512."""
        return dataclasses.replace(cls(1024, 1024, 28, 3.5, 512), **override)

    @classmethod
    def flux_schnell(cls, **override) -> GenerationDefaults:
        """FLUX.1-schnell as diffusers' docs run it: 1024², 4 steps, no guidance, T5 256 (schnell's limit)."""
        return dataclasses.replace(cls(1024, 1024, 4, None, 256), **override)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def generate_kwargs(self) -> dict[str, Any]:
        """``pipe(prompts, **...)`` keyword arguments (``guidance_scale`` only where the model takes one)."""
        kw = {"height": self.height, "width": self.width, "num_inference_steps": self.num_inference_steps,
              "max_sequence_length": self.max_sequence_length}
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        return kw


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationDefaults))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_field(name: str, value, where: str) -> Any:
    """``value`` of field ``name``, checked; ``where`` prefixes the error (a file or a flag)."""
    if name in ("height", "width", "num_inference_steps", "max_sequence_length"):
        if not _is_int(value) or value < 1:
            raise DefaultsError(f"{where}: {name} = {value!r} must be an integer >= 1")
        if name == "max_sequence_length" and value > MAX_T5_TOKENS:
            raise DefaultsError(f"{where}: {name} = {value} must be <= {MAX_T5_TOKENS} (T5's limit)")
        return int(value)
    if name == "guidance_scale":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise DefaultsError(f"{where}: {name} = {value!r} must be a finite number >= 0, or null for a model "
                                "without guidance")
        return float(value)
    if name == "dtype":
        if value not in DTYPES:
            raise DefaultsError(f"{where}: {name} = {value!r} must be one of {', '.join(DTYPES)}")
        return str(value)
    raise DefaultsError(f"{where}: unknown field {name!r} (known: {', '.join(FIELDS)}; keys starting with '_' are "
                        "comments)")


def read_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """The fields a ``dfa2_defaults.json`` sets (a file, or a folder holding one), each checked. Raises
    FileNotFoundError without the file, DefaultsError naming the file and field otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, DEFAULTS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such defaults file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DefaultsError(f"{path}: cannot read the defaults file ({getattr(e, 'strerror', None) or e})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DefaultsError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise DefaultsError(f"{path}: nested too deeply to be a defaults file") from None
    if not isinstance(raw, dict):
        raise DefaultsError(f"{path}: expected a JSON object of {', '.join(FIELDS)}; got {type(raw).__name__}")
    return {k: check_field(k, v, path) for k, v in raw.items() if not k.startswith("_")}


def write_defaults(path: str | os.PathLike, defaults: GenerationDefaults, comment: str | None = None) -> None:
    """Write ``defaults`` as a ``dfa2_defaults.json`` (``path``: the file or its folder), atomically."""
    from dfa2_jax.atomic import write_atomic

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, DEFAULTS_FILE)
    d = {**({"_comment": comment} if comment else {}), **defaults.to_dict()}
    write_atomic(path, json.dumps(d, indent=2) + "\n")


def family_defaults(config, vae_scale_factor: int = 8) -> GenerationDefaults:
    """The published defaults of ``config``'s family (an ``SD3Config`` / ``FluxConfig``), as diffusers computes
    them: SD3 height = width = ``sample_size`` x VAE scale; FLUX 128 x VAE scale; FLUX without a guidance
    embedding is schnell (4 steps, no guidance, T5 256)."""
    if config.family == "sd3":
        size = int(config.sample_size) * int(vae_scale_factor)
        return GenerationDefaults.sd3(height=size, width=size)
    size = 128 * int(vae_scale_factor)
    preset = GenerationDefaults.flux_dev if config.guidance_embeds else GenerationDefaults.flux_schnell
    return preset(height=size, width=size)


def model_defaults(folder: str | os.PathLike | None, config, vae_scale_factor: int = 8) -> GenerationDefaults:
    """The defaults of the pipeline ``folder``: its ``dfa2_defaults.json`` over :func:`family_defaults`.
    A guidance_scale for a model without guidance embedding (FLUX.1-schnell-like) is an error naming the file."""
    base = family_defaults(config, vae_scale_factor)
    path = None if folder is None else os.path.join(os.fspath(folder), DEFAULTS_FILE)
    if path is None or not os.path.isfile(path):
        return base
    fields = read_defaults(path)
    g = fields.get("guidance_scale")
    if config.family == "flux" and not config.guidance_embeds and g:
        raise DefaultsError(f"{path}: guidance_scale = {g!r}, but this FLUX model has no guidance embedding "
                            "(use null)")
    if config.family == "flux" and not config.guidance_embeds:
        fields["guidance_scale"] = None  # 0 means "none" (diffusers' schnell examples pass 0.0)
    elif config.family == "flux" and "guidance_scale" in fields and g is None:
        raise DefaultsError(f"{path}: guidance_scale = null, but this FLUX model has a guidance embedding (give a "
                            "number, e.g. 3.5)")
    if config.family == "sd3" and "guidance_scale" in fields and fields["guidance_scale"] is None:
        fields["guidance_scale"] = 1.0  # SD3: no guidance = CFG off (scale <= 1)
    return dataclasses.replace(base, **fields)


def pipeline_root(transformer_path: str | os.PathLike | None) -> str | None:
    """The pipeline folder a transformer was loaded from (``<root>/transformer`` -> ``<root>``), else None."""
    if transformer_path is None:
        return None
    p = os.path.abspath(os.fspath(transformer_path))
    if os.path.basename(p) == "transformer":
        return os.path.dirname(p)
    return p if os.path.isdir(p) and os.path.isfile(os.path.join(p, DEFAULTS_FILE)) else None


def pipeline_defaults(pipe) -> GenerationDefaults:
    """The defaults of a loaded pipeline: ``pipe.defaults`` when set (assign a :class:`GenerationDefaults` to
    override), else those of the folder it was loaded from (:func:`model_defaults`), remembered on ``pipe``."""
    d = getattr(pipe, "defaults", None)
    if isinstance(d, GenerationDefaults):
        return d
    tr = pipe.transformer
    d = model_defaults(pipeline_root(getattr(tr, "path", None)), tr.config, pipe.vae_scale_factor)
    try:
        pipe.defaults = d
    except AttributeError:  # a pipeline class with __slots__: recompute next time
        pass
    return d


__all__ = ["DEFAULTS_FILE", "DTYPES", "GenerationDefaults", "DefaultsError", "check_field", "read_defaults",
           "write_defaults", "family_defaults", "model_defaults", "pipeline_root", "pipeline_defaults"]
