"""``dfa2 calibrate``: calibrate a compression plan (progressive per-head RSE + CP-SAT).

Every argument is checked (against the model's config files, before any weight is loaded); the settings not
given come from the model folder's ``dfa2_defaults.json`` (:mod:`dfa2_jax.defaults`), else the family's. The
progress file is written after every step: Ctrl-C keeps it and says how to continue (``--resume``).
"""

from __future__ import annotations

import argparse
import math
import os
import time

from dfa2_jax.cli.common import (CACHE_DIR_HELP, Interrupted, add_attention_impl_arg, add_cfg_args,
                                 add_generation_args, add_mesh_args, add_model_arg, check_cfg_flags, check_file_output, check_guidance, check_input_file,
                                 check_int, check_max_sequence_length, check_mesh, check_size, default_help,
                                 inspect_model, parse_resolution_arg, prompts_of, resolve_model)


def _checkpoint_step(path: str) -> int | None:
    """The next step a calibration checkpoint resumes at (None: unreadable)."""
    import json

    import numpy as np

    try:
        with np.load(path) as z:
            return int(json.loads(bytes(z["meta"]).decode())["next_step"])
    except Exception:  # noqa: BLE001 - only for the message
        return None


def resolve(args: argparse.Namespace) -> dict:
    """Check every argument and fill the defaults, reading config files only. Returns calibrate()'s keywords plus
    ``model``, ``dtype``, ``checkpoint``."""
    from dfa2_jax.calibrate.calibrate import load_latency_table, parse_candidates

    model = inspect_model(resolve_model(args.model))
    d = model.defaults
    prompts = prompts_of(args)
    if args.resolution is None:
        h, w = d.height, d.width
    else:
        r = parse_resolution_arg(args.resolution)
        h, w = (r, r) if isinstance(r, int) else r
    check_size(model, h, w, flags=("--resolution", "--resolution"))
    check_int("--steps", args.steps, 2, " (step 0 is always full)")
    steps = d.num_inference_steps if args.steps is None else args.steps
    if steps < 2:
        raise ValueError(f"the model's default steps {steps}: calibration needs --steps >= 2")
    if not (math.isfinite(args.delta) and args.delta > 0):
        raise ValueError(f"--delta {args.delta:g}: must be a finite number > 0 (the RSE budget per layer and step)")
    if not (not math.isnan(args.c) and args.c > 0):
        raise ValueError(f"--c {args.c:g}: must be a number > 0 (inf: no per-head bound)")
    guidance = check_guidance(model, args.guidance)
    do_cfg = check_cfg_flags(model, guidance, args.negative_prompt, args.true_cfg_scale)
    try:
        parse_candidates(args.candidates, cfg=do_cfg)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    check_int("--batch", args.batch)
    if args.batch is not None and args.batch < len(prompts):
        raise ValueError(f"--batch {args.batch}: the progressive pass needs all {len(prompts)} prompts in one batch")
    msl = check_max_sequence_length(args.max_sequence_length, model)
    savings = args.savings
    if args.latency_table is not None:
        check_input_file(args.latency_table, "--latency-table")
        load_latency_table(args.latency_table)
        savings = args.latency_table
    check_mesh(args.mesh)
    check_file_output(args.output, "-o", ".json")
    ckpt = args.checkpoint or args.output + ".calib.npz"
    check_file_output(ckpt, "--checkpoint", ".npz")
    if args.resume and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    return dict(model=model.path, dtype=args.dtype or d.dtype, checkpoint=ckpt, prompts=prompts, resolution=(h, w),
                steps=steps, guidance_scale=guidance, max_sequence_length=msl, savings=savings)


def run(args: argparse.Namespace) -> int:
    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.pipeline import load_pipeline

    kw = resolve(args)
    ckpt = kw["checkpoint"]
    started = time.time()
    try:
        pipe = load_pipeline(kw["model"], dtype=kw["dtype"], cache_dir=args.cache_dir)
        res = calibrate(pipe, kw["prompts"], resolution=kw["resolution"], steps=kw["steps"], delta=args.delta,
                        c=args.c, candidates=args.candidates, seed=args.seed, guidance_scale=kw["guidance_scale"],
                        batch=args.batch, savings=kw["savings"], checkpoint=ckpt, resume=args.resume,
                        progress=not args.no_progress, mesh=args.mesh, fsdp=args.fsdp,
                        max_sequence_length=kw["max_sequence_length"], attention_impl=args.attention_impl,
                        negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                        strategy=args.strategy)
    except KeyboardInterrupt:
        ours = os.path.isfile(ckpt) and (args.resume or os.path.getmtime(ckpt) >= started)  # not a stale one
        step = _checkpoint_step(ckpt) if ours else None
        if step is None:
            raise Interrupted("no calibration step had finished; nothing to resume") from None
        raise Interrupted(f"progress kept in {ckpt} ({step} of {kw['steps']} steps done): run the same command "
                          "with --resume to continue") from None
    res.plan.save(args.output)
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    s = res.summary
    print(f"wrote {args.output}: attention FLOPs kept {s['attention_flops_kept']:.3f} (exact), "
          f"{s['attention_tiles_kept']:.3f} (kernel tiles); methods {s['method_counts']}")
    print(f"wall time {s['wall_time_s']:.1f} s, solver {s['solver_time_s']:.2f} s over {s['solves']} solves")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    cal = sub.add_parser("calibrate", help="calibrate a compression plan (progressive per-head RSE + CP-SAT)",
                         description="Calibrate a plan. Settings left out come from the model folder's "
                                     "dfa2_defaults.json, else the family's published defaults.")
    add_model_arg(cal)
    cal.add_argument("--prompt", action="append", default=None,
                     help="a calibration prompt (repeatable; give this or --prompts)")
    cal.add_argument("--prompts", default=None, help="file with one prompt per line (give this or --prompt)")
    cal.add_argument("--resolution", default=None,
                     help=f"R or HxW in pixels; {default_help('height')}")
    add_generation_args(cal, size=False,
                        steps_help=f"denoising steps, at least 2; {default_help('num_inference_steps')}")
    add_cfg_args(cal)
    cal.add_argument("--delta", type=float, required=True, help="RSE budget per (layer, step), > 0")
    cal.add_argument("--c", type=float, default=1.5,
                     help="pre-filter: keep (head, method) with RSE < c·δ/H (default 1.5; inf: none)")
    cal.add_argument("--strategy", default="headwise", choices=["headwise", "layerwise"],
                     help="headwise: a method per head by CP-SAT (DiTFastAttnV2); layerwise: one method per layer, "
                          "the most-saving one within δ (DiTFastAttn V1's greedy choice) (default headwise)")
    cal.add_argument("--candidates", default="arrow:8,arrow:16,arrow:32,cache",
                     help="comma-separated: arrow:K, cache, wars:K, cfg_share, cfg_share+arrow:K (default "
                          "arrow:8,arrow:16,arrow:32,cache)")
    cal.add_argument("--batch", type=int, default=None,
                     help="the most prompts in one batch; all must fit (default: all prompts)")
    cal.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    cal.add_argument("--savings", default="tiles", choices=["tiles", "exact"],
                     help="saving(m): kernel tiles visited (128x64) or exact mask pairs (default tiles)")
    cal.add_argument("--latency-table", default=None,
                     help="JSON {method: latency relative to full} for saving(m) (default: --savings)")
    cal.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    cal.add_argument("--checkpoint", default=None, help="progress file, .npz (default: OUTPUT.calib.npz)")
    cal.add_argument("--resume", action="store_true", help="continue from the checkpoint (default: start over)")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    add_mesh_args(cal, "the calibration pass")
    add_attention_impl_arg(cal)
    cal.add_argument("-o", "--output", required=True, help="plan .json to write")
    cal.set_defaults(fn=run)
    return cal
