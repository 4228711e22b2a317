"""The ``dfa2`` command line: one module per command (:mod:`.generate`, :mod:`.calibrate`, :mod:`.eval`,
:mod:`.demo`, :mod:`.plan`, :mod:`.info`, :mod:`.convert`), each with ``add_parser(subparsers)`` and
``run(args) -> int``. The library never imports this package."""

from __future__ import annotations

import argparse
import sys

from dfa2_jax.cli import calibrate, convert, demo, generate, info, plan
from dfa2_jax.cli import eval as eval_cmd

COMMANDS = (info, convert, generate, demo, calibrate, plan, eval_cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfa2", description="DiTFastAttnV2 for SD3 / SD3.5 / FLUX.1 in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dfa2 {args.command}: error: {e}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
