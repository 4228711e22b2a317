"""``dfa2 info``: what a checkpoint is (family, layout, weight files, config)."""

from __future__ import annotations

import argparse

from dfa2_jax.cli.common import add_model_arg, resolve_model


def run(args: argparse.Namespace) -> int:
    from dfa2_jax.transformer import config_of

    from converters.transformer import resolve_checkpoint

    path = resolve_model(args.model)
    resolved = resolve_checkpoint(path)
    cfg = config_of(path)
    print(f"{resolved.root}: {cfg.diffusers_class} ({resolved.kind}, layout {resolved.layout})")
    for f in resolved.files:
        print(f"  weights: {f}")
    for k, v in cfg.to_diffusers().items():
        print(f"  {k}: {v}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    info = sub.add_parser("info", help="describe a checkpoint (family, layout, config)")
    add_model_arg(info, "diffusers folder or single .safetensors file")
    info.set_defaults(fn=run)
    return info
