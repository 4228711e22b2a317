"""Scaling of the sharded sampler over the GPUs present: seconds per image and images/s per mesh.

FLUX.1-dev architecture with random bf16 weights (or --small for a CPU smoke run), --res², --steps steps,
dense and with a plan removing ~68% of attention FLOPs (a fixed-seed mix of cache / arrow:8/16/32 / full).
For every device count n in 1, 2, 4, 8 that is present: data parallel (batch n: one image per device) and head
parallel (batch 1, heads split n ways). Every output is compared with the single-device run first.

    PYTHONPATH=. python3 scripts/bench_scale.py --res 2048 --steps 28        # on a multi-GPU machine
    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. python3 scripts/bench_scale.py --small
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan(layers: int, heads: int, steps: int, n_img: int, seed: int = 0):
    import numpy as np

    from dfa2_jax import methods as M
    from dfa2_jax.sample import PlanArrays

    rng = np.random.default_rng(seed)
    names = ["full", "cache", "arrow:8", "arrow:16", "arrow:32"]
    probs = [0.15, 0.35, 0.2, 0.15, 0.15]
    idx = rng.choice(len(names), size=(steps, layers, heads), p=probs)
    idx[0] = 0
    methods = [M.parse_method(n) for n in names]
    codes = np.array([m.code for m in methods], np.int32)[idx]
    hw = np.array([m.half_window(n_img) for m in methods], np.int32)[idx]
    return PlanArrays(codes, hw, np.full((layers, heads), -1, np.int32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a 2+2-layer, 4-head model at 64² (CPU smoke run)")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dfa2_jax
    from dfa2_jax.pipeline import flux_image_ids
    from dfa2_jax.scheduler import FlowMatchEulerConfig, calculate_shift, set_timesteps
    from dfa2_jax.sharding import make_mesh, shard_denoise
    from dfa2_jax.transformer import flux_rope

    cfg = dfa2_jax.FluxConfig.dev()
    text = 512
    if args.small:
        cfg = dfa2_jax.FluxConfig.dev(num_layers=2, num_single_layers=2, num_attention_heads=4,
                                      joint_attention_dim=64, pooled_projection_dim=32)
        args.res, args.steps, text = 64, 3, 16
    dtype = "float32" if args.small else "bfloat16"
    tr = dfa2_jax.random_transformer(cfg, dtype=dtype)
    h = w = args.res // 8
    n_img = (h // 2) * (w // 2)
    layers = len(tr.attention_layer_names())
    ts, sig = set_timesteps(FlowMatchEulerConfig.flux_dev(), args.steps,
                            sigmas=np.linspace(1, 1 / args.steps, args.steps), mu=calculate_shift(n_img))
    plan = _plan(layers, cfg.num_attention_heads, args.steps, n_img)
    devices = jax.devices()
    counts = [n for n in (1, 2, 4, 8) if n <= len(devices)]
    rng = np.random.default_rng(0)

    def inputs(batch):
        dt = jnp.dtype(dtype)
        cond = {"prompt_embeds": jnp.asarray(rng.standard_normal((batch, text, cfg.joint_attention_dim)), dt),
                "pooled_projections": jnp.asarray(rng.standard_normal((batch, cfg.pooled_projection_dim)), dt),
                "rope": flux_rope(cfg, np.zeros((text, 3), np.float32), flux_image_ids(h, w)),
                "guidance": jnp.full((batch,), 3.5, jnp.float32)}
        return jnp.asarray(rng.standard_normal((batch, n_img, cfg.in_channels)), dt), cond

    rows = []
    for mode in ("data", "heads"):
        for with_plan in (False, True):
            ref = None
            for n in counts:
                if mode == "heads" and cfg.num_attention_heads % n:
                    continue
                batch = n if mode == "data" else 1
                lat, cond = inputs(batch) if ref is None or mode == "data" else ref[1]
                mesh = make_mesh({mode: n}, devices[:n])
                kw = dict(family="flux", plan=plan if with_plan else None)
                times = []
                for _ in range(args.runs + 1):  # the first run compiles
                    t0 = time.perf_counter()
                    out = shard_denoise(mesh, tr.graphdef, tr.state, jnp.array(lat, copy=True), cond, ts, sig, **kw)
                    jax.block_until_ready(out)
                    times.append(time.perf_counter() - t0)
                best = min(times[1:])
                err = "-"
                if mode == "heads":
                    if ref is None:
                        ref = (np.asarray(out, np.float32), (lat, cond))
                    else:
                        e = np.abs(np.asarray(out, np.float32) - ref[0]).max() / np.abs(ref[0]).max()
                        err = f"{e:.1e}"
                rows.append((mode, n, "plan" if with_plan else "dense", batch, best / batch, batch / best, err))
    print(f"\nFLUX.1-dev-shaped ({cfg.num_layers}+{cfg.num_single_layers} blocks) {args.res}², {args.steps} steps, "
          f"{dtype}, {devices[0].device_kind} x{len(devices)}, jax {jax.__version__}")
    print(f"{'mode':<6} {'devices':>7} {'attn':>6} {'batch':>5} {'s/image':>9} {'images/s':>9} {'rel err vs 1':>12}")
    for r in rows:
        print(f"{r[0]:<6} {r[1]:>7} {r[2]:>6} {r[3]:>5} {r[4]:>9.3f} {r[5]:>9.3f} {r[6]:>12}")


if __name__ == "__main__":
    main()
