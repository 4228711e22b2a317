"""The ``dfa2`` command line: one module per command (:mod:`.generate`, :mod:`.calibrate`, :mod:`.eval`,
:mod:`.demo`, :mod:`.plan`, :mod:`.info`, :mod:`.convert`), each with ``add_parser(subparsers)`` and
``run(args) -> int``. The library never imports this package.

User errors end a command with one line on stderr and no traceback: ``dfa2 <command>: error: <what>`` and exit
status 2 (bad arguments, missing or malformed files, unwritable paths — argparse's usage errors too); Ctrl-C with
``dfa2 <command>: interrupted`` and status 130 (128 + SIGINT, as a shell reports it). Each command checks its
arguments before loading any weights, so a mistake costs no waiting.
"""

from __future__ import annotations

import argparse
import os
import sys

from dfa2_jax.cli import calibrate, convert, demo, generate, info, plan
from dfa2_jax.cli import eval as eval_cmd
from dfa2_jax.cli.common import ArgumentParser

COMMANDS = (info, convert, generate, demo, calibrate, plan, eval_cmd)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dfa2", description="DiTFastAttnV2 for SD3 / SD3.5 / FLUX.1 in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _os_error(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _interrupted(line: str, own_process: bool) -> int:
    """Print the one line; as the process's own command (``argv`` None: the ``dfa2`` script, ``python -m
    dfa2_jax.cli``) leave at once with os._exit: an XLA computation may still be running on its threads, with host
    callbacks (progress, the calibration solver) that would crash into a finalizing interpreter. Nothing is lost:
    every file is written atomically (a partial one was removed as the interrupt unwound) and a calibration's
    checkpoint is complete."""
    print(line, file=sys.stderr)
    if own_process:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Run ``dfa2`` with ``argv`` (None: ``sys.argv[1:]``, the process's own command line). Returns the exit
    status: 0, 2 (a user error, one line on stderr) or 130 (Ctrl-C)."""
    own_process = argv is None
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return _interrupted("dfa2: interrupted", own_process)
    name = f"dfa2 {args.command}"
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:  # Ctrl-C; Interrupted carries what to do next (e.g. --resume)
        detail = _one_line(str(e)) if str(e) else ""
        return _interrupted(f"{name}: interrupted" + (f"; {detail}" if detail else ""), own_process)
    except (ValueError, FileNotFoundError) as e:
        msg = _os_error(e) if isinstance(e, FileNotFoundError) else str(e)
        print(f"{name}: error: {_one_line(msg)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # unwritable or unreadable paths, a full disk
        print(f"{name}: error: {_one_line(_os_error(e))}", file=sys.stderr)
        return EXIT_USAGE


__all__ = ["main", "build_parser", "EXIT_USAGE", "EXIT_INTERRUPTED"]
