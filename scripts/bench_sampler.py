"""The scanned sampler vs N x one transformer step: what the loop adds (goal: < 2%).

FLUX.1-dev architecture with random bf16 weights, batch 1, 512 text tokens, guidance 3.5, the FLUX dynamic
schedule. (a) one jitted transformer step (median of --iters); (b) the whole --steps-step `lax.scan` sampler
(`dfa2_jax.sample.denoise`, median of --runs); overhead = b / (steps * a) - 1. Compile times of both.

    PYTHONPATH=. python3 scripts/bench_sampler.py --res 1024 --steps 28
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dfa2_jax
    from dfa2_jax.pipeline import flux_image_ids
    from dfa2_jax.sample import scan_sampler
    from dfa2_jax.scheduler import FlowMatchEulerConfig, calculate_shift, set_timesteps
    from dfa2_jax.transformer import flux_forward, flux_rope

    cfg = dfa2_jax.FluxConfig.dev()
    tr = dfa2_jax.random_transformer(cfg, dtype="bfloat16")
    h = w = args.res // 8
    n = (h // 2) * (w // 2)
    rng = np.random.default_rng(0)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    cond = {"prompt_embeds": bf(rng.standard_normal((1, 512, 4096))), "pooled_projections": bf(rng.standard_normal((1, 768))),
            "rope": flux_rope(cfg, np.zeros((512, 3), np.float32), flux_image_ids(h, w)),
            "guidance": jnp.full((1,), 3.5, jnp.float32)}
    sched = FlowMatchEulerConfig.flux_dev()
    ts, sig = set_timesteps(sched, args.steps, sigmas=np.linspace(1, 1 / args.steps, args.steps),
                            mu=calculate_shift(n))
    ts, sig = jnp.asarray(ts), jnp.asarray(sig)
    lat = lambda s: bf(np.random.default_rng(s).standard_normal((1, n, 64)))  # noqa: E731

    step_args = (tr.graphdef, tr.state, lat(0), cond["prompt_embeds"], cond["pooled_projections"],
                 jnp.full((1,), 0.5, jnp.float32), cond["rope"], cond["guidance"])
    t0 = time.perf_counter()
    step = flux_forward.lower(*step_args).compile()
    step_compile = time.perf_counter() - t0
    for _ in range(3):
        jax.block_until_ready(step(*step_args[1:]))
    st = []
    for i in range(args.iters):
        a = (tr.state, lat(i % 3)) + step_args[3:]
        jax.block_until_ready(a[1])
        t0 = time.perf_counter()
        jax.block_until_ready(step(*a))
        st.append(time.perf_counter() - t0)
    step_ms = 1e3 * sorted(st)[len(st) // 2]

    kw = dict(family="flux", do_cfg=False, report=False, spec=None)
    t0 = time.perf_counter()
    scan = scan_sampler.lower(tr.graphdef, tr.state, lat(0), cond, ts, sig, None, None, **kw).compile()
    scan_compile = time.perf_counter() - t0
    jax.block_until_ready(scan(tr.state, lat(0), cond, ts, sig, None, None))
    rt = []
    for i in range(args.runs):
        x = lat(i)
        jax.block_until_ready(x)
        t0 = time.perf_counter()
        out = scan(tr.state, x, cond, ts, sig, None, None)
        jax.block_until_ready(out)
        rt.append(time.perf_counter() - t0)
    scan_s = sorted(rt)[len(rt) // 2]
    finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
    overhead = scan_s / (args.steps * step_ms / 1e3) - 1
    print(f"\nFLUX.1-dev {args.res}x{args.res}, {args.steps} steps, bf16, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}")
    print(f"{'one step ms':>12} {'x steps s':>10} {'scan s':>8} {'overhead':>9} {'step compile s':>15} "
          f"{'scan compile s':>15} {'finite':>7}")
    print(f"{step_ms:>12.1f} {args.steps * step_ms / 1e3:>10.3f} {scan_s:>8.3f} {100 * overhead:>8.2f}% "
          f"{step_compile:>15.1f} {scan_compile:>15.1f} {finite!s:>7}")


if __name__ == "__main__":
    main()
