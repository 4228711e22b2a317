"""``dfa2 plan show | import | export``: inspect plans and convert to/from the official DiTFastAttn files.

Registered by :func:`dfa2_jax.cli.build_parser` through ``add_parser(subparsers)``; each subcommand sets ``fn(args) -> int`` and
raises ValueError subclasses (PlanError, OfficialFormatError, ConfigError) for user errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from dfa2_jax.cli.common import resolve_model, shipped_model_names
from dfa2_jax.plan import Plan, image_tokens, model_info_for
from dfa2_jax.plan.report import layer_index, render_heatmap, summary

DEFAULT_RESOLUTION = 1024


# ============================================================================================ helpers
def parse_resolution(text) -> tuple[int, int]:
    """``"1024"`` -> (1024, 1024); ``"768x1024"`` -> (768, 1024) (height x width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(text))
    if not m:
        raise ValueError(f"--resolution {text!r}: expected R or HxW in pixels, e.g. 1024 or 768x1024")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def _res_label(res: tuple[int, int]):
    return res[0] if res[0] == res[1] else f"{res[0]}_{res[1]}"


def model_dir_info(path: str, text_tokens: int | None = None):
    """(model_info, vae_scale_factor, patch) of a model folder: the transformer config from
    ``<DIR>/transformer/config.json`` (or ``<DIR>/config.json``; a single .safetensors file is inspected), the VAE
    scale factor 2 ** (len(block_out_channels) − 1) from ``<DIR>/vae/config.json`` (8 without one), patch 2
    (SD3's patch_size; FLUX packs 2×2 latents)."""
    from dfa2_jax.models.configs import ConfigError, config_from_json

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model folder or file")
    cfg_path = next((p for p in (os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json"))
                     if os.path.isfile(p)), None)
    if cfg_path is not None:
        config = config_from_json(cfg_path)
    else:
        from dfa2_jax.transformer import config_of

        config = config_of(path)
    vae_factor = 8
    vae_cfg = os.path.join(path, "vae", "config.json") if os.path.isdir(path) else None
    if vae_cfg and os.path.isfile(vae_cfg):
        try:
            with open(vae_cfg) as f:
                blocks = json.load(f)["block_out_channels"]
            vae_factor = 2 ** (len(blocks) - 1)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{vae_cfg}: cannot read block_out_channels ({type(e).__name__}: {e})") from None
    patch = config.patch_size if config.family == "sd3" else 2
    return model_info_for(config, text_tokens), vae_factor, patch


def _calibration_resolution(plan: Plan):
    r = (plan.calibration or {}).get("resolution")
    if isinstance(r, int) and not isinstance(r, bool):
        return r, r
    if isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r):
        return tuple(r)
    return None


def resolve_image_tokens(plan: Plan, resolution, model: str | None) -> tuple[tuple[int, int], int]:
    """(resolution, N_img) for show/export: --resolution (else the plan's calibration resolution, else 1024);
    the VAE factor and patch from --model, else the image-token count the plan recorded for that resolution,
    else 8 and 2 (every released SD3 / FLUX)."""
    cal_res = _calibration_resolution(plan)
    res = parse_resolution(resolution) if resolution is not None else (cal_res or (DEFAULT_RESOLUTION,) * 2)
    if model is not None:
        _, vae, patch = model_dir_info(model)
        return res, image_tokens(res, vae, patch)
    recorded = (plan.calibration or {}).get("image_tokens")
    if cal_res == res and isinstance(recorded, int):
        return res, recorded
    return res, image_tokens(res)


# ============================================================================================ commands
def _resolve_model_arg(args: argparse.Namespace) -> None:
    """--model: a shipped short name, a folder or a Hugging Face cache id -> a local path (None stays None)."""
    if args.model is not None:
        args.model = resolve_model(args.model)


def _cmd_show(args: argparse.Namespace) -> int:
    _resolve_model_arg(args)
    plan = Plan.load(args.plan)
    res, n_img = resolve_image_tokens(plan, args.resolution, args.model)
    if args.layer is not None:
        layer_index(plan, args.layer)
    print(summary(plan, args.plan, res, n_img, args.layer))
    if args.png:
        w, h = render_heatmap(plan, n_img, args.png, layer=args.layer,
                              title=f"{os.path.basename(args.plan)}: attention FLOPs kept at {res[0]}x{res[1]}")
        print(f"wrote {args.png} ({w}x{h})")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from dfa2_jax.plan.official import DEFAULT_KS, import_official, import_v1

    _resolve_model_arg(args)
    v2 = args.head_option is not None or args.output_share is not None
    if v2 == (args.v1 is not None):
        raise ValueError("give either the official V2 files (--head-option and/or --output-share) or a V1 plan "
                         "(--v1), not both" if v2 else "nothing to import: give --head-option/--output-share or --v1")
    info, vae, patch = model_dir_info(args.model, args.text_tokens)
    if v2:
        if args.resolution is None:
            raise ValueError("--resolution is needed to turn the official windows (in tokens) into arrow:k")
        res = parse_resolution(args.resolution)
        n_img = image_tokens(res, vae, patch)
        ks = tuple(int(x) for x in args.candidates.split(",")) if args.candidates else DEFAULT_KS
        plan = import_official(args.head_option, args.output_share, info, n_img, steps=args.steps, candidates=ks,
                               resolution=list(res))
    else:
        plan = import_v1(args.v1, info, window_k=args.window_k, steps=args.steps)
        if args.resolution is not None:
            res = parse_resolution(args.resolution)
            plan.calibration = {**(plan.calibration or {}), "resolution": list(res),
                                "image_tokens": image_tokens(res, vae, patch)}
            plan.validate(n_img=plan.calibration["image_tokens"])
    plan.save(args.output)
    counts = np.bincount(np.asarray(plan.assignment).ravel(), minlength=len(plan.methods))
    print(f"wrote {args.output}: {plan.steps} steps x {plan.num_layers} layers x {plan.num_heads} heads; "
          + ", ".join(f"{m} {c}" for m, c in zip(plan.methods, counts)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dfa2_jax.plan.official import export_official

    _resolve_model_arg(args)
    plan = Plan.load(args.plan)
    if args.model is not None:
        info, _, _ = model_dir_info(args.model, plan.model["text_tokens"])
        plan.validate(info)
    res, n_img = resolve_image_tokens(plan, args.resolution, args.model)
    paths = export_official(plan, args.out_dir, n_img=n_img, resolution=_res_label(res), name=args.name,
                            delta=args.delta)
    for p in paths:
        print(p)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``plan show|import|export`` on the main parser's subparsers."""
    shipped = shipped_model_names()
    p = subparsers.add_parser("plan", help="inspect a plan; import/export the official DiTFastAttn files")
    sub = p.add_subparsers(dest="plan_command", required=True)

    show = sub.add_parser("show", help="summary (FLOPs kept, method mix per layer and step) and a heat-map PNG")
    show.add_argument("plan", help="plan.json")
    show.add_argument("--resolution", default=None,
                      help="R or HxW pixels (default: the plan's calibration resolution, else 1024)")
    show.add_argument("--model", default=None, help=f"model folder (or {shipped}), for its VAE scale factor "
                                                    "(default: none; VAE scale 8)")
    show.add_argument("--png", default=None, help="write a heat-map PNG (layers x steps, and heads x steps of one "
                                                  "layer)")
    show.add_argument("--layer", default=None, help="layer for the per-head table and panel (name, or T12 / S3 / "
                                                    "T0b); default for the panel: the most compressed layer")
    show.set_defaults(fn=_cmd_show)

    imp = sub.add_parser("import", help="official DiTFastAttnV2 (or V1) plan files -> plan.json")
    imp.add_argument("--head-option", default=None, help="{model}_{res}_head_option_{delta}.json")
    imp.add_argument("--output-share", default=None, help="{model}_{res}_outputshare_option_{delta}.json")
    imp.add_argument("--v1", default=None, help="a DiTFastAttn (V1) plan instead")
    imp.add_argument("--model", required=True, help="model folder (transformer/config.json, vae/config.json), or "
                                                    f"{shipped}")
    imp.add_argument("--resolution", default=None, help="R or HxW pixels the official files were made for")
    imp.add_argument("--steps", type=int, default=None, help="number of steps (default: the files' last step + 1)")
    imp.add_argument("--text-tokens", type=int, default=None, help="text length (default SD3 333, FLUX 512)")
    imp.add_argument("--candidates", default=None, help="preferred arrow k values, comma-separated (8,16,32)")
    imp.add_argument("--window-k", type=int, default=8, help="V1: wars:k for residual_window_attn (default 8)")
    imp.add_argument("-o", "--output", required=True, help="plan.json to write")
    imp.set_defaults(fn=_cmd_import)

    exp = sub.add_parser("export", help="plan.json -> official DiTFastAttnV2 head_option / outputshare files")
    exp.add_argument("plan", help="plan.json")
    exp.add_argument("--resolution", default=None, help="R or HxW pixels (default: the plan's calibration "
                                                        "resolution)")
    exp.add_argument("--out-dir", required=True)
    exp.add_argument("--name", default=None, help="model name in the file names (default: the family)")
    exp.add_argument("--delta", default=None, help="delta in the file names (default: the plan's calibration delta)")
    exp.add_argument("--model", default=None, help=f"model folder (or {shipped}): check the plan "
                                                   "against it; its VAE scale factor (default: none)")
    exp.set_defaults(fn=_cmd_export)
    return p


__all__ = ["add_parser", "model_dir_info", "parse_resolution", "resolve_image_tokens"]
