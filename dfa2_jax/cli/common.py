"""What the commands share: the mesh flags, atomic output writes, prompts from flags or a file."""

from __future__ import annotations

import argparse

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
    parser.add_argument("--fsdp", action="store_true", help="with --mesh: shard the params over its data axis")


def save_npy_atomic(path: str, array) -> None:
    import numpy as np

    from dfa2_jax.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        np.save(f, array)


def save_images(images, output: str) -> list[str]:
    """One image -> ``output``; several -> ``output`` with ``-0``, ``-1``, ... before the extension."""
    import os

    paths = [output] if len(images) == 1 else [f"{os.path.splitext(output)[0]}-{i}{os.path.splitext(output)[1]}"
                                               for i in range(len(images))]
    for im, p in zip(images, paths):
        im.save(p)
        print(p)
    return paths


def prompts_of(args: argparse.Namespace) -> list[str]:
    if args.prompts and args.prompt:
        raise ValueError("give --prompt or --prompts FILE, not both")
    if args.prompts:
        from dfa2_jax.evaluate import read_prompts

        return read_prompts(args.prompts)
    if not args.prompt:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return list(args.prompt)


def parse_resolution_arg(text: str):
    parts = text.lower().replace("x", ",").split(",")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--resolution {text!r}: expected R or HxW") from None
    return dims[0] if len(dims) == 1 else tuple(dims[:2])
