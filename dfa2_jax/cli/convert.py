"""``dfa2 convert``: convert a checkpoint to Flax params once and cache them (orbax)."""

from __future__ import annotations

import argparse
import time

from dfa2_jax.cli.common import CACHE_DIR_HELP, add_model_arg, resolve_model


def _folder_dtype(path: str) -> str:
    """The dtype in the pipeline folder's dfa2_defaults.json (``path``: the folder or its transformer/), so that
    ``dfa2 generate`` later finds these params in the cache; else bfloat16."""
    import os

    from dfa2_jax.defaults import DEFAULTS_FILE, read_defaults

    for folder in (path, os.path.dirname(os.path.abspath(path))):
        if os.path.isfile(os.path.join(folder, DEFAULTS_FILE)):
            return read_defaults(folder).get("dtype", "bfloat16")
    return "bfloat16"


def run(args: argparse.Namespace) -> int:
    from dfa2_jax.transformer import load_transformer

    path = resolve_model(args.model)
    dtype = args.dtype or _folder_dtype(path)
    t0 = time.perf_counter()
    tr = load_transformer(path, dtype=dtype, cache_dir=args.cache_dir)
    print(f"{tr.config.diffusers_class}: {tr.num_params() / 1e6:.1f} M params in {tr.dtype.name}, "
          f"from {tr.source} in {time.perf_counter() - t0:.1f} s "
          f"({len(tr.attention_layer_names())} attention layers)")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    conv = sub.add_parser("convert", help="convert a checkpoint to Flax params and cache them (orbax)")
    add_model_arg(conv, "diffusers folder or single .safetensors file")
    conv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="the cached params' dtype (default: the pipeline folder's dfa2_defaults.json, else "
                           "bfloat16)")
    conv.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    conv.set_defaults(fn=run)
    return conv
