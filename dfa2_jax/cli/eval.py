"""``dfa2 eval``: dense vs compressed generation from the same noise; PSNR / SSIM, FLOPs kept, times, a grid PNG
and a JSON report (:func:`dfa2_jax.evaluate.evaluate`); with testbed world captions as prompts, also the testbed
prompt accuracy of both kinds of image.

Registered by :func:`dfa2_jax.cli.build_parser` through ``add_parser(subparsers)``; the subcommand sets ``fn(args) -> int`` and
raises ValueError subclasses (EvalError, PlanError, CheckpointError) for user errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dfa2_jax.cli.common import (CACHE_DIR_HELP, add_attention_impl_arg, add_generation_args, add_model_arg,
                                 check_guidance, check_input_file, check_int, check_max_sequence_length, check_plan,
                                 check_size, inspect_model, resolve_model)

DEFAULT_OUT_DIR = "eval_out"


def resolve(args: argparse.Namespace) -> dict:
    """Check every argument and fill the defaults from the plan and the model's config files (no weights).
    Returns evaluate()'s keywords plus ``model``, ``dtype``, ``prompts``."""
    from dfa2_jax.evaluate import EvalError, read_prompts
    from dfa2_jax.plan import Plan

    model = inspect_model(resolve_model(args.model))
    d = model.defaults
    if args.prompts is not None:
        check_input_file(args.prompts, "--prompts")
        prompts = read_prompts(args.prompts)
    else:
        prompts = list(args.prompt)
    if not prompts or any(not p.strip() for p in prompts):
        raise EvalError("--prompt '': must be a non-empty text")
    for name in ("steps", "height", "width", "batch", "repeat"):
        check_int(f"--{name}", getattr(args, name))
    check_input_file(args.plan, "--plan")
    cal = Plan.load(args.plan).calibration or {}
    r = cal.get("resolution")  # the plan's calibration resolution, else the model's defaults
    rh, rw = (r, r) if isinstance(r, int) else (tuple(r) if isinstance(r, list) and len(r) == 2 else (None, None))
    height = args.height if args.height is not None else (rh if isinstance(rh, int) else d.height)
    width = args.width if args.width is not None else (rw if isinstance(rw, int) else d.width)
    check_size(model, height, width)
    guidance = check_guidance(model, args.guidance)
    do_cfg = model.family == "sd3" and guidance is not None and guidance > 1
    plan = check_plan(model, args.plan, steps=args.steps, height=height, width=width, do_cfg=do_cfg)
    msl = check_max_sequence_length(args.max_sequence_length, model)
    if args.testbed_classifier is not None:
        check_input_file(args.testbed_classifier, "--testbed-classifier")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out-dir {args.out_dir}: is a file, not a folder")
    return dict(model=model.path, dtype=args.dtype or d.dtype, prompts=prompts, height=height, width=width,
                num_inference_steps=plan.steps, guidance_scale=guidance, max_sequence_length=msl)


def run(args: argparse.Namespace) -> int:
    from dfa2_jax.evaluate import evaluate, format_table

    kw = resolve(args)

    from dfa2_jax.pipeline import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(kw.pop("model"), dtype=kw.pop("dtype"), cache_dir=args.cache_dir)
    print(f"loaded {pipe.transformer.config.diffusers_class} pipeline in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    report = evaluate(pipe, args.plan, kw.pop("prompts"), seed=args.seed, out_dir=args.out_dir,
                      batch_size=args.batch, repeat=args.repeat, metrics_dir=args.metrics_dir, lpips_net=args.lpips_net, model=args.model,
                      progress=args.progress, log=lambda msg: print(msg, file=sys.stderr),
                      testbed_classifier=args.testbed_classifier, attention_impl=args.attention_impl, **kw)
    print(format_table(report))
    print(f"report: {report['report_path']}")
    print(f"grid: {os.path.join(args.out_dir, 'grid.png')}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the main parser's subparsers."""
    p = subparsers.add_parser("eval", help="dense vs compressed images from the same noise: PSNR, SSIM, attention "
                                           "FLOPs kept, wall time, grid PNG, JSON report")
    add_model_arg(p, "diffusers pipeline folder (as for dfa2 generate)")
    p.add_argument("--plan", required=True, help="plan.json (dfa2 calibrate / dfa2 plan import)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", default=None, help="text file: one prompt per line (blank lines and # comments "
                                                     "skipped)")
    src.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    add_generation_args(p, steps_help="denoising steps: the plan's (default), or the same number",
                        size_default="the plan's calibration resolution")
    p.add_argument("--batch", type=int, default=None, help="prompts per pipeline call (default: all)")
    p.add_argument("--repeat", type=int, default=2,
                   help="pipeline calls of each kind; the first includes compilation, the fastest later one is the "
                        "steady time (default 2; 1 = compile-inclusive time only)")
    p.add_argument("--metrics-dir", default=None,
                   help="folder of local LPIPS / CLIP weights (default $DFA2_METRICS_DIR; never downloaded): "
                        "lpips/alexnet-owt-7be5be79.pth or lpips/vgg16-397923af.pth (torchvision) with "
                        "lpips/v0.1/alex.pth or vgg.pth (the lpips package's heads), and a transformers CLIP folder "
                        "clip-vit-large-patch14/ (or clip-vit-base-patch16/, -patch32/); a missing file is named "
                        "in the report")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"], help="LPIPS backbone (default alex)")
    p.add_argument("--testbed-classifier", default=None,
                   help="weights for the testbed prompt accuracy, reported when every prompt is a testbed world "
                        "caption (default: the shipped dfa2_jax/assets/testbed_classifier.safetensors)")
    p.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    p.add_argument("--progress", action="store_true", help="progress bars over the denoising steps (default: none)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                   help=f"folder for grid.png, dense_<i>.png, compressed_<i>.png, report.json (default "
                        f"{DEFAULT_OUT_DIR})")
    add_attention_impl_arg(p)
    p.set_defaults(fn=run)
    return p


__all__ = ["add_parser"]
