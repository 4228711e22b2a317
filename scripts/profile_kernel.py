"""Where the Mosaic GPU arrow kernel's time goes, per CTA: tile phases and key-block steps by mask kind (one GPU).

    python3 scripts/profile_kernel.py                       # FLUX 2048² and SD3 1024²: all full and the mixed plan
    python3 scripts/profile_kernel.py --shapes SD3-1024 --modes mixed,arrow:16,mix1 --out runs/kernel_profile

One call per (shape, mode) under jax's Mosaic GPU on-device profiler (``MosaicGpuConfig.profile_dir``), which
records the kernel's named scopes per warpgroup in SM clock cycles: ``c_info`` (reading the tile's schedule row),
``c_qwait``, ``c_storewait``, ``c_k0`` before a tile's steps; ``c_clean`` / ``c_tail`` / ``c_band`` /
``c_general`` around its key-block steps by mask kind (inside ``c_steps``); ``c_drain``, ``c_out`` after them;
``m_*`` in the memory warpgroup. Modes: ``full``, ``arrow:K``, ``mixed`` (the kernel benchmark's mixed plan) and
``mixN`` (its random head mix of seed N), as in scripts/bench_arrow.py, the cache given, the default config.

Prints per shape and mode: the wall ms of an unprofiled call; tiles and key-block steps per CTA (from the call's
schedule); cycles per step of each mask kind; a tile's fixed cycles (its span outside the steps) and their split
by phase; the busiest CTA's span over the mean. The traces stay in ``--out`` (Perfetto / chrome://tracing).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile

import numpy as np

TILE_SCOPES = ("c_info", "c_qwait", "c_storewait", "c_k0", "c_steps", "c_clean", "c_tail", "c_band", "c_general",
               "c_drain", "c_out")  # the compute warpgroups' scopes per tile (the memory one records 4)
PHASES = ("c_info", "c_qwait", "c_storewait", "c_k0", "c_drain", "c_out")
WARPGROUPS = 3  # two compute warpgroups, one memory warpgroup


def events_needed(table: np.ndarray, n_cta: int) -> int:
    """Profiler events per warpgroup that a call with this program table records: its busiest CTA's tiles ×
    the scopes of a tile, plus the kernel's own."""
    return int(table[:n_cta, 1].max()) * len(TILE_SCOPES) + 8


SMEM_PER_BLOCK = 227 * 1024  # Hopper's shared memory per block (opt-in)


def profile_smem_bytes(events: int) -> int:
    """Shared memory the profiler takes: per warpgroup, 2 entries per event boundary (name, clock), 4 bytes each."""
    return events * 2 * 2 * 4 * WARPGROUPS


def steps_by_kind(table: np.ndarray, n_cta: int, kinds) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(tiles per CTA, key-block steps per CTA, steps of each mask kind per CTA on average) of a program table
    (:func:`pallas_kernels.mosaic_gpu.program_table`: rows n_cta… hold (b, h, tile, w, cached, lo0, hi0, …))."""
    from pallas_kernels.mosaic_gpu import cta_rows, range_bounds

    tiles, steps, by_kind = np.zeros(n_cta), np.zeros(n_cta), collections.Counter()
    for c, rows in enumerate(cta_rows(table, n_cta)):
        tiles[c] = len(rows)
        for kind, (lo, hi) in zip(kinds, range_bounds(rows, len(kinds))):
            n = float((hi - lo).sum())
            steps[c] += n
            by_kind[kind] += n / n_cta
    return tiles, steps, dict(by_kind)


def phase_summary(events: list[dict], tiles: np.ndarray, steps_kind: dict[str, float]) -> dict:
    """A call's profiler trace (events with name, ph B/E, ts in units of 1000 cycles, tid) -> cycles per step of
    each mask kind, fixed cycles per tile (a compute warpgroup's span outside ``c_steps``) and per phase, and the
    busiest CTA's span over the mean (compute warpgroups)."""
    per_tid = collections.defaultdict(list)
    for e in events:
        per_tid[e["tid"]].append(e)
    totals = collections.Counter()  # cycles per scope, summed over the compute warpgroups of every CTA
    spans = []
    for tid, evs in per_tid.items():
        if (tid - 1) % WARPGROUPS >= 2:
            continue
        stack = []
        for e in evs:
            if e["ph"] == "B":
                stack.append((e["name"], e["ts"]))
            else:
                name, t0 = stack.pop()
                totals[name] += (e["ts"] - t0) * 1e3
        spans.append((evs[-1]["ts"] - evs[0]["ts"]) * 1e3)
    n_wg = len(spans)
    n_tiles = float(tiles.mean())
    span = float(np.mean(spans))
    steps_cycles = totals["c_steps"] / n_wg
    return dict(
        span_cycles=span, span_max_over_mean=float(np.max(spans) / span), tiles_per_cta=n_tiles,
        cycles_per_step={k: totals[f"c_{k}"] / n_wg / n for k, n in steps_kind.items() if n > 0},
        fixed_per_tile=(span - steps_cycles) / max(n_tiles, 1.0),
        phases_per_tile={p: totals[p] / n_wg / max(n_tiles, 1.0) for p in PHASES})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="FLUX-2048,SD3-1024", help="comma list of the kernel benchmark's shapes")
    ap.add_argument("--modes", default="full,mixed", help="comma list: full, arrow:K, mixed, mixN")
    ap.add_argument("--iters", type=int, default=10, help="unprofiled calls timed per mode")
    ap.add_argument("--out", default=None, help="folder for the traces (default: a temporary one)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dfa2_jax.benchmarking import (ATTENTION_SHAPES, attention_inputs, check_head_mode, median,
                                       mode_head_windows, time_calls)
    from dfa2_jax.plan.flops import DEFAULT_BLOCKS
    from pallas_kernels import MosaicGpuConfig, arrow_attention
    from pallas_kernels.mosaic_gpu import program_table, smem_bytes, supported, table_args

    shapes = {s.name: s for s in ATTENTION_SHAPES}
    if unknown := [s for s in args.shapes.split(",") if s not in shapes]:
        raise SystemExit(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(shapes)})")
    for mode in args.modes.split(","):
        try:
            check_head_mode(mode)
        except ValueError as e:
            raise SystemExit(f"--modes: {e}") from None
    probe = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    if not supported(probe):
        raise SystemExit("profile_kernel: needs a Hopper GPU (the Mosaic GPU kernel's profiler runs on the device)")
    out_dir = args.out or tempfile.mkdtemp(prefix="kernel_profile_")
    rows = []
    for name in args.shapes.split(","):
        sh = shapes[name]
        b, t, n, h, d, tf = sh.batch, sh.text_len, sh.n_img, sh.heads, sh.head_dim, sh.text_first
        s = t + n

        def make_inputs(seed, shape=(b, s, h, d)):
            return attention_inputs(seed, shape, jnp.bfloat16)

        for mode in args.modes.split(","):
            hw = jnp.asarray(mode_head_windows(mode, h, n, t, tf, DEFAULT_BLOCKS))
            config = MosaicGpuConfig()
            kw = table_args((b, s, h, d), config, text_len=t, text_first=tf, has_cache=True)
            schedule, kinds = program_table(hw, **kw)  # the call's schedule (what arrow_schedules computes)
            table, n_cta = np.asarray(schedule), kw["n_cta"]

            def call(q, k, v, c, config):
                return arrow_attention(q, k, v, hw, text_len=t, text_first=tf, cache=c, implementation="mosaic_gpu",
                                       config=config, schedule=schedule)

            plain = jax.jit(lambda q, k, v, c: call(q, k, v, c, config))
            ms = 1e3 * median(time_calls(plain, make_inputs, iters=args.iters, warmup=2))
            trace_dir = os.path.join(out_dir, f"{name}_{mode.replace(':', '')}")
            os.makedirs(trace_dir, exist_ok=True)
            events = events_needed(table, n_cta)
            spare = SMEM_PER_BLOCK - smem_bytes(config, d) - 4096  # barriers, reduction scratch
            if profile_smem_bytes(events) > spare:
                print(f"{name} {mode}: skipped, its busiest CTA's {table[:n_cta, 1].max()} tiles need "
                      f"{profile_smem_bytes(events) // 1024} KiB of profiler memory, {spare // 1024} KiB are free")
                continue
            profiled = MosaicGpuConfig(profile_dir=trace_dir, profile_events=events)
            jax.block_until_ready(call(*make_inputs(1), profiled))
            jax.effects_barrier()
            traces = sorted(glob.glob(os.path.join(trace_dir, "*.json")), key=os.path.getmtime)
            if not traces:
                raise SystemExit(f"profile_kernel: no trace written to {trace_dir}")
            with open(traces[-1]) as f:
                events = json.load(f)["traceEvents"]
            tiles, steps, by_kind = steps_by_kind(table, n_cta, kinds)
            summary = phase_summary(events, tiles, by_kind)
            rows.append(dict(shape=name, mode=mode, wall_ms=ms, steps_per_cta=float(steps.mean()),
                             steps_by_kind=by_kind, trace=traces[-1], **summary))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'shape':10} {'mode':9} {'wall ms':>8} {'tiles':>6} {'steps':>6} "
          f"{'cycles/step clean/tail/band/general':>36} {'fixed/tile':>10} {'max/mean':>8}")
    for r in rows:
        cyc = "/".join(f"{r['cycles_per_step'][k]:.0f}" if k in r["cycles_per_step"] else "-"
                       for k in ("clean", "tail", "band", "general"))
        print(f"{r['shape']:10} {r['mode']:9} {r['wall_ms']:8.3f} {r['tiles_per_cta']:6.1f} {r['steps_per_cta']:6.0f} "
              f"{cyc:>36} {r['fixed_per_tile']:10.0f} {r['span_max_over_mean']:8.3f}")
    print("fixed cycles per tile by phase: " + "; ".join(
        f"{r['shape']} {r['mode']}: " + ", ".join(f"{p} {v:.0f}" for p, v in r["phases_per_tile"].items())
        for r in rows))
    print(f"traces: {out_dir}")


if __name__ == "__main__":
    main()
