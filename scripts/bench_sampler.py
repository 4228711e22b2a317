"""The scanned sampler vs N x one transformer step: what the loop adds (goal: < 2%).

FLUX.1-dev architecture with random bf16 weights, batch 1, 512 text tokens, guidance 3.5, the FLUX dynamic
schedule (inputs: :func:`dfa2_jax.benchmarking.sampler_inputs`). (a) one jitted transformer step (median of
--iters); (b) the whole --steps-step ``lax.scan`` sampler (``dfa2_jax.sample.scan_sampler``, dense, median of
--runs); overhead = b / (steps * a) - 1. Compile times of both.

    python3 scripts/bench_sampler.py --res 1024 --steps 28      # one GPU
    python3 scripts/bench_sampler.py --smoke                    # CPU: the tiny model, 128², 3 steps
"""

from __future__ import annotations

import argparse
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=None, help="default 1024 (--smoke: 128)")
    ap.add_argument("--steps", type=int, default=None, help="default 28 (--smoke: 3)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default 20; --smoke: 2)")
    ap.add_argument("--runs", type=int, default=None, help="timed sampler runs (default 5; --smoke: 2)")
    ap.add_argument("--smoke", action="store_true", help="the tiny benchmark model, float32 (CPU check)")
    args = ap.parse_args()
    args.res = args.res or (128 if args.smoke else 1024)
    args.steps = args.steps or (3 if args.smoke else 28)
    args.iters = args.iters or (2 if args.smoke else 20)
    args.runs = args.runs or (2 if args.smoke else 5)
    import jax
    import jax.numpy as jnp

    import dfa2_jax
    from dfa2_jax.benchmarking import image_tokens, median, model_config, sampler_inputs, schedule, text_tokens
    from dfa2_jax.sample import scan_sampler
    from dfa2_jax.transformer import flux_forward

    cfg, text = model_config("flux", tiny=args.smoke), text_tokens("flux", tiny=args.smoke)
    dtype = jnp.dtype("float32" if args.smoke else "bfloat16")
    tr = dfa2_jax.random_transformer(cfg, dtype=dtype.name)
    n = image_tokens(args.res)
    _, cond = sampler_inputs(cfg, res=args.res, text_len=text, dtype=dtype)
    ts, sig = (jnp.asarray(a) for a in schedule("flux", args.steps, n))

    def lat(seed):
        return sampler_inputs(cfg, res=args.res, text_len=text, dtype=dtype, seed=seed)[0]

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
    step_ms = 1e3 * median(st)

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
        out, _ = scan(tr.state, x, cond, ts, sig, None, None)
        jax.block_until_ready(out)
        rt.append(time.perf_counter() - t0)
    scan_s = median(rt)
    finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
    overhead = scan_s / (args.steps * step_ms / 1e3) - 1
    print(f"\nFLUX.1-dev{'-tiny' if args.smoke else ''} {args.res}x{args.res}, {args.steps} steps, "
          f"{'bf16' if dtype == jnp.bfloat16 else dtype.name}, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'one step ms':>12} {'x steps s':>10} {'scan s':>8} {'overhead':>9} {'step compile s':>15} "
          f"{'scan compile s':>15} {'finite':>7}")
    print(f"{step_ms:>12.1f} {args.steps * step_ms / 1e3:>10.3f} {scan_s:>8.3f} {100 * overhead:>8.2f}% "
          f"{step_compile:>15.1f} {scan_compile:>15.1f} {finite!s:>7}")
    if not finite:
        raise SystemExit("bench_sampler: the sampler's output is not finite")


if __name__ == "__main__":
    main()
