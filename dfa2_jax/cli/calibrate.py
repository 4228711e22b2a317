"""``dfa2 calibrate``: calibrate a compression plan (progressive per-head RSE + CP-SAT)."""

from __future__ import annotations

import argparse

from dfa2_jax.cli.common import add_attention_impl_arg, add_mesh_args, parse_resolution_arg, prompts_of


def run(args: argparse.Namespace) -> int:
    import os

    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.pipeline import load_pipeline

    prompts = prompts_of(args)
    pipe = load_pipeline(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    ckpt = args.checkpoint or args.output + ".calib.npz"
    savings = args.latency_table or args.savings
    res = calibrate(pipe, prompts, resolution=parse_resolution_arg(args.resolution), steps=args.steps, delta=args.delta,
                    c=args.c, candidates=args.candidates, seed=args.seed, guidance_scale=args.guidance,
                    batch=args.batch, savings=savings, checkpoint=ckpt, resume=args.resume,
                    progress=not args.no_progress, mesh=args.mesh, fsdp=args.fsdp,
                    max_sequence_length=args.max_sequence_length, attention_impl=args.attention_impl)
    res.plan.save(args.output)
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    s = res.summary
    print(f"wrote {args.output}: attention FLOPs kept {s['attention_flops_kept']:.3f} (exact), "
          f"{s['attention_tiles_kept']:.3f} (kernel tiles); methods {s['method_counts']}")
    print(f"wall time {s['wall_time_s']:.1f} s, solver {s['solver_time_s']:.2f} s over {s['solves']} solves")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    cal = sub.add_parser("calibrate", help="calibrate a compression plan (progressive per-head RSE + CP-SAT)")
    cal.add_argument("--model", required=True, help="diffusers pipeline folder")
    cal.add_argument("--prompt", action="append", default=None, help="a calibration prompt (repeatable)")
    cal.add_argument("--prompts", default=None, help="file with one prompt per line")
    cal.add_argument("--resolution", required=True, help="R or HxW in pixels")
    cal.add_argument("--steps", type=int, default=28)
    cal.add_argument("--delta", type=float, required=True, help="RSE budget per (layer, step)")
    cal.add_argument("--c", type=float, default=1.5, help="pre-filter: keep (head, method) with RSE < c·δ/H")
    cal.add_argument("--candidates", default="arrow:8,arrow:16,arrow:32,cache",
                     help="comma-separated: arrow:K, cache, wars:K, cfg_share, cfg_share+arrow:K")
    cal.add_argument("--max-sequence-length", type=int, default=None,
                     help="T5 tokens (default SD3 256, FLUX 512; the shipped testbed was trained at 32)")
    cal.add_argument("--batch", type=int, default=None, help="the most prompts in one batch (all must fit)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--guidance", type=float, default=None)
    cal.add_argument("--savings", default="tiles", choices=["tiles", "exact"],
                     help="saving(m): kernel tiles visited (128x64) or exact mask pairs")
    cal.add_argument("--latency-table", default=None, help="JSON {method: latency relative to full} for saving(m)")
    cal.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    cal.add_argument("--cache-dir", default=None)
    cal.add_argument("--checkpoint", default=None, help="progress file (default: OUTPUT.calib.npz)")
    cal.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    cal.add_argument("--no-progress", action="store_true")
    add_mesh_args(cal, "the calibration pass")
    add_attention_impl_arg(cal)
    cal.add_argument("-o", "--output", required=True, help="plan.json to write")
    cal.set_defaults(fn=run)
    return cal
