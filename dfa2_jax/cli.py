"""The ``dfa2`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_info(args: argparse.Namespace) -> int:
    from dfa2_jax.transformer import config_of

    from converters.transformer import resolve_checkpoint

    resolved = resolve_checkpoint(args.model)
    cfg = config_of(args.model)
    print(f"{resolved.root}: {cfg.diffusers_class} ({resolved.kind}, layout {resolved.layout})")
    for f in resolved.files:
        print(f"  weights: {f}")
    for k, v in cfg.to_diffusers().items():
        print(f"  {k}: {v}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from dfa2_jax.transformer import load_transformer

    t0 = time.perf_counter()
    tr = load_transformer(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    print(f"{tr.config.diffusers_class}: {tr.num_params() / 1e6:.1f} M params in {tr.dtype.name}, "
          f"from {tr.source} in {time.perf_counter() - t0:.1f} s "
          f"({len(tr.attention_layer_names())} attention layers)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from dfa2_jax.pipeline import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    print(f"loaded {pipe.transformer.config.diffusers_class} pipeline in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    latents = None
    if args.latents:
        latents = np.load(args.latents)
    kwargs = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  seed=args.seed, latents=latents, progress=not args.no_progress, plan=args.plan,
                  mesh=args.mesh, fsdp=args.fsdp, max_sequence_length=args.max_sequence_length)
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    t0 = time.perf_counter()
    out = pipe(args.prompt, **kwargs)
    print(f"generated in {time.perf_counter() - t0:.1f} s (compile included)", file=sys.stderr)
    if args.save_latents:
        _atomic_np_save(args.save_latents, out.latents)
    _save_images(out.images, args.output)
    return 0


def _mesh_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--mesh", default="auto",
                        help=f"device mesh for {what}, e.g. data=2,heads=4 (axes: data, cfg (SD3 CFG halves), "
                             "heads (Megatron head parallel), seq (Ulysses: tokens split outside attention, heads "
                             "inside)); 'auto' (default): every local device on the data axis when the batch "
                             "divides over them, else one device; 'none': one device")
    parser.add_argument("--fsdp", action="store_true", help="with --mesh: shard the params over its data axis")


def _atomic_np_save(path: str, array) -> None:
    import numpy as np

    from dfa2_jax.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        np.save(f, array)


def _save_images(images, output: str) -> list[str]:
    """One image -> ``output``; several -> ``output`` with ``-0``, ``-1``, ... before the extension."""
    import os

    paths = [output] if len(images) == 1 else [f"{os.path.splitext(output)[0]}-{i}{os.path.splitext(output)[1]}"
                                               for i in range(len(images))]
    for im, p in zip(images, paths):
        im.save(p)
        print(p)
    return paths


def _prompts_of(args: argparse.Namespace) -> list[str]:
    if args.prompts and args.prompt:
        raise ValueError("give --prompt or --prompts FILE, not both")
    if args.prompts:
        from dfa2_jax.evaluate import read_prompts

        return read_prompts(args.prompts)
    if not args.prompt:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return list(args.prompt)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import os

    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.pipeline import load_pipeline

    prompts = _prompts_of(args)
    pipe = load_pipeline(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    ckpt = args.checkpoint or args.output + ".calib.npz"
    savings = args.latency_table or args.savings
    res = calibrate(pipe, prompts, resolution=_resolution(args.resolution), steps=args.steps, delta=args.delta,
                    c=args.c, candidates=args.candidates, seed=args.seed, guidance_scale=args.guidance,
                    batch=args.batch, savings=savings, checkpoint=ckpt, resume=args.resume,
                    progress=not args.no_progress, mesh=args.mesh, fsdp=args.fsdp,
                    max_sequence_length=args.max_sequence_length)
    res.plan.save(args.output)
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    s = res.summary
    print(f"wrote {args.output}: attention FLOPs kept {s['attention_flops_kept']:.3f} (exact), "
          f"{s['attention_tiles_kept']:.3f} (kernel tiles); methods {s['method_counts']}")
    print(f"wall time {s['wall_time_s']:.1f} s, solver {s['solver_time_s']:.2f} s over {s['solves']} solves")
    return 0


def _resolution(text: str):
    parts = text.lower().replace("x", ",").split(",")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--resolution {text!r}: expected R or HxW") from None
    return dims[0] if len(dims) == 1 else tuple(dims[:2])


def _cmd_demo(args: argparse.Namespace) -> int:
    from dfa2_jax.demo import run_demo

    t0 = time.perf_counter()
    kw = {k: v for k, v in (("calibration_prompts", args.calibration_prompts), ("eval_prompts", args.eval_prompts),
                            ("repeat", args.repeat)) if v is not None}
    if kw and args.model != "testbed":
        raise ValueError("--calibration-prompts, --eval-prompts and --repeat are options of --model testbed")
    run_demo(args.out, model=args.model, steps=args.steps, size=args.size, seed=args.seed, delta=args.delta, **kw)
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfa2", description="DiTFastAttnV2 for SD3 / SD3.5 / FLUX.1 in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe a checkpoint (family, layout, config)")
    info.add_argument("--model", required=True, help="diffusers folder or single .safetensors file")
    info.set_defaults(fn=_cmd_info)

    conv = sub.add_parser("convert", help="convert a checkpoint to Flax params and cache them (orbax)")
    conv.add_argument("--model", required=True, help="diffusers folder or single .safetensors file")
    conv.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    conv.add_argument("--cache-dir", default=None, help="orbax cache root (default $DFA2_CACHE_DIR or "
                                                         "~/.cache/dfa2_jax)")
    conv.set_defaults(fn=_cmd_convert)

    gen = sub.add_parser("generate", help="text to image with an SD3 / SD3.5 / FLUX.1 diffusers pipeline folder")
    gen.add_argument("--model", required=True, help="diffusers pipeline folder (model_index.json, transformer/, "
                                                     "vae/, text_encoder*/, tokenizer*/, scheduler/)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None, help="SD3 only (classifier-free guidance)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=28)
    gen.add_argument("--guidance", type=float, default=None,
                     help="SD3: CFG scale (7.0); FLUX.1-dev: guidance embedding (3.5); not for schnell")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    gen.add_argument("--latents", default=None, help="initial noise .npy in diffusers' layout (SD3 [B,16,H/8,W/8]; "
                                                      "FLUX packed [B,N,64])")
    gen.add_argument("--save-latents", default=None, help="write the final latents (before VAE decoding) as .npy")
    gen.add_argument("--max-sequence-length", type=int, default=None,
                     help="T5 tokens (default SD3 256, FLUX 512; the shipped testbed was trained at 32)")
    gen.add_argument("--plan", default=None, help="compression plan (dfa2 calibrate / dfa2 plan import); "
                                                   "default: dense attention")
    _mesh_args(gen, "the sampler")
    gen.add_argument("--cache-dir", default=None)
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("-o", "--output", required=True, help="output PNG")
    gen.set_defaults(fn=_cmd_generate)

    demo = sub.add_parser("demo", help="the whole loop (calibrate, dense vs compressed, compare) on the shipped "
                                        "SD3-style testbed (CPU, < 1 min)")
    demo.add_argument("--out", default="demo_out", help="folder for the plan, PNGs and report.json")
    demo.add_argument("--model", default="testbed", choices=["testbed", "tiny-random"],
                      help="testbed: the trained SD3-style testbed shipped in dfa2_jax/assets (default); "
                           "tiny-random: tiny SD3- and FLUX-style pipelines with random weights (textures)")
    demo.add_argument("--steps", type=int, default=None, help="sampling steps (testbed: 28; tiny-random: 8)")
    demo.add_argument("--size", type=int, default=None,
                      help="image height and width (testbed: 64 only; tiny-random: default 64, multiple of 16)")
    demo.add_argument("--delta", type=float, default=None,
                      help="calibration RSE budget δ (testbed: 0.02, about half the attention removed; tiny: 0.3)")
    demo.add_argument("--calibration-prompts", type=int, default=None,
                      help="testbed: held-out captions calibrated on (default 4)")
    demo.add_argument("--eval-prompts", type=int, default=None,
                      help="testbed: other held-out captions compared on (default 8)")
    demo.add_argument("--repeat", type=int, default=None,
                      help="testbed: pipeline calls of each kind (default 2: the first compiles, the second gives "
                           "the steady time)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(fn=_cmd_demo)

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
    _mesh_args(cal, "the calibration pass")
    cal.add_argument("-o", "--output", required=True, help="plan.json to write")
    cal.set_defaults(fn=_cmd_calibrate)

    from dfa2_jax.plan_cli import add_plan_parser

    add_plan_parser(sub)

    from dfa2_jax.eval_cli import add_eval_parser

    add_eval_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dfa2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
