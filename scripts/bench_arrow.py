"""Arrow-attention kernel vs dense cuDNN attention, on one GPU.

    python3 scripts/bench_arrow.py                       # FLUX 2048² and SD3 1024² shapes on the GPU
    python3 scripts/bench_arrow.py --interpret --small   # CPU smoke run: correctness part + a few timed calls

For each shape (:data:`dfa2_jax.benchmarking.ATTENTION_SHAPES`): check the kernel against the pure-jnp reference
first (full size: on up to 4 heads, one kind of each, one head at a time so the S×S reference fits), then time
dense cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``; "xla" off GPU) and the kernel with all heads
full, all arrow:8 / :16 / :32, the benchmark's mixed plan (25% cached heads, the rest arrow / full, fixed seed;
68% of the FLOPs removed) and ``--mixes`` random head mixes at the same kept fraction (each head full, arrow:8 /
:16 / :32 or cached at random, seeds 1..N, redrawn until the kept fraction is within ±1% of the mixed plan's
target), each checked against the reference too. Each wall figure is the median of ``--iters`` timed calls after
warm-up, each call on fresh random inputs (drawn outside the timed region), host dispatch included. On a GPU each
row also gets its GPU time (``--device-calls`` calls under jax.profiler: every kernel and copy of a call summed,
and its largest kernel alone): what a jitted sampler pays, where no call waits on the host. The Mosaic GPU kernel
is timed with its launch schedule computed beforehand (``arrow_schedules``), as the sampler does once per step for
all its layers; what computing schedules costs is printed on its own line per config (one call's, and a FLUX.1
step's 57 at once). Columns: ms; effective TFLOP/s = dense FLOPs (4·B·H·S²·D) / time; TFLOP/s on the kept tiles;
speedup vs the dense baseline; kept fraction of (block_q × block_k) tiles (dfa2_jax.plan.flops.arrow_tiles /
total_tiles, cached heads 0); the ideal speedup 1/kept. Last per shape and backend: the mixed plan's speedup and
the worst of the random mixes', by wall clock and by GPU time.
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from dfa2_jax.benchmarking import (ARROW_KS, ATTENTION_SHAPES, MIX_KEPT, MIX_TOL, SMALL_ATTENTION_SHAPES, TINY_BLOCKS,
                                   attention_inputs, head_windows_kept, jax_kernel_times, median, mode_head_windows,
                                   time_calls)
from dfa2_jax.plan.flops import DEFAULT_BLOCKS
from pallas_kernels import (MosaicGpuConfig, TritonConfig, arrow_attention, arrow_attention_reference, arrow_schedules,
                            autotune)
from pallas_kernels.mosaic_gpu import cta_loads
from pallas_kernels.triton import heuristic_config
from pallas_kernels.tuning import tuned_config

TOL = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 4e-3, jnp.dtype(jnp.float32): 1e-5}
def check(q, k, v, cache, hw, *, text_len, text_first, interpret, implementation, config, max_heads):
    """Max |kernel − reference| on up to ``max_heads`` heads (one of each distinct window first), one head
    at a time; raises if above the dtype tolerance."""
    hw_np = np.asarray(hw)
    first = [int(np.flatnonzero(hw_np == w)[0]) for w in hw_np]  # one head of each window first, then the rest
    heads = list(dict.fromkeys(first + list(range(len(hw_np)))))[:max_heads]
    out = arrow_attention(q, k, v, hw, text_len=text_len, text_first=text_first, cache=cache,
                          implementation=implementation, interpret=interpret, config=config)
    worst = 0.0
    for i in heads:
        sl = slice(i, i + 1)
        ref = arrow_attention_reference(q[:, :, sl], k[:, :, sl], v[:, :, sl], hw[sl], text_len=text_len,
                                        text_first=text_first, cache=cache[:, :, sl])
        err = float(jnp.max(jnp.abs(out[:, :, sl].astype(jnp.float32) - ref.astype(jnp.float32))))
        worst = max(worst, err)
    tol = TOL[jnp.dtype(q.dtype)]
    if not np.isfinite(worst) or worst > tol:
        raise AssertionError(f"kernel vs reference: max error {worst:.3g} > {tol} (windows {hw_np.tolist()})")
    return worst, heads


def time_fn(fn, make_inputs, iters, warmup):
    """Median seconds of ``fn`` over ``iters`` calls on fresh inputs (:func:`dfa2_jax.benchmarking.time_calls`)."""
    return median(time_calls(fn, make_inputs, iters=iters, warmup=warmup))


def device_ms(fn, make_inputs, calls: int) -> tuple[float, float] | None:
    """GPU time of ``fn`` per call over ``calls`` calls on fresh inputs under jax.profiler: (every kernel and copy
    of the call summed, its largest kernel alone), in ms; None without GPU kernels (CPU) or with ``calls`` 0."""
    if calls <= 0:
        return None
    arg_sets = [jax.block_until_ready(make_inputs(20_000 + i)) for i in range(calls)]
    with tempfile.TemporaryDirectory() as workdir:
        table, _ = jax_kernel_times(fn, arg_sets, workdir)
    if not table:
        return None
    return sum(k["ms"] for k in table) / calls, table[0]["ms"] / calls


def schedule_seconds(schedules, windows, n_calls: int, iters: int = 20) -> float:
    """Median seconds of computing ``n_calls`` launch schedules at once (jitted; ``schedules`` maps half-windows
    [L, H] to the tables)."""
    fn = jax.jit(schedules)
    w = jnp.tile(jnp.asarray(windows, jnp.int32)[None], (n_calls, 1))
    jax.block_until_ready(fn(w))
    return median(time_calls(fn, lambda seed: (w,), iters=iters, warmup=2))


def triton_fa_rows(name, make_inputs, s, d, dense_flops, iters, warmup, device_calls=0):
    """jax's Pallas-Triton FlashAttention example (dense, 128×64 tiles) on the sequence padded to 128: what the
    Triton backend reaches on a plain dense kernel (padding keys attended: a speed reference only)."""
    try:
        from jax.experimental.pallas.ops.gpu import attention as fa
    except Exception as e:  # noqa: BLE001
        print(f"  triton fa: unavailable ({type(e).__name__}: {e})")
        return []
    out = []
    s_pad = -(-s // 128) * 128
    pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    for nw, ns in ((8, 3), (4, 3), (8, 2)):
        try:
            bs = fa.BlockSizes(block_q=128, block_k=64)
            fn = jax.jit(lambda q, k, v, c, nw=nw, ns=ns: fa.mha(*(jnp.pad(x, pad) for x in (q, k, v)), None,
                                                              sm_scale=d ** -0.5, block_sizes=bs, num_warps=nw,
                                                              num_stages=ns)[:, :s])
            ms = time_fn(fn, make_inputs, iters, warmup)
            print(f"  triton fa 128x64 warps={nw} stages={ns}: {ms * 1e3:.3f} ms")
            out.append((name, f"tritonFA{nw}/{ns}", ms, dense_flops, 1.0, device_ms(fn, make_inputs, device_calls)))
        except Exception as e:  # noqa: BLE001
            print(f"  triton fa warps={nw} stages={ns}: failed ({type(e).__name__}: {str(e)[:300]})")
    return out


def mgpu_rows(name, make_inputs, b, s, h, d, dense_flops, iters, warmup, device_calls=0):
    """jax's Mosaic GPU FA3 example, dense, on the sequence padded to its tile multiple (padding keys are
    attended too: a speed reference only). Configs that fail are reported and skipped."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3
    except Exception as e:  # noqa: BLE001
        print(f"  mgpu: unavailable ({type(e).__name__}: {e})")
        return []
    out = []
    for bq, bkv, steps in ((64, 128, 2), (64, 64, 2), (128, 128, 2), (64, 128, 3)):
        s_pad = -(-s // (2 * bq)) * (2 * bq)
        s_pad = -(-s_pad // bkv) * bkv
        pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
        try:
            cfg = fa3.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps)
            # The example's shared memory is float16: inputs are cast (fused into the padding copy).
            fn = jax.jit(lambda q, k, v, c, cfg=cfg: fa3.attention(
                *(jnp.pad(x.astype(jnp.float16), pad) for x in (q, k, v)), cfg)[:, :s])
            q, k, v, c = make_inputs(4242)
            ref = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            err = float(jnp.max(jnp.abs(fn(q, k, v, c)[:, :, :2].astype(jnp.float32)
                                        - ref[:, :, :2].astype(jnp.float32)))) if s_pad == s else float("nan")
            ms = time_fn(fn, make_inputs, iters, warmup)
            print(f"  mgpu fa3 bq={bq} bkv={bkv} steps={steps} S_pad={s_pad}: {ms * 1e3:.3f} ms "
                  f"(err vs cudnn {err:.2e})")
            out.append((name, f"mgpu{bq}/{bkv}/{steps}", ms, dense_flops, 1.0,
                        device_ms(fn, make_inputs, device_calls)))
        except Exception as e:  # noqa: BLE001
            print(f"  mgpu fa3 bq={bq} bkv={bkv} steps={steps}: failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300] if str(e) else ''})")
    return out



MOSAIC_FLAGS = {"ranges": ("group_by_mask", False), "roundrobin": ("balance", False)}  # spec suffix -> config field


def mosaic_config(spec: str) -> MosaicGpuConfig:
    """``block_q/block_kv/ring[/num_ctas][/ranges][/roundrobin]``: ``ranges`` loops once per key-block range
    instead of once per mask kind (``MosaicGpuConfig.group_by_mask=False``); ``roundrobin``: every n-th tile of the
    longest-first order onto each CTA instead of the cost-balanced schedule (``balance=False``)."""
    parts = spec.split("/")
    fields = {}
    while parts and parts[-1] in MOSAIC_FLAGS:
        field, value = MOSAIC_FLAGS[parts.pop()]
        fields[field] = value
    try:
        return MosaicGpuConfig(*map(int, parts), **fields)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--mosaic-configs {spec!r}: {e}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interpret", action="store_true", help="run the kernel in Pallas interpret mode (CPU)")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (default 20; 2 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; 1 with --small)")
    p.add_argument("--check-heads", type=int, default=4, help="heads compared with the reference per mode")
    p.add_argument("--tune", action="store_true", help="autotune each shape on its mixed plan first (the choice "
                   "is cached on disk and used by every later call without a config)")
    p.add_argument("--mgpu", action="store_true", help="also time jax's Mosaic GPU FlashAttention-3 example "
                   "(jax.experimental.pallas.ops.gpu.attention_mgpu, dense) as a Hopper reference point")
    p.add_argument("--shapes", default=None, help="comma-separated subset of the shape names (FLUX-2048, SD3-1024; "
                   "--small: FLUX-small, SD3-small)")
    p.add_argument("--mixes", type=int, default=3, help="random head mixes at the mixed plan's kept fraction, each "
                   "checked and timed (seeds 1..N)")
    p.add_argument("--backends", default="triton", help="comma-separated implementations (arrow_attention's "
                   "implementation= argument): triton (the Pallas-Triton kernel), mosaic_gpu (the Mosaic GPU "
                   "kernel, Hopper; in interpret mode on CPU; 'mosaic' is accepted as an alias)")
    p.add_argument("--mosaic-configs", default="64/128/2", help="Mosaic GPU configs to time, comma-separated "
                   "block_q/block_kv/max_concurrent_steps[/num_ctas][/ranges][/roundrobin] (roundrobin: the "
                   "round-robin schedule instead of the cost-balanced default); 'heuristic' = the per-head-dim default")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="q, k, v and cache dtype "
                   "of every row (float16 compares like for like with --mgpu, whose example runs float16)")
    p.add_argument("--device-calls", type=int, default=5, help="calls per row under jax.profiler for the GPU time "
                   "(every kernel and copy of a call, without host dispatch; 0: skip; none off GPU)")
    args = p.parse_args(argv)
    iters = args.iters or (2 if args.small else 20)
    warmup = args.warmup or (1 if args.small else 3)
    on_gpu = jax.default_backend() == "gpu"
    device_calls = args.device_calls if on_gpu and not args.interpret else 0
    dense_impl = "cudnn" if on_gpu else "xla"
    dtype = jnp.dtype(args.dtype)
    if dtype == jnp.float16 and not on_gpu:
        p.error("--dtype float16 needs a GPU: the CPU's dense baseline has no float16 matmul with float32 accumulation")
    shapes = SMALL_ATTENTION_SHAPES if args.small else ATTENTION_SHAPES
    if args.shapes:
        known = [x.name for x in shapes]
        if unknown := [x for x in args.shapes.split(",") if x not in known]:
            raise SystemExit(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        shapes = [x for x in shapes if x.name in args.shapes.split(",")]
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} interpret={args.interpret} "
          f"dense={dense_impl} iters={iters} warmup={warmup}")

    rows, all_failed = [], []
    for shape in shapes:
        name, b, t, n, h, d, text_first = (shape.name, shape.batch, shape.text_len, shape.n_img, shape.heads,
                                           shape.head_dim, shape.text_first)
        s = shape.seq_len
        config = TritonConfig(16, 16, 4, 1) if args.small else heuristic_config(s, d, dtype)
        # Kept fractions are counted on the default tiles whatever the tuning; the small shapes on their 16×16 tiles
        # (at 128×64 they have no band at all).
        blocks = TINY_BLOCKS if args.small else DEFAULT_BLOCKS
        dense_flops = shape.dense_flops
        mixes = [f"mix{seed}" for seed in range(1, args.mixes + 1)]
        modes = {mode: mode_head_windows(mode, h, n, t, text_first, blocks)
                 for mode in ["full", *(f"arrow:{kk}" for kk in ARROW_KS), "mixed", *mixes]}
        if args.tune:
            q, k, v, cache = attention_inputs(7, (b, s, h, d), dtype)
            config = autotune(q, k, v, jnp.asarray(modes["mixed"]), text_len=t, text_first=text_first, cache=cache,
                              force=True, interpret=args.interpret, log=lambda m: print("  " + m, flush=True),
                              candidates=[TritonConfig(16, 16, 4, 1), TritonConfig(32, 16, 4, 1)] if args.small
                              else None)
        elif not args.small:
            config = tuned_config((b, s, h, d), dtype, t, text_first) or config
        print(f"\n{name}: B={b} S={s} (text {t} {'first' if text_first else 'last'}, image {n}) H={h} D={d} "
              f"{jnp.dtype(dtype).name} {config}")
        for mode in ["mixed"] + mixes:
            kept = head_windows_kept(modes[mode], n, t, text_first, blocks)
            off = "" if abs(kept - MIX_KEPT) <= MIX_TOL + 1e-12 else f" (closest reachable to {MIX_KEPT})"
            print(f"  {mode} windows: {modes[mode].tolist()} kept {kept:.3f}{off}")

        def make_inputs(seed, b=b, s=s, h=h, d=d):
            return attention_inputs(seed, (b, s, h, d), dtype)

        q, k, v, cache = make_inputs(12345)
        kernels = {}  # row-name prefix -> (implementation, config)
        for backend in args.backends.split(","):
            if backend == "triton":
                kernels[""] = ("triton", config)
            elif backend in ("mosaic_gpu", "mosaic"):  # "mosaic": the older spelling
                for spec in args.mosaic_configs.split(","):
                    mcfg = (MosaicGpuConfig(block_q=64, block_kv=64 if args.small else 128, max_concurrent_steps=2)
                            if spec == "heuristic" else mosaic_config(spec))
                    label = f"M{mcfg.block_q}/{mcfg.block_kv}/{mcfg.max_concurrent_steps}" + "".join(
                        f"/{flag}" for flag, (field, value) in MOSAIC_FLAGS.items() if getattr(mcfg, field) == value)
                    kernels[label + " "] = ("mosaic_gpu", mcfg)
            else:
                raise SystemExit(f"--backends: unknown backend {backend!r} (triton, mosaic_gpu; alias mosaic)")
        failed = set()
        for prefix, (impl, cfg) in kernels.items():
            for mode, w in modes.items():  # correctness first
                try:
                    err, heads = check(q, k, v, cache, jnp.asarray(w), text_len=t, text_first=text_first,
                                       interpret=args.interpret, implementation=impl, config=cfg,
                                       max_heads=h if args.small else args.check_heads)
                except Exception as e:  # noqa: BLE001 - report and go on to the other modes and the baselines
                    failed.add(prefix + mode)
                    print(f"  check {prefix + mode:22s} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                    continue
                print(f"  check {prefix + mode:22s} heads {heads}: max |err| {err:.2e} ok", flush=True)

        all_failed += [f"{name} {m}" for m in sorted(failed)]
        dense = jax.jit(lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, implementation=dense_impl))
        t_dense = time_fn(dense, make_inputs, iters, warmup)
        dense_name = "cuDNN" if dense_impl == "cudnn" else f"dense {dense_impl}"
        dev_dense = device_ms(dense, make_inputs, device_calls)
        rows.append((name, f"dense {dense_impl}", t_dense, dense_flops, 1.0, dev_dense))
        sched_lines = []
        for prefix, (impl, cfg) in kernels.items():
            schedules = functools.partial(arrow_schedules, q, text_len=t, text_first=text_first, has_cache=True,
                                          implementation=impl, config=cfg, interpret=args.interpret)
            if impl == "mosaic_gpu":
                cost = {n_calls: 1e3 * schedule_seconds(schedules, modes["mixed"], n_calls) for n_calls in (1, 57)}
                sched_lines.append(f"  {prefix}launch schedules of the mixed plan: one call's {cost[1]:.3f} ms, "
                                   f"57 calls' at once {cost[57]:.3f} ms")
                tails = []
                for mode in ["mixed"] + mixes:
                    loads = cta_loads(modes[mode], q.shape, text_len=t, text_first=text_first, has_cache=True,
                                      config=cfg)
                    tails.append(f"{mode} +{100 * (loads.max() / loads.mean() - 1):.1f}%")
                sched_lines.append(f"  {prefix}busiest CTA over the mean (cost model, {len(loads)} CTAs): "
                                   + ", ".join(tails))
            for mode, w in modes.items():
                if prefix + mode in failed:
                    continue
                hw = jnp.asarray(w)
                table = schedules(hw[None])
                table = None if table is None else jax.block_until_ready(table[0])
                # The cache is donated (each call has fresh inputs): the kernels write their output over it, as
                # the sampler's carried head cache is updated in place, instead of into a copy of it.
                fn = jax.jit(lambda q, k, v, c, hw=hw, impl=impl, cfg=cfg, table=table: arrow_attention(
                    q, k, v, hw, text_len=t, text_first=text_first, cache=c, implementation=impl,
                    interpret=args.interpret, config=cfg, schedule=table), donate_argnums=(3,) if on_gpu else ())
                rows.append((name, prefix + mode, time_fn(fn, make_inputs, iters, warmup), dense_flops,
                             head_windows_kept(w, n, t, text_first, blocks), device_ms(fn, make_inputs, device_calls)))
        if args.mgpu:
            rows.extend(triton_fa_rows(name, make_inputs, s, d, dense_flops, iters, warmup, device_calls))
            rows.extend(mgpu_rows(name, make_inputs, b, s, h, d, dense_flops, iters, warmup, device_calls))
        for _, label, sec, flops, kept, dev in (r for r in rows if r[0] == name):
            eff = flops / sec / 1e12
            ideal = f"{1 / kept:6.2f}" if kept > 0 else "   inf"
            on_gpu_line = "" if dev is None or dev_dense is None else (
                f"  | GPU {dev[0]:7.3f} ms (kernel {dev[1]:7.3f})  speedup {dev_dense[0] / dev[0]:5.2f}x")
            print(f"  {label:22s} {sec * 1e3:9.3f} ms  eff {eff:7.1f} TFLOP/s  kept-work {eff * kept:7.1f} TFLOP/s  "
                  f"speedup {t_dense / sec:5.2f}x  kept {kept:5.3f}  ideal {ideal}x{on_gpu_line}")
        print("\n".join(sched_lines))
        times = {r[1]: (r[2], r[5]) for r in rows if r[0] == name}
        for prefix in kernels:
            if prefix + "mixed" not in times:
                continue
            timed_mixes = [m for m in mixes if prefix + m in times]
            for clock, pick, base in (("wall", lambda x: x[0], t_dense),
                                      ("GPU", lambda x: x[1] and x[1][0], dev_dense and dev_dense[0])):
                if not base or not pick(times[prefix + "mixed"]):
                    continue
                line = f"  {prefix}mixed plan ({clock}): {base / pick(times[prefix + 'mixed']):.2f}× vs {dense_name}"
                if timed_mixes:
                    worst = max(timed_mixes, key=lambda m: pick(times[prefix + m]))
                    line += (f"; worst of {len(timed_mixes)} mixes: {base / pick(times[prefix + worst]):.2f}× vs "
                             f"{dense_name} ({worst})")
                print(line)
            failed_mixes = [m for m in mixes if prefix + m in failed]
            if failed_mixes:
                print(f"  {prefix}mixes that FAILED the check: {', '.join(failed_mixes)}")
    if args.interpret:
        print("\n(interpret mode: timings are CPU interpreter times, not kernel performance)")
    if all_failed:
        raise SystemExit(f"kernel vs reference FAILED: {', '.join(all_failed)}")


if __name__ == "__main__":
    main()
