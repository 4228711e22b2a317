"""Memory of the sampler with a plan vs dense: XLA's compiled memory analysis and the measured peak.

FLUX.1-dev architecture with random bf16 weights at ``--res``² (``--small``: a tiny float32 model, CPU), the
bench_e2e plan removing ~68% of the attention FLOPs. For dense and the plan: the compiled sampler's argument /
output / alias / temp bytes (``Compiled.memory_analysis``; no run needed), then one real run each with the
device's peak after it (``memory_stats()["peak_bytes_in_use"]``, a process high-water mark: dense runs first).
The bound of the end-to-end issue: peak with the plan ≤ (dense peak + head caches) · 1.1.

    PYTHONPATH=. python3 scripts/bench_memory.py --res 2048 --steps 28
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=None, help="default 2048 (--small: 256)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    args.res = args.res or (256 if args.small else 2048)
    import jax
    import jax.numpy as jnp
    from bench_scale import flux_case, tree_bytes

    from dfa2_jax.sample import scan_sampler, plan_inputs, split_plan_inputs

    case = flux_case(args, 1)
    tr, dtype, ts, sig, plan, kept = case.tr, case.dtype, case.ts, case.sig, case.plan, case.kept
    lat0, cond = case.inputs(1)
    dev = jax.devices()[0]
    weights = tree_bytes(tr.state)
    mib = 2.0 ** 20
    rows = []
    for name, p in (("dense", None), ("plan", plan)):
        spec, plan_in = plan_inputs(tr.graphdef, tr.state, lat0, cond, ts, p, family="flux", do_cfg=False)
        arrays, state = split_plan_inputs(plan_in)
        caches = tree_bytes(state)
        t0 = time.perf_counter()
        compiled = scan_sampler.lower(tr.graphdef, tr.state, lat0, cond, ts, sig, arrays, state, family="flux",
                                        do_cfg=False, report=False, spec=spec).compile()
        compile_s = time.perf_counter() - t0
        m = compiled.memory_analysis()
        t0 = time.perf_counter()
        out = compiled(tr.state, jnp.array(lat0, copy=True), cond, ts, sig, arrays, state)
        jax.block_until_ready(out)
        run_s = time.perf_counter() - t0
        peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
        rows.append((name, caches, m, peak, compile_s, run_s))
    print(f"\nFLUX.1-dev-shaped {args.res}², {args.steps} steps, {dtype.name}, {dev.device_kind}, "
          f"jax {jax.__version__}; weights {weights / mib:.0f} MiB; plan keeps {kept:.3f} of attention")
    print(f"{'variant':<7} {'caches':>7} {'args':>7} {'output':>7} {'alias':>7} {'temp':>7} {'peak':>7} "
          f"{'compile s':>9} {'run s':>7}  (MiB)")
    for name, caches, m, peak, compile_s, run_s in rows:
        f = (lambda x: f"{x / mib:7.0f}" if x is not None else "      -")
        print(f"{name:<7} {f(caches)} {f(m.argument_size_in_bytes if m else None)} "
              f"{f(m.output_size_in_bytes if m else None)} {f(m.alias_size_in_bytes if m else None)} "
              f"{f(m.temp_size_in_bytes if m else None)} {f(peak)} {compile_s:9.1f} {run_s:7.2f}")
    dense_peak, caches = rows[0][3], rows[1][1]
    if dense_peak is not None and rows[1][3] is not None:
        bound = (dense_peak + caches) * 1.1
        print(f"plan peak {rows[1][3] / mib:.0f} MiB vs bound (dense peak + caches) x 1.1 = {bound / mib:.0f} MiB: "
              f"{'met' if rows[1][3] <= bound else 'missed'}")


if __name__ == "__main__":
    main()
