"""``dfa2 info``: what a checkpoint is (family, layout, weight files, config)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
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


def add_parser(sub) -> argparse.ArgumentParser:
    info = sub.add_parser("info", help="describe a checkpoint (family, layout, config)")
    info.add_argument("--model", required=True, help="diffusers folder or single .safetensors file")
    info.set_defaults(fn=run)
    return info
