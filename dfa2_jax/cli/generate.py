"""``dfa2 generate``: text to image with a diffusers pipeline folder, dense or with a plan."""

from __future__ import annotations

import argparse
import sys
import time

from dfa2_jax.cli.common import add_attention_impl_arg, add_mesh_args, save_images, save_npy_atomic


def run(args: argparse.Namespace) -> int:
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
                  mesh=args.mesh, fsdp=args.fsdp, max_sequence_length=args.max_sequence_length,
                  attention_impl=args.attention_impl)
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    t0 = time.perf_counter()
    out = pipe(args.prompt, **kwargs)
    print(f"generated in {time.perf_counter() - t0:.1f} s (compile included)", file=sys.stderr)
    if args.save_latents:
        save_npy_atomic(args.save_latents, out.latents)
    save_images(out.images, args.output)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
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
    add_mesh_args(gen, "the sampler")
    add_attention_impl_arg(gen)
    gen.add_argument("--cache-dir", default=None)
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("-o", "--output", required=True, help="output PNG")
    gen.set_defaults(fn=run)
    return gen
