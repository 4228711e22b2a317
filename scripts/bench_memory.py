"""Memory of the sampler with a plan vs dense: XLA's compiled memory analysis and the measured peak.

FLUX.1-dev architecture with random bf16 weights at ``--res``² (``--small``: the tiny benchmark model, float32,
CPU), the benchmark plan removing ~68% of the attention FLOPs (:func:`dfa2_jax.benchmarking.benchmark_plan`), its
heads run as ``--attention-impl`` names. For dense and the plan: the compiled sampler's argument / output / alias /
temp bytes (``Compiled.memory_analysis``; no run needed), then one real run each with the device's peak after it
(``memory_stats()["peak_bytes_in_use"]``, a process high-water mark: dense runs first). The bound checked: peak
with the plan ≤ (dense peak + head caches) · 1.1.

    python3 scripts/bench_memory.py --res 2048 --steps 28       # one GPU
    python3 scripts/bench_memory.py --small                     # CPU smoke run

Prints a table (MiB) and the bound's verdict; ``--out DIR`` also writes DIR/memory.json (bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=None, help="default 2048 (--small: 256)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--small", action="store_true", help="the tiny benchmark model, float32, 3 steps (CPU smoke run)")
    ap.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "triton", "mosaic_gpu", "interpret"),
                    help="how the plan's compressed heads run (plan_inputs' attention_impl)")
    ap.add_argument("--out", default=None, help="folder for memory.json")
    args = ap.parse_args()
    args.res = args.res or (256 if args.small else 2048)
    import jax
    import jax.numpy as jnp

    import dfa2_jax
    from dfa2_jax.benchmarking import (arrow_implementation, benchmark_plan, image_tokens, model_config,
                                       sampler_inputs, schedule, text_tokens, tree_bytes)
    from dfa2_jax.sample import plan_inputs, scan_sampler, split_plan_inputs

    cfg, text = model_config("flux", tiny=args.small), text_tokens("flux", tiny=args.small)
    if args.small:
        args.steps = 3
    dtype = jnp.dtype("float32" if args.small else "bfloat16")
    tr = dfa2_jax.random_transformer(cfg, dtype=dtype.name)
    n_img = image_tokens(args.res)
    ts, sig = (jnp.asarray(a) for a in schedule("flux", args.steps, n_img))
    plan, kept = benchmark_plan(cfg, text_len=text, steps=args.steps, n_img=n_img, tiny=args.small)
    lat0, cond = sampler_inputs(cfg, res=args.res, text_len=text, dtype=dtype)
    dev = jax.devices()[0]
    impl = arrow_implementation(args.attention_impl, jax.ShapeDtypeStruct(
        (1, n_img + text, cfg.num_attention_heads, cfg.attention_head_dim), dtype))
    weights = tree_bytes(tr.state)
    mib = 2.0 ** 20
    rows = []
    for name, p in (("dense", None), ("plan", plan)):
        spec, plan_in = plan_inputs(tr.graphdef, tr.state, lat0, cond, ts, p, family="flux", do_cfg=False,
                                    attention_impl=args.attention_impl)
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
          f"jax {jax.__version__}; weights {weights / mib:.0f} MiB; plan keeps {kept:.3f} of attention "
          f"(kernel: {impl})")
    print(f"{'variant':<7} {'caches':>7} {'args':>7} {'output':>7} {'alias':>7} {'temp':>7} {'peak':>7} "
          f"{'compile s':>9} {'run s':>7}  (MiB)")
    for name, caches, m, peak, compile_s, run_s in rows:
        f = (lambda x: f"{x / mib:7.0f}" if x is not None else "      -")
        print(f"{name:<7} {f(caches)} {f(m.argument_size_in_bytes if m else None)} "
              f"{f(m.output_size_in_bytes if m else None)} {f(m.alias_size_in_bytes if m else None)} "
              f"{f(m.temp_size_in_bytes if m else None)} {f(peak)} {compile_s:9.1f} {run_s:7.2f}")
    dense_peak, caches = rows[0][3], rows[1][1]
    bound = None
    if dense_peak is not None and rows[1][3] is not None:
        bound = (dense_peak + caches) * 1.1
        print(f"plan peak {rows[1][3] / mib:.0f} MiB vs bound (dense peak + caches) x 1.1 = {bound / mib:.0f} MiB: "
              f"{'met' if rows[1][3] <= bound else 'missed'}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"res": args.res, "steps": args.steps, "dtype": dtype.name, "device": dev.device_kind,
                "jax": jax.__version__, "weights_bytes": weights, "plan_kept": kept,
                "attention_impl": args.attention_impl, "arrow_impl": impl, "bound_bytes": bound}
        out_rows = [{"variant": name, "caches": caches, "peak": peak, "compile_s": compile_s, "run_s": run_s,
                     **({k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
                        if m else {})} for name, caches, m, peak, compile_s, run_s in rows]
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump({"meta": meta, "rows": out_rows}, f, indent=1)


if __name__ == "__main__":
    main()
