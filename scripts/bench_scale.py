"""Scaling of the sharded sampler over the GPUs present: seconds per image and images/s per mesh.

FLUX.1-dev architecture with random bf16 weights (``--small``: the 2+2-layer, 4-head benchmark model at 256², for a
CPU smoke run), ``--res``², ``--steps`` steps, dense and with the benchmark plan that removes ~68% of the attention
FLOPs (:func:`dfa2_jax.benchmarking.synthetic_plan`, seed 0: cache / arrow:8/16/32 / full, full heads thinning
out and cached heads growing along the steps). The plan's heads run what ``--attention-impl`` names.

Rows, per attention variant (``--attn dense,plan``):

- ``none``: :func:`dfa2_jax.sample.denoise` with no mesh at all — the single-device path (what ``dfa2 generate --mesh none`` runs, and ``--mesh auto`` on one GPU);
- ``data`` / ``heads`` / ``seq`` × n for n in 1, 2, 4, 8 present: :func:`dfa2_jax.parallel.sharded.shard_denoise` on a
  1-D mesh. data: batch n (one image per device); heads: batch 1, the 24 heads split n ways (Megatron); seq:
  batch 1, tokens split n ways outside attention and heads inside (Ulysses) (n = 1 is the same computation for
  every axis and is run once, as ``mesh1``).

Every output is compared with the ``none`` output of the same variant on the same initial noise first (data
rows: image 0 of the batch, whose noise is ``none``'s): max |Δ| / max |ref| over the final latents.

Timing: each row is called once (that call compiles: compile s = first − steady) and timed ``--runs`` times
(median), with fresh copies of the latents made outside the timed region. ``--budget-s`` bounds the whole run:
a row is skipped (and said so) when the time left is less than its estimate. On several NVIDIA GPUs, keep NVLink
multicast off (``NCCL_NVLS_ENABLE=0``).

    NCCL_NVLS_ENABLE=0 python3 scripts/bench_scale.py --res 2048 --steps 28 --out runs/scale   # the GPUs present
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python3 scripts/bench_scale.py --small
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types

REMOVED = 0.68


def flux_case(args, max_batch: int) -> types.SimpleNamespace:
    """The benchmark's model and inputs: FLUX.1-dev (``args.small``: the tiny benchmark model, float32, 3 steps,
    16 text tokens) with random weights at ``args.res``², its schedule, the 68% plan, and ``inputs(batch)`` ->
    (latents, cond) (:func:`dfa2_jax.benchmarking.sampler_inputs`: batch b is the first b rows of a larger batch,
    so row 0 is the batch-1 input)."""
    import jax
    import jax.numpy as jnp

    import dfa2_jax
    from dfa2_jax.benchmarking import benchmark_plan, image_tokens, model_config, sampler_inputs, schedule, text_tokens

    cfg, text = model_config("flux", tiny=args.small), text_tokens("flux", tiny=args.small)
    if args.small:
        args.steps = 3
    dtype = jnp.dtype("float32" if args.small else "bfloat16")
    t0 = time.perf_counter()
    tr = dfa2_jax.random_transformer(cfg, dtype=dtype.name)
    jax.block_until_ready(tr.state)
    init_s = time.perf_counter() - t0
    n_img = image_tokens(args.res)
    ts, sig = schedule("flux", args.steps, n_img)
    plan, kept = benchmark_plan(cfg, text_len=text, steps=args.steps, n_img=n_img, removed=REMOVED, tiny=args.small)

    def inputs(batch):
        return sampler_inputs(cfg, res=args.res, batch=batch, text_len=text, dtype=dtype)

    return types.SimpleNamespace(cfg=cfg, text=text, dtype=dtype, tr=tr, init_s=init_s, n_img=n_img,
                                 ts=jnp.asarray(ts), sig=jnp.asarray(sig), plan=plan, kept=kept, inputs=inputs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=None,
                    help="default 2048 (--small: 256, 1024 image tokens: every arrow:k has a band)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--runs", type=int, default=1, help="timed calls per row after the compiling one (median)")
    ap.add_argument("--attn", default="dense,plan")
    ap.add_argument("--modes", default="data,heads,seq")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--no-mesh1", action="store_true", help="skip the one-device mesh rows")
    ap.add_argument("--out", default=None, help="folder for scale.json")
    ap.add_argument("--small", action="store_true", help="a 2+2-layer, 4-head model at 256² (CPU smoke run)")
    ap.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "triton", "mosaic_gpu", "interpret"),
                    help="how the plan's compressed heads run (denoise's / shard_denoise's attention_impl)")
    args = ap.parse_args()
    args.res = args.res or (256 if args.small else 2048)
    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dfa2_jax.sample import denoise
    from dfa2_jax.parallel.sharded import make_mesh, shard_denoise

    devices = jax.devices()
    counts = [n for n in (1, 2, 4, 8) if n <= len(devices)]
    modes = [m for m in args.modes.split(",") if m]
    case = flux_case(args, max(counts))
    cfg, dtype, tr, ts, sig, plan, kept, inputs = (case.cfg, case.dtype, case.tr, case.ts, case.sig, case.plan,
                                                    case.kept, case.inputs)

    rows, est = [], {}
    meta = {"device": devices[0].device_kind, "devices": len(devices), "jax": jax.__version__,
            "res": args.res, "steps": args.steps, "dtype": dtype.name, "init_s": case.init_s, "plan_kept": kept,
            "layers": f"{cfg.num_layers}+{cfg.num_single_layers}", "heads": cfg.num_attention_heads,
            "attention_impl": args.attention_impl}
    print("META", json.dumps(meta), flush=True)

    def left():
        return args.budget_s - (time.perf_counter() - t_start)

    for attn in [a for a in args.attn.split(",") if a]:
        kw = dict(family="flux", plan=plan if attn == "plan" else None, attention_impl=args.attention_impl)
        ref = None
        # none first (the reference), the multi-device rows, then the one-device mesh (its speed should match none)
        jobs = [("none", 1)] + [(m, n) for n in counts[1:] for m in modes] + ([] if args.no_mesh1 else [(modes[0], 1)])
        for mode, n in jobs:
            if mode in ("heads", "seq") and cfg.num_attention_heads % n:
                continue
            batch = n if mode == "data" else 1
            name = "mesh1" if n == 1 and mode != "none" else mode
            guess = est.get((attn, "first"), 0) + args.runs * est.get((attn, "run"), 0) * batch / n
            if left() < guess:
                print(f"SKIP {attn} {name} {n}: {left():.0f} s left, needs ~{guess:.0f} s", flush=True)
                continue
            lat, cond = inputs(batch)
            if mode == "none":
                def call(x):
                    return denoise(tr.graphdef, tr.state, x, cond, ts, sig, **kw)
            else:
                mesh = make_mesh({mode: n}, devices[:n])

                def call(x, mesh=mesh):
                    return shard_denoise(mesh, tr.graphdef, tr.state, x, cond, ts, sig, **kw)
            times = []
            try:
                for _ in range(args.runs + 1):  # the first call compiles
                    x = jax.block_until_ready(jnp.array(lat, copy=True))  # the samplers donate their latents
                    t0 = time.perf_counter()
                    out = jax.block_until_ready(call(x))
                    times.append(time.perf_counter() - t0)
            except Exception as e:  # a failing mesh must not hide the other rows
                print(f"FAIL {attn} {name} {n}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                continue
            steady = float(np.median(times[1:]))
            est.setdefault((attn, "first"), times[0])
            est.setdefault((attn, "run"), steady)
            o = np.asarray(out, np.float32)
            if ref is None:
                ref = o[:1]
            err = float(np.abs(o[:1] - ref).max() / np.abs(ref).max())
            row = {"attn": attn, "mode": name, "devices": n, "batch": batch, "s_per_image": steady / batch,
                   "images_per_s": batch / steady, "latency_s": steady, "compile_s": times[0] - steady,
                   "rel_err": err, "finite": bool(np.isfinite(o).all()), "runs": args.runs}
            rows.append(row)
            print("ROW", json.dumps(row), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "scale.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nFLUX.1-dev-shaped ({meta['layers']} blocks) {args.res}², {args.steps} steps, {dtype.name}, "
          f"{devices[0].device_kind} x{len(devices)}, jax {jax.__version__}; plan keeps {kept:.3f} of attention")
    base = {r["attn"]: r["latency_s"] for r in rows if r["mode"] == "none"}
    print(f"{'attn':<6} {'mode':<6} {'dev':>3} {'batch':>5} {'latency s':>9} {'s/image':>8} {'images/s':>8} "
          f"{'vs none':>7} {'compile':>7} {'rel err':>8}")
    for r in rows:
        b = base.get(r["attn"])
        rel = f"{r['latency_s'] / b:.3f}" if b else "-"
        print(f"{r['attn']:<6} {r['mode']:<6} {r['devices']:>3} {r['batch']:>5} {r['latency_s']:>9.3f} "
              f"{r['s_per_image']:>8.3f} {r['images_per_s']:>8.3f} {rel:>7} {r['compile_s']:>7.1f} "
              f"{r['rel_err']:>8.1e}")


if __name__ == "__main__":
    main()
