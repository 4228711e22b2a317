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
