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

from dfa2_jax.cli.common import add_attention_impl_arg

DEFAULT_OUT_DIR = "eval_out"


def run(args: argparse.Namespace) -> int:
    from dfa2_jax.evaluate import EvalError, evaluate, format_table, read_prompts
    from dfa2_jax.plan import Plan

    prompts = read_prompts(args.prompts) if args.prompts is not None else list(args.prompt)
    if not prompts or any(not p.strip() for p in prompts):
        raise EvalError("--prompt must be a non-empty text")
    for name in ("steps", "height", "width", "batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EvalError(f"--{name} {v} must be >= 1")
    if args.repeat < 1:
        raise EvalError(f"--repeat {args.repeat} must be >= 1")
    Plan.load(args.plan)  # before loading the model: a bad plan fails fast (evaluate reads it again)
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"{args.model}: no such model folder")

    from dfa2_jax.pipeline import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    print(f"loaded {pipe.transformer.config.diffusers_class} pipeline in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    report = evaluate(pipe, args.plan, prompts, seed=args.seed, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, out_dir=args.out_dir,
                      batch_size=args.batch, repeat=args.repeat, max_sequence_length=args.max_sequence_length,
                      metrics_dir=args.metrics_dir, model=args.model, progress=args.progress,
                      log=lambda msg: print(msg, file=sys.stderr), testbed_classifier=args.testbed_classifier,
                      attention_impl=args.attention_impl)
    print(format_table(report))
    print(f"report: {report['report_path']}")
    print(f"grid: {os.path.join(args.out_dir, 'grid.png')}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the main parser's subparsers."""
    p = subparsers.add_parser("eval", help="dense vs compressed images from the same noise: PSNR, SSIM, attention "
                                           "FLOPs kept, wall time, grid PNG, JSON report")
    p.add_argument("--model", required=True, help="diffusers pipeline folder (as for dfa2 generate)")
    p.add_argument("--plan", required=True, help="plan.json (dfa2 calibrate / dfa2 plan import)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", default=None, help="text file: one prompt per line (blank lines and # comments "
                                                     "skipped)")
    src.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels (default: the plan's calibration resolution, else the model's default)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the plan's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="SD3: CFG scale (7.0); FLUX.1-dev: guidance embedding (3.5); not for schnell")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=None, help="prompts per pipeline call (default: all)")
    p.add_argument("--repeat", type=int, default=2,
                   help="pipeline calls of each kind; the first includes compilation, the fastest later one is the "
                        "steady time (default 2; 1 = compile-inclusive time only)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default SD3 256, FLUX 512)")
    p.add_argument("--metrics-dir", default=None,
                   help="local LPIPS / CLIP weights (default $DFA2_METRICS_DIR); never downloaded. LPIPS and CLIP "
                        "scoring are not implemented yet: the report says so")
    p.add_argument("--testbed-classifier", default=None,
                   help="weights for the testbed prompt accuracy, reported when every prompt is a testbed world "
                        "caption (default: the shipped dfa2_jax/assets/testbed_classifier.safetensors)")
    p.add_argument("--cache-dir", default=None, help="orbax cache root for converted weights")
    p.add_argument("--progress", action="store_true", help="progress bars over the denoising steps")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                   help=f"folder for grid.png, dense_<i>.png, compressed_<i>.png, report.json (default "
                        f"{DEFAULT_OUT_DIR})")
    add_attention_impl_arg(p)
    p.set_defaults(fn=run)
    return p


__all__ = ["add_parser"]
