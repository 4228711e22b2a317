"""``dfa2 convert``: convert a checkpoint to Flax params once and cache them (orbax)."""

from __future__ import annotations

import argparse
import time


def run(args: argparse.Namespace) -> int:
    from dfa2_jax.transformer import load_transformer

    t0 = time.perf_counter()
    tr = load_transformer(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    print(f"{tr.config.diffusers_class}: {tr.num_params() / 1e6:.1f} M params in {tr.dtype.name}, "
          f"from {tr.source} in {time.perf_counter() - t0:.1f} s "
          f"({len(tr.attention_layer_names())} attention layers)")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    conv = sub.add_parser("convert", help="convert a checkpoint to Flax params and cache them (orbax)")
    conv.add_argument("--model", required=True, help="diffusers folder or single .safetensors file")
    conv.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    conv.add_argument("--cache-dir", default=None, help="orbax cache root (default $DFA2_CACHE_DIR or "
                                                         "~/.cache/dfa2_jax)")
    conv.set_defaults(fn=run)
    return conv
