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
    import numpy as np
    from bench_scale import plan_arrays

    import dfa2_jax
    from dfa2_jax.pipeline import flux_image_ids
    from dfa2_jax.sample import _scan_core_jit, plan_inputs
    from dfa2_jax.scheduler import FlowMatchEulerConfig, calculate_shift, set_timesteps
    from dfa2_jax.transformer import flux_rope

    cfg, text = dfa2_jax.FluxConfig.dev(), 512
    if args.small:
        cfg = dfa2_jax.FluxConfig.dev(num_layers=2, num_single_layers=2, num_attention_heads=4,
                                      joint_attention_dim=64, pooled_projection_dim=32)
        args.steps, text = 3, 16  # --res as given (default 256 with --small)
    dtype = jnp.dtype("float32" if args.small else "bfloat16")
    tr = dfa2_jax.random_transformer(cfg, dtype=dtype.name)
    dev = jax.devices()[0]
    h = w = args.res // 8
    n_img = (h // 2) * (w // 2)
    ts, sig = set_timesteps(FlowMatchEulerConfig.flux_dev(), args.steps,
                            sigmas=np.linspace(1, 1 / args.steps, args.steps), mu=calculate_shift(n_img))
    ts, sig = jnp.asarray(ts), jnp.asarray(sig)
    plan, kept = plan_arrays(cfg, text, args.steps, n_img, smoke=args.small)
    rng = np.random.default_rng(0)
    cond = {"prompt_embeds": jnp.asarray(rng.standard_normal((1, text, cfg.joint_attention_dim)), dtype),
            "pooled_projections": jnp.asarray(rng.standard_normal((1, cfg.pooled_projection_dim)), dtype),
            "rope": flux_rope(cfg, np.zeros((text, 3), np.float32), flux_image_ids(h, w)),
            "guidance": jnp.full((1,), 3.5, jnp.float32)}
    lat0 = jnp.asarray(rng.standard_normal((1, n_img, cfg.in_channels)), dtype)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tr.state))
    gib = 2.0 ** 20  # MiB
    rows = []
    for name, p in (("dense", None), ("plan", plan)):
        spec, plan_in = plan_inputs(tr.graphdef, tr.state, lat0, cond, ts, p, family="flux", do_cfg=False)
        arrays = None if plan_in is None else {k: v for k, v in plan_in.items() if k != "state"}
        state = None if plan_in is None else plan_in["state"]
        caches = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) if state is not None else 0
        t0 = time.perf_counter()
        compiled = _scan_core_jit.lower(tr.graphdef, tr.state, lat0, cond, ts, sig, arrays, state, family="flux",
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
          f"jax {jax.__version__}; weights {weights / gib:.0f} MiB; plan keeps {kept:.3f} of attention")
    print(f"{'variant':<7} {'caches':>7} {'args':>7} {'output':>7} {'alias':>7} {'temp':>7} {'peak':>7} "
          f"{'compile s':>9} {'run s':>7}  (MiB)")
    for name, caches, m, peak, compile_s, run_s in rows:
        f = (lambda x: f"{x / gib:7.0f}" if x is not None else "      -")
        print(f"{name:<7} {f(caches)} {f(m.argument_size_in_bytes if m else None)} "
              f"{f(m.output_size_in_bytes if m else None)} {f(m.alias_size_in_bytes if m else None)} "
              f"{f(m.temp_size_in_bytes if m else None)} {f(peak)} {compile_s:9.1f} {run_s:7.2f}")
    dense_peak, (_, caches, *_rest) = rows[0][3], rows[1]
    if dense_peak is not None and rows[1][3] is not None:
        bound = (dense_peak + caches) * 1.1
        print(f"plan peak {rows[1][3] / gib:.0f} MiB vs bound (dense peak + caches) x 1.1 = {bound / gib:.0f} MiB: "
              f"{'met' if rows[1][3] <= bound else 'missed'}")


if __name__ == "__main__":
    main()
