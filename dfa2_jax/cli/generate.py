"""``dfa2 generate``: text to image with a diffusers pipeline folder, dense or with a plan.

Every argument is checked against the model's config files (and the plan, the ``--latents`` header, the output
folders) before any weight is loaded; the settings not given come from the model folder's ``dfa2_defaults.json``
(:mod:`dfa2_jax.defaults`), else the family's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from dfa2_jax.cli.common import (CACHE_DIR_HELP, add_attention_impl_arg, add_cfg_args, add_generation_args,
                                 add_mesh_args, add_model_arg, check_cfg_flags, check_file_output, check_guidance, check_image_output, check_int,
                                 check_latents, check_max_sequence_length, check_mesh, check_plan, check_size,
                                 default_help, inspect_model, resolve_model, save_images, save_npy_atomic)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``dfa2 generate`` will run, every default resolved (:func:`resolve`)."""

    model: str  # the resolved folder
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float | None
    max_sequence_length: int
    dtype: str
    prompts: tuple[str, ...]  # one per image

    def pipe_kwargs(self) -> dict:
        return {"height": self.height, "width": self.width, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "max_sequence_length": self.max_sequence_length}


def resolve(args: argparse.Namespace) -> Settings:
    """Check every argument and fill the defaults, reading config files only (no weights)."""
    model = inspect_model(resolve_model(args.model))
    d = model.defaults
    if any(not p.strip() for p in args.prompt):
        raise ValueError("--prompt '': must be a non-empty text")
    check_int("--height", args.height)
    check_int("--width", args.width)
    height = d.height if args.height is None else args.height
    width = d.width if args.width is None else args.width
    check_size(model, height, width)
    check_int("--steps", args.steps)
    guidance = check_guidance(model, args.guidance)
    do_cfg = check_cfg_flags(model, guidance, args.negative_prompt, args.true_cfg_scale)
    msl = check_max_sequence_length(args.max_sequence_length, model)
    steps = args.steps
    if args.plan is not None:
        plan = check_plan(model, args.plan, steps=steps, height=height, width=width, do_cfg=do_cfg)
        steps = plan.steps if steps is None else steps  # a plan is made for its step count
    steps = d.num_inference_steps if steps is None else steps
    check_mesh(args.mesh)
    prompts = tuple(args.prompt)
    if args.latents is not None:
        batch = check_latents(model, args.latents, height, width, len(prompts))[0]
        prompts *= batch // len(prompts)  # one prompt, B noises: B images
    check_image_output(args.output, "-o")
    if args.save_latents is not None:
        check_file_output(args.save_latents, "--save-latents", ".npy")
    return Settings(model.path, height, width, steps, guidance, msl, args.dtype or d.dtype, prompts)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from dfa2_jax.pipeline import load_pipeline

    st = resolve(args)
    say = (lambda _msg: None) if args.no_progress else (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    pipe = load_pipeline(st.model, dtype=st.dtype, cache_dir=args.cache_dir)
    say(f"loaded {pipe.transformer.config.diffusers_class} pipeline in {time.perf_counter() - t0:.1f} s")
    kwargs = dict(st.pipe_kwargs(), seed=args.seed, progress=not args.no_progress, plan=args.plan, mesh=args.mesh,
                  fsdp=args.fsdp, attention_impl=args.attention_impl)
    if args.latents:
        kwargs["latents"] = np.load(args.latents)
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    if args.true_cfg_scale is not None:
        kwargs["true_cfg_scale"] = args.true_cfg_scale
    t0 = time.perf_counter()
    out = pipe(list(st.prompts), **kwargs)
    say(f"generated in {time.perf_counter() - t0:.1f} s (compile included)")
    if args.save_latents:
        save_npy_atomic(args.save_latents, out.latents)
    save_images(out.images, args.output)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    gen = sub.add_parser("generate", help="text to image with an SD3 / SD3.5 / FLUX.1 diffusers pipeline folder",
                         description="Text to image. Settings left out come from the model folder's "
                                     "dfa2_defaults.json, else the family's published defaults.")
    add_model_arg(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="what to draw (repeat for several images, generated as one batch)")
    add_cfg_args(gen)
    with_plan = "with --plan, the plan's"
    add_generation_args(gen, steps_help=f"denoising steps; {default_help('num_inference_steps', with_plan)}")
    gen.add_argument("--seed", type=int, default=0, help="noise seed of the batch (default 0)")
    gen.add_argument("--latents", default=None,
                     help="initial noise .npy in diffusers' layout (SD3 [B, C, H/f, W/f]; FLUX packed "
                          "[B, (H/f/2)·(W/f/2), C·4]; f: the model's VAE scale factor): one row per --prompt, or "
                          "B rows for one prompt (default: drawn from --seed)")
    gen.add_argument("--save-latents", default=None,
                     help="write the final latents (before VAE decoding) to this .npy (default: not written)")
    gen.add_argument("--plan", default=None, help="compression plan (dfa2 calibrate / dfa2 plan import); "
                                                   "default: dense attention")
    add_mesh_args(gen, "the sampler")
    add_attention_impl_arg(gen)
    gen.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    gen.add_argument("--no-progress", action="store_true",
                     help="no progress bar or timing lines on stderr (default: shown)")
    gen.add_argument("-o", "--output", required=True,
                     help="output image (.png, .jpg, .webp, ...: any format PIL writes); several images get -0, "
                          "-1, ... before the extension (in --prompt order)")
    gen.set_defaults(fn=run)
    return gen
