"""What the commands share: the parser with one-line errors, ``--model`` resolution (short names, folders, Hugging
Face cache ids) and inspection before any weight is loaded (:class:`ModelFolder`), the checks every argument goes
through before the work starts, the mesh flags, atomic output writes, prompts from flags or a file.

Every check raises ValueError (or FileNotFoundError) with one line naming the flag or file and what was expected;
:func:`dfa2_jax.cli.main` prints it as ``dfa2 <command>: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any


# ============================================================================================ parser
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``dfa2 generate: error: argument --dtype: invalid choice ...``),
    like the commands' own errors; exit status 2 as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the user should know (e.g. how to resume): ``dfa2 <cmd>: interrupted; <message>``."""


def _family_help(field: str) -> str:
    from dfa2_jax.defaults import GenerationDefaults

    def fmt(v):
        return "none" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    sd3, dev, schnell = (getattr(p(), field) for p in (GenerationDefaults.sd3, GenerationDefaults.flux_dev,
                                                        GenerationDefaults.flux_schnell))
    if fmt(dev) == fmt(schnell):
        return f"SD3 {fmt(sd3)}, FLUX {fmt(dev)}"
    return f"SD3 {fmt(sd3)}, FLUX.1-dev {fmt(dev)}, FLUX.1-schnell {fmt(schnell)}"


def default_help(field: str, first: str = "") -> str:
    """``default: [first, else] from the model folder's dfa2_defaults.json, else the family's (SD3 28, ...)``."""
    return (f"default: {first + ', else ' if first else ''}from the model folder's dfa2_defaults.json, else the "
            f"family's ({_family_help(field)})")


def shipped_model_names() -> str:
    """The shipped short model names (:data:`dfa2_jax.testbed.shipped.MODEL_NAMES`), comma-separated, for help texts
    and errors."""
    from dfa2_jax.testbed.shipped import MODEL_NAMES

    return ", ".join(MODEL_NAMES)


def add_model_arg(parser: argparse.ArgumentParser, what: str = "diffusers pipeline folder (model_index.json, "
                  "transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/)", required: bool = True) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help=f"{what}; a Hugging Face id org/name already in the local hub cache; or a shipped "
                             f"model: {shipped_model_names()}" + ("" if required else " (default: none)"))


def add_generation_args(parser: argparse.ArgumentParser, *, size: bool = True, steps_help: str | None = None,
                        size_default: str = "") -> None:
    """--height/--width, --steps, --guidance, --max-sequence-length, --dtype: default None = the model's."""
    if size:
        for name in ("height", "width"):
            parser.add_argument(f"--{name}", type=int, default=None,
                                help=f"pixels, a multiple of the model's VAE scale x patch; "
                                     f"{default_help(name, size_default)}")
    parser.add_argument("--steps", type=int, default=None,
                        help=steps_help or f"denoising steps; {default_help('num_inference_steps')}")
    parser.add_argument("--guidance", type=float, default=None,
                        help="SD3: classifier-free guidance scale (> 1 turns CFG on; 0 to 1: off); FLUX.1-dev: "
                             "the guidance embedding's value; not for models without one (FLUX.1-schnell); "
                             f"must be >= 0; {default_help('guidance_scale')}")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help=f"T5 tokens the prompt is padded to (1 to 512; a model sees other text tokens at "
                             f"another length); {default_help('max_sequence_length')}")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help=f"weights and activations; {default_help('dtype')}")


def add_attention_impl_arg(parser: argparse.ArgumentParser) -> None:
    from dfa2_jax.runtime import ATTENTION_IMPLS

    parser.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS,
                        help="how a plan's compressed heads run: auto (default: the Pallas kernel on a GPU — Mosaic "
                             "GPU on Hopper, Triton elsewhere — and the jnp reference on a CPU), xla (the jnp "
                             "reference), triton, mosaic_gpu, interpret (the Triton kernel in Pallas interpret mode)")


def add_mesh_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--mesh", default="auto",
                        help=f"device mesh for {what}, e.g. data=2,heads=4 (axes: data, cfg (SD3 CFG halves), "
                             "heads (Megatron head parallel), seq (Ulysses: tokens split outside attention, heads "
                             "inside)); 'auto' (default): every local device on the data axis when the batch "
                             "divides over them, else one device; 'none': one device")
    parser.add_argument("--fsdp", action="store_true", help="with --mesh: shard the params over its data axis "
                                                            "(default: replicated)")


CACHE_DIR_HELP = "orbax cache root for converted weights (default: $DFA2_CACHE_DIR, else ~/.cache/dfa2_jax)"


# ============================================================================================ --model
def resolve_model(name: str, flag: str = "--model") -> str:
    """``--model``: a shipped short name (:data:`dfa2_jax.testbed.shipped.MODEL_NAMES`), a local folder or file,
    or a Hugging Face id ``org/name[@revision]`` in the local hub cache -> a local path. One-line errors."""
    from dfa2_jax.testbed.shipped import model_path

    shipped = model_path(name)
    if shipped is not None:
        return shipped
    from converters.hf_cache import is_repo_id, resolve_model_path

    if is_repo_id(name):
        return resolve_model_path(name)  # CheckpointError (ValueError) naming the cache when it is not there
    if not os.path.exists(name):
        raise FileNotFoundError(f"{flag} {name}: no such file or folder (shipped models: {shipped_model_names()}; "
                                "a Hugging Face id is org/name)")
    return name


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read the {what} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object")
    return d


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A pipeline folder read from its config files only (no weights): the transformer config, the VAE's scale
    factor and latent channels, and the generation defaults (:func:`dfa2_jax.defaults.model_defaults`)."""

    path: str
    config: Any  # SD3Config | FluxConfig
    vae_scale_factor: int
    defaults: Any  # GenerationDefaults

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def patch(self) -> int:
        """Latent pixels per token side: SD3's patch_size; FLUX packs 2x2 latents."""
        return int(self.config.patch_size) if self.family == "sd3" else 2

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch

    @property
    def takes_guidance(self) -> bool:
        return self.family == "sd3" or bool(self.config.guidance_embeds)

    def latent_shape(self, batch, height: int, width: int) -> tuple:
        """The initial latents' shape in diffusers' layout: SD3 [B, C, H/f, W/f]; FLUX packed
        [B, (H/f/2)·(W/f/2), C·4] (``in_channels`` of the transformer = C·4)."""
        f = self.vae_scale_factor
        if self.family == "sd3":
            return batch, int(self.config.in_channels), height // f, width // f
        return batch, (height // f // 2) * (width // f // 2), int(self.config.in_channels)

    def latent_layout(self) -> str:
        f = self.vae_scale_factor
        return (f"[B, C, H/{f}, W/{f}]" if self.family == "sd3" else
                f"packed [B, (H/{f}/2)·(W/{f}/2), C·4]")

    def image_tokens(self, height: int, width: int) -> int:
        m = self.size_multiple
        return (height // m) * (width // m)

    def text_tokens(self, max_sequence_length: int) -> int:
        """Text tokens of the joint attention: SD3 77 CLIP + T5; FLUX the T5 length."""
        return (77 + max_sequence_length) if self.family == "sd3" else max_sequence_length


def inspect_model(path: str) -> ModelFolder:
    """Read a (resolved) pipeline folder's ``transformer/config.json`` and ``vae/config.json`` and its defaults;
    errors name the missing or bad file. Loads no weights."""
    from dfa2_jax.defaults import model_defaults
    from dfa2_jax.models.configs import config_from_json

    if not os.path.isdir(path):
        raise ValueError(f"--model {path}: not a pipeline folder (a diffusers folder with transformer/ and vae/)")
    tr_cfg = os.path.join(path, "transformer", "config.json")
    vae_cfg = os.path.join(path, "vae", "config.json")
    for p in (tr_cfg, vae_cfg):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--model {path}: no {os.path.relpath(p, path)} (a diffusers pipeline folder "
                                    "has transformer/, vae/, text_encoder*/, tokenizer*/ and scheduler/)")
    config = config_from_json(tr_cfg)
    vae = _read_json(vae_cfg, "VAE config")
    blocks = vae.get("block_out_channels", (64,))  # diffusers' AutoencoderKL default: one block, scale 1
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{vae_cfg}: block_out_channels must be a non-empty list")
    f = 2 ** (len(blocks) - 1)
    return ModelFolder(path, config, f, model_defaults(path, config, f))


# ============================================================================================ checks
def check_int(flag: str, value: int | None, minimum: int = 1, why: str = "") -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{flag} {value}: must be >= {minimum}{why}")


def check_size(model: ModelFolder, height: int, width: int, flags=("--height", "--width")) -> None:
    """Sizes >= 1, multiples of VAE scale x patch, and (SD3) within the position-embedding table."""
    m = model.size_multiple
    for flag, v in zip(flags, (height, width)):
        if v < 1:
            raise ValueError(f"{flag} {v}: must be >= 1 (pixels)")
        if v % m:
            raise ValueError(f"{flag} {v}: must be a multiple of {m} for this model (VAE scale factor "
                             f"{model.vae_scale_factor} x patch {model.patch}), e.g. {max(m, v // m * m)}")
    if model.family == "sd3" and getattr(model.config, "pos_embed_max_size", None):
        most = int(model.config.pos_embed_max_size) * m
        for flag, v in zip(flags, (height, width)):
            if v > most:
                raise ValueError(f"{flag} {v}: at most {most} for this model (pos_embed_max_size "
                                 f"{model.config.pos_embed_max_size} x patch {model.patch} x VAE scale "
                                 f"{model.vae_scale_factor})")


def add_cfg_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negative-prompt", default=None,
                        help="SD3: the CFG negative prompt (default: empty); FLUX: with --true-cfg-scale > 1")
    parser.add_argument("--true-cfg-scale", type=float, default=None,
                        help="FLUX: true classifier-free guidance with --negative-prompt when > 1 (default 1: off)")


def check_cfg_flags(model, guidance: float | None, negative_prompt: str | None, true_cfg_scale: float | None) -> bool:
    """--negative-prompt / --true-cfg-scale against the model family and guidance; whether the run uses
    classifier-free guidance (SD3: guidance > 1; FLUX: true CFG, a negative prompt and --true-cfg-scale > 1)."""
    do_cfg = model.family == "sd3" and guidance is not None and guidance > 1
    if negative_prompt is not None:
        if model.family == "sd3" and not do_cfg:
            raise ValueError(f"--negative-prompt: needs classifier-free guidance, but the guidance scale is "
                             f"{guidance:g} (CFG is on above 1)")
        if model.family == "flux" and (true_cfg_scale is None or true_cfg_scale <= 1):
            raise ValueError("--negative-prompt: FLUX runs a negative prompt with true CFG only: give "
                             "--true-cfg-scale > 1 as well")
    if true_cfg_scale is not None:
        if model.family != "flux":
            raise ValueError("--true-cfg-scale: FLUX only (SD3's --guidance is already classifier-free guidance)")
        if not true_cfg_scale >= 0 or true_cfg_scale == float("inf"):
            raise ValueError(f"--true-cfg-scale {true_cfg_scale:g}: must be a finite number >= 0")
        if true_cfg_scale > 1 and negative_prompt is None:
            raise ValueError("--true-cfg-scale: true CFG needs a --negative-prompt")
        do_cfg = true_cfg_scale > 1
    return do_cfg


def check_guidance(model: ModelFolder, g: float | None, flag: str = "--guidance") -> float | None:
    """The guidance to run with: ``g`` checked (finite, >= 0; models without a guidance embedding take none,
    0 reading as none as in diffusers' FLUX.1-schnell examples), else the model's default."""
    if g is None:
        return model.defaults.guidance_scale
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"{flag} {g:g}: must be a finite number >= 0 (SD3: > 1 turns classifier-free guidance "
                         "on; FLUX.1-dev: the guidance embedding's value)")
    if not model.takes_guidance:
        if g == 0:
            return None
        raise ValueError(f"{flag} {g:g}: this FLUX model has no guidance embedding (FLUX.1-schnell-like); leave "
                         f"{flag} out")
    return float(g)


def check_max_sequence_length(v: int | None, model: ModelFolder) -> int:
    from dfa2_jax.defaults import MAX_T5_TOKENS

    if v is None:
        return model.defaults.max_sequence_length
    if not 1 <= v <= MAX_T5_TOKENS:
        raise ValueError(f"--max-sequence-length {v}: must be 1 to {MAX_T5_TOKENS} (T5 tokens)")
    return v


def check_mesh(spec: str) -> None:
    if spec not in ("auto", "none"):
        from dfa2_jax.parallel.sharded import parse_mesh

        parse_mesh(spec)


def _check_parent(flag: str, path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag} {path}: the folder {os.path.dirname(path) or parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write into {parent} (permission denied)")


def image_writers() -> dict[str, str]:
    """{extension: PIL format} of the image formats PIL can write here (.png, .jpg, .jpeg, .webp, ...)."""
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def check_image_output(path: str, flag: str = "-o") -> None:
    _check_parent(flag, path)
    ext = os.path.splitext(path)[1].lower()
    writers = image_writers()
    if ext not in writers:
        common = [e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff") if e in writers]
        raise ValueError(f"{flag} {path}: {('extension ' + repr(ext)) if ext else 'no extension'} is not an image "
                         f"format PIL can write (use {', '.join(common)}, ...)")


def check_file_output(path: str, flag: str, suffix: str) -> None:
    _check_parent(flag, path)
    if not path.lower().endswith(suffix):
        raise ValueError(f"{flag} {path}: must end in {suffix}")


def check_input_file(path: str, flag: str) -> None:
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "no such file"
        raise FileNotFoundError(f"{flag} {path}: {what}")


def check_plan(model: ModelFolder, path: str, *, steps: int | None, height: int, width: int, do_cfg: bool,
               flag: str = "--plan"):
    """Load the plan and check it fits the model (family, layers, heads, head_dim), the step count (None: any),
    the image-token count and CFG, before any weight is loaded. Returns the Plan."""
    from dfa2_jax.plan import Plan, PlanError, model_info_for

    check_input_file(path, flag)
    plan = Plan.load(path)
    info = model_info_for(model.config, plan.model.get("text_tokens") if isinstance(plan.model, dict) else None)
    plan.validate(info, n_img=model.image_tokens(height, width), cfg=do_cfg)
    if steps is not None and plan.steps != steps:
        raise PlanError(f"{path}: the plan has {plan.steps} steps but --steps is {steps} (leave --steps out to use "
                        "the plan's)")
    return plan


def check_latents(model: ModelFolder, path: str, height: int, width: int, prompts: int = 1,
                  flag: str = "--latents") -> tuple:
    """The shape of a ``.npy`` of initial latents, checked against the model's layout at height x width (reads the
    header only): one row per prompt, or any number of rows for one prompt. Returns the shape."""
    import numpy as np

    check_input_file(path, flag)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{flag} {path}: not a .npy array ({str(e).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{flag} {path}: not a .npy array (a .npz archive?)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{flag} {path}: dtype {arr.dtype}; expected floating-point noise")
    want = model.latent_shape(prompts, height, width)
    rows_ok = arr.ndim == len(want) and (arr.shape[0] == prompts or (prompts == 1 and arr.shape[0] >= 1))
    if not rows_ok or tuple(arr.shape[1:]) != tuple(want[1:]):
        packed = "packed " if model.family == "flux" else ""
        layout = model.latent_layout().removeprefix("packed ")
        rows = "; B rows give B images of the one prompt" if prompts == 1 else "; one row per --prompt"
        raise ValueError(f"{flag} {path}: shape {tuple(arr.shape)} does not fit {height}x{width} with this model: "
                         f"expected {packed}{tuple(want)} = {layout} ({model.family.upper()}, VAE scale "
                         f"{model.vae_scale_factor}{rows})")
    return tuple(arr.shape)


# ============================================================================================ outputs, prompts
def save_npy_atomic(path: str, array) -> None:
    import numpy as np

    from dfa2_jax.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        np.save(f, array)


def save_images(images, output: str) -> list[str]:
    """One image -> ``output``; several -> ``output`` with ``-0``, ``-1``, ... before the extension. Each file is
    written atomically (a reader, or a Ctrl-C, never leaves a partial image)."""
    from dfa2_jax.atomic import atomic_open

    root, ext = os.path.splitext(output)
    fmt = image_writers().get(ext.lower())
    paths = [output] if len(images) == 1 else [f"{root}-{i}{ext}" for i in range(len(images))]
    for im, p in zip(images, paths):
        with atomic_open(p, "wb") as f:
            im.save(f, format=fmt)
        print(p)
    return paths


def prompts_of(args: argparse.Namespace) -> list[str]:
    if args.prompts and args.prompt:
        raise ValueError("give --prompt or --prompts FILE, not both")
    if args.prompts:
        from dfa2_jax.evaluate import read_prompts

        check_input_file(args.prompts, "--prompts")
        return read_prompts(args.prompts)
    if not args.prompt:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    if any(not p.strip() for p in args.prompt):
        raise ValueError("--prompt '': must be a non-empty text")
    return list(args.prompt)


def parse_resolution_arg(text: str):
    parts = text.lower().replace("x", ",").split(",")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--resolution {text!r}: expected R or HxW") from None
    if len(dims) > 2:
        raise ValueError(f"--resolution {text!r}: expected R or HxW")
    return dims[0] if len(dims) == 1 else tuple(dims[:2])
