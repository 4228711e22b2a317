"""The benchmark suite: every table of docs/PERFORMANCE.md from one command on one machine with an NVIDIA GPU.

    python3 scripts/bench_suite.py --out runs/suite                  # every one-GPU part, in order (~1.5 h)
    python3 scripts/bench_suite.py --only kernel,e2e --out runs/k    # some parts
    python3 scripts/bench_suite.py --dry-run                         # print the commands only
    python3 scripts/bench_suite.py --smoke --out /tmp/suite          # every part's CPU smoke run (tiny models)

Each part runs the scripts below as subprocesses, one after the other (a part's command that fails or passes its
time limit is reported and the suite goes on); each command's output goes to ``OUT/<part>[-<i>].log``, and the
scripts that write JSON write it under ``OUT/<part>[-<i>]/``. Last, a summary: each part's final table, then one
line per command (status, wall time, log). ``OUT/suite.json`` holds the same.

Parts (``--only``, comma-separated; default: all but ``aot``):

- kernel: ``bench_arrow.py`` — the arrow kernel (Triton and Mosaic GPU, balanced and round-robin schedules) vs
  cuDNN at FLUX 2048² and SD3 1024², the mixed plan and three random head mixes at the same kept fraction;
- transformer: ``bench_transformer.py`` — one step, ours vs diffusers eager and under torch.compile;
- profile: ``profile_transformer.py`` — attention vs the rest of a step;
- sampler: ``bench_sampler.py`` — the scanned sampler vs 28 × one step;
- e2e: ``bench_e2e.py`` — seconds per image, FLUX 2048² / SD3 1024² / FLUX 1024², 28 steps; e2e-50: FLUX 2048² at
  50 steps. Their time budgets hold the torch.compile baseline's compile and loops as well;
- memory: ``bench_memory.py`` — the plan sampler's memory vs dense and its bound;
- calibrate: ``bench_calibrate.py`` — calibration time vs a dense generation;
- scale: ``bench_scale.py`` — the sharded sampler over the GPUs present (one GPU: the single-device rows only);
- aot: ``aot_memory.py`` — the deviceless compile for an H100 (runs on the CPU; needs the jax CUDA plugin).

The Triton autotuner's cache is ``$DFA2_ARROW_TUNE_CACHE`` (default ``~/.cache/dfa2_jax/arrow_tune.json``).
``--smoke`` runs the same parts on the CPU with tiny models and shapes (``JAX_PLATFORMS=cpu``; fake host devices for
scale and aot): a check that every script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Command:
    script: str
    args: tuple[str, ...]
    out_flag: bool = False  # the script takes --out DIR for its JSON
    timeout_s: float = 3600.0
    env: dict = field(default_factory=dict)


def _c(script, args="", *, out=False, timeout=3600.0, env=None) -> Command:
    return Command(script, tuple(shlex.split(args)), out, timeout, env or {})


# The arguments each figure of docs/PERFORMANCE.md was taken with (e2e: budgets that also hold torch.compile).
PARTS: dict[str, list[Command]] = {
    "kernel": [_c("bench_arrow.py", "--backends triton,mosaic_gpu --mosaic-configs "
                  "64/128/2,64/128/2/roundrobin,64/64/3,64/128/3",
                  timeout=1800)],
    "transformer": [_c("bench_transformer.py", "--iters 20", out=True, timeout=2400)],
    "profile": [_c("profile_transformer.py", "--models sd3-medium,flux-dev --res 1024,2048 --iters 10",
                   timeout=1200)],
    "sampler": [_c("bench_sampler.py", "--res 1024 --steps 28", timeout=900)],
    "e2e": [_c("bench_e2e.py", "--cases flux-2048 --budget-s 700", out=True, timeout=900),
            _c("bench_e2e.py", "--cases sd3-1024 --budget-s 280", out=True, timeout=480),
            _c("bench_e2e.py", "--cases flux-1024 --budget-s 360", out=True, timeout=560)],
    "e2e-50": [_c("bench_e2e.py", "--cases flux-2048-50 --budget-s 900", out=True, timeout=1100)],
    "memory": [_c("bench_memory.py", "--res 2048 --steps 28", out=True, timeout=900)],
    "calibrate": [_c("bench_calibrate.py", "--res 1024 --prompts 8 --steps 28", timeout=1200)],
    "scale": [_c("bench_scale.py", "--res 2048 --steps 28 --runs 1 --modes heads,data --no-mesh1 --budget-s 480",
                 out=True, timeout=900, env={"NCCL_NVLS_ENABLE": "0"})],
    "aot": [_c("aot_memory.py", "", timeout=1800, env={"JAX_PLATFORMS": "cpu"}),
            _c("aot_memory.py", "--meshes none;heads=2;heads=4;seq=2;seq=4", timeout=3600,
               env={"JAX_PLATFORMS": "cpu"})],
}
OPT_IN = ("aot",)  # not in the default set

_CPU = {"JAX_PLATFORMS": "cpu"}
SMOKE_PARTS: dict[str, list[Command]] = {
    "kernel": [_c("bench_arrow.py", "--interpret --small --iters 1 --warmup 1 --mixes 2", env=_CPU, timeout=600)],
    "transformer": [_c("bench_transformer.py", "--smoke", out=True, env=_CPU, timeout=900)],
    "profile": [_c("profile_transformer.py", "--smoke", env=_CPU, timeout=600)],
    "sampler": [_c("bench_sampler.py", "--smoke", env=_CPU, timeout=600)],
    "e2e": [_c("bench_e2e.py", "--smoke --runs 1", out=True, env=_CPU, timeout=900)],
    "e2e-50": [_c("bench_e2e.py", "--smoke --runs 1 --cases flux-2048-50 --frameworks jax", out=True, env=_CPU,
                  timeout=600)],
    "memory": [_c("bench_memory.py", "--small", out=True, env=_CPU, timeout=600)],
    "calibrate": [_c("bench_calibrate.py", "--smoke", env=_CPU, timeout=600)],
    "scale": [_c("bench_scale.py", "--small --attn plan", out=True, timeout=900,
                 env={**_CPU, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})],
    "aot": [_c("aot_memory.py", "--smoke --variants plan --meshes none;heads=2", timeout=600,
               env={**_CPU, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})],
}


def plan(parts: list[str], out: str, smoke: bool) -> list[tuple[str, Command, list[str], str | None]]:
    """(label, command, argv, its --out folder or None) for every command of ``parts``, in order."""
    table = SMOKE_PARTS if smoke else PARTS
    runs = []
    for part in parts:
        cmds = table[part]
        for i, c in enumerate(cmds):
            label = part if len(cmds) == 1 else f"{part}-{i + 1}"
            folder = os.path.join(out, label) if c.out_flag else None
            argv = [sys.executable, os.path.join(HERE, c.script), *c.args] + (["--out", folder] if folder else [])
            runs.append((label, c, argv, folder))
    return runs


def display(argv: list[str]) -> str:
    """``argv`` as a user types it: ``python3 scripts/<script> ...`` relative to the current folder."""
    return shlex.join(["python3", os.path.relpath(argv[1]), *argv[2:]])


def final_table(text: str, max_lines: int = 40) -> list[str]:
    """The last block of a script's output (after its last blank line): its table."""
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if not lines[i].strip():
            return lines[i + 1:][-max_lines:]
    return lines[-max_lines:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None,
                    help=f"comma list of parts: {', '.join(PARTS)} (default: all but {', '.join(OPT_IN)}; "
                         "'all': every part)")
    ap.add_argument("--out", default=None, help="folder for the logs, the scripts' JSON and suite.json "
                    "(default runs/suite-<date>-<time>)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--smoke", action="store_true", help="each part's CPU smoke run (tiny models): a check, no figures")
    args = ap.parse_args(argv)
    if args.only in (None, ""):
        parts = [p for p in PARTS if p not in OPT_IN]
    elif args.only == "all":
        parts = list(PARTS)
    else:
        parts = args.only.split(",")
        if unknown := [p for p in parts if p not in PARTS]:
            ap.error(f"--only: unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})")
    out = args.out or os.path.join("runs", time.strftime("suite-%Y%m%d-%H%M%S"))
    runs = plan(parts, out, args.smoke)
    if args.dry_run:
        for label, c, argv_, _ in runs:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in c.env.items())
            print(f"# {label} (time limit {c.timeout_s:.0f} s)")
            log = shlex.quote(os.path.join(out, label + ".log"))
            print((env + " " if env else "") + display(argv_) + f" > {log} 2>&1")
        return 0

    os.makedirs(out, exist_ok=True)
    results = []
    for label, c, argv_, folder in runs:
        log = os.path.join(out, f"{label}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **c.env)
        print(f"== {label}: {display(argv_)}", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(argv_, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=c.timeout_s).returncode
                status = "ok" if rc == 0 else f"failed (rc {rc})"
            except subprocess.TimeoutExpired:
                status = f"time limit ({c.timeout_s:.0f} s)"
        wall = time.time() - t0
        with open(log) as f:
            text = f.read()
        results.append({"part": label, "command": display(argv_), "env": c.env, "status": status, "wall_s": wall,
                        "log": log, "out": folder, "table": final_table(text)})
        print(f"   {status} in {wall:.0f} s -> {log}", flush=True)
    with open(os.path.join(out, "suite.json"), "w") as f:
        json.dump({"smoke": args.smoke, "parts": parts, "results": results}, f, indent=1)

    for r in results:
        print(f"\n--- {r['part']} ({r['status']}): {r['command']}")
        print("\n".join(r["table"]))
    print(f"\n{'part':<14} {'status':<24} {'wall s':>8}  log")
    for r in results:
        print(f"{r['part']:<14} {r['status']:<24} {r['wall_s']:>8.0f}  {r['log']}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
