"""One transformer forward step: our jitted Flax model vs diffusers' PyTorch model of the same shape, eager and
under ``torch.compile``.

Full-size architectures with random bf16 weights (no checkpoint), batch 1, side by side in one run:
- FLUX.1-dev: packed latents [1, (R/16)², 64], 512 T5 tokens, guidance 3.5;
- SD3-medium: latents [1, 16, R/8, R/8], 333 text tokens (77 CLIP + 256 T5).
Inputs: :func:`dfa2_jax.benchmarking.step_inputs` (one numpy seed per input set, identical for every framework).
Each framework runs in its own subprocess (so peak-memory figures are its own): JAX with cuDNN flash attention
(``jax.nn.dot_product_attention(implementation="cudnn")``); diffusers' ``FluxTransformer2DModel`` /
``SD3Transformer2DModel`` built from our config's diffusers dict, eager ("torch") and under ``torch.compile``
("torch-compile", ``--torch-compile-mode``, default "default"), both with the cuDNN SDPA backend.
Timings, both frameworks alike, rotating over 3 random input sets after warm-up: ``ms`` the median host
wall-clock of one call and its device synchronisation (--iters calls); ``queued_ms`` --iters calls issued back to
back with one synchronisation at the end, per call (the GPU-bound cost, host overhead hidden as in a sampler's
loop). Compile time: JAX ``lower().compile()``; torch.compile the first call minus the steady call (eager: the
first call's overhead).

    python3 scripts/bench_transformer.py --out runs/transformer --iters 20      # one GPU
    python3 scripts/bench_transformer.py --smoke                                # CPU: tiny models, 128², 2 iters

Prints one JSON line per (framework, model, resolution) and a table last; --out writes results.json there.
``--profile`` (needs --out) also records one more call of each under its framework's profiler (jax.profiler /
torch.profiler) and writes the GPU kernels' times per kernel name (``kernels_<framework>_<model>_<res>.json``,
plus our compiled HLO as ``hlo_<model>_<res>.txt``) and a table of time per kind (matmul, attention, other) with
the largest non-matmul kernels, to see which fusions one side gets that the other does not; ``span`` is the GPU
window from the first kernel's start to the last one's end (span − sum: the GPU idle between kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = {"flux-dev": "flux", "sd3-medium": "sd3"}
FRAMEWORKS = ("jax", "torch", "torch-compile")
KINDS = {"attention": ("cudnn", "fmha", "flash", "sdpa", "attention"),
         "matmul": ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "triton_tem")}


def kernel_kind(name: str) -> str:
    """matmul / attention / copy / other, from a GPU kernel's name (cuBLAS, cuDNN, XLA and Inductor names)."""
    low = name.lower()
    for kind, marks in KINDS.items():
        if any(m in low for m in marks):
            return kind
    return "copy" if ("memcpy" in low or "memset" in low) else "other"


def summarize_kernels(kernels: list[dict], span_ms: float | None = None) -> dict:
    """kernels: [{name, count, ms}] of one call -> per-kind ms, the 12 largest non-matmul families and the call's
    GPU span (first kernel start to last kernel end)."""
    from dfa2_jax.benchmarking import kernel_family

    kinds: dict[str, float] = {}
    fams: dict[str, list] = {}
    for k in kernels:
        kind = kernel_kind(k["name"])
        kinds[kind] = kinds.get(kind, 0.0) + k["ms"]
        if kind != "matmul":
            f = fams.setdefault(kernel_family(k["name"])[:90], [0.0, 0])
            f[0] += k["ms"]
            f[1] += k["count"]
    top = sorted(fams.items(), key=lambda kv: -kv[1][0])[:12]
    return dict(kinds=kinds, total_ms=sum(kinds.values()), n_kernels=sum(k["count"] for k in kernels), span_ms=span_ms,
                top_non_matmul=[dict(family=n, ms=v[0], count=v[1]) for n, v in top])


def torch_kernel_times(call) -> tuple[list[dict], float | None]:
    """One ``call()`` under torch.profiler (CUDA activity only): [{name, count, ms}] of its GPU kernels, and their
    span in ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dfa2_jax.benchmarking import kernel_table

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return kernel_table((ev.name, ev.time_range.start / 1e3, ev.time_range.end / 1e3) for ev in prof.events()
                        if "cuda" in str(getattr(ev, "device_type", "")).lower())


def write_profile(out: str, framework: str, model: str, res: int, kernels: list[dict],
                  span_ms: float | None) -> dict:
    summary = summarize_kernels(kernels, span_ms)
    with open(os.path.join(out, f"kernels_{framework}_{model}_{res}.json"), "w") as f:
        json.dump(dict(framework=framework, model=model, res=res, summary=summary, kernels=kernels), f, indent=1)
    return summary


def run_jax(model: str, resolutions: list[int], iters: int, smoke: bool, profile_dir: str | None = None,
            xla_options: dict | None = None) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import dfa2_jax
    from dfa2_jax.benchmarking import jax_kernel_times, median, model_config, step_inputs, text_tokens
    from dfa2_jax.transformer import flux_forward, flux_rope, sd3_forward

    family = MODELS[model]
    cfg = model_config(family, tiny=smoke)
    text = text_tokens(family, tiny=smoke)
    dtype = jnp.float32 if smoke else jnp.bfloat16
    t0 = time.perf_counter()
    tr = dfa2_jax.random_transformer(cfg, dtype=jnp.dtype(dtype).name, seed=0)
    jax.block_until_ready(tr.state)
    init_s = time.perf_counter() - t0
    results = []
    for res in resolutions:
        def args_for(seed):
            x = step_inputs(cfg, res=res, text_len=text, seed=seed)
            cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
            if family == "flux":
                rope = flux_rope(cfg, x["txt_ids"], x["img_ids"])
                return (flux_forward, (tr.graphdef, tr.state, cast(x["hidden_states"]),
                                       cast(x["encoder_hidden_states"]), cast(x["pooled_projections"]),
                                       jnp.asarray(x["timestep"]), rope, jnp.asarray(x["guidance"])))
            return (sd3_forward, (tr.graphdef, tr.state, cast(x["hidden_states"]), cast(x["encoder_hidden_states"]),
                                  cast(x["pooled_projections"]), jnp.asarray(x["timestep"])))

        fn, args = args_for(0)
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile(compiler_options=xla_options or None)
        compile_s = time.perf_counter() - t0
        arg_sets = [args_for(s)[1] for s in range(3)]
        for a in arg_sets:  # warm-up
            jax.block_until_ready(compiled(*a[1:]))
        times = []
        for i in range(iters):
            a = arg_sets[i % len(arg_sets)]
            t0 = time.perf_counter()
            out = compiled(*a[1:])
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(iters):
            out = compiled(*arg_sets[i % len(arg_sets)][1:])
        jax.block_until_ready(out)
        queued_s = (time.perf_counter() - t0) / iters
        finite = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        stats = jax.devices()[0].memory_stats() or {}
        profile = None
        if profile_dir:
            import tempfile

            with open(os.path.join(profile_dir, f"hlo_{model}_{res}.txt"), "w") as f:
                f.write(compiled.as_text())
            with tempfile.TemporaryDirectory() as tmp:
                kernels, span = jax_kernel_times(compiled, [arg_sets[0][1:]], tmp)
            profile = write_profile(profile_dir, "jax", model, res, kernels, span)
        results.append(dict(framework="jax", model=model, res=res, ms=1e3 * median(times), queued_ms=1e3 * queued_s,
                            compile_s=compile_s,
                            init_s=init_s, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                            finite=finite, params_b=tr.num_params() / 1e9, profile=profile,
                            xla_options=xla_options or {},
                            version=f"jax {jax.__version__}"))
        print(json.dumps(results[-1]), flush=True)
    return results


def run_torch(model: str, resolutions: list[int], iters: int, smoke: bool, compile_mode: str | None,
              compile_backend: str = "inductor", profile_dir: str | None = None) -> list[dict]:
    """diffusers' model eager (``compile_mode`` None) or under ``torch.compile(mode=compile_mode)`` with
    ``compile_backend`` (a backend other than inductor takes no mode)."""
    import contextlib

    import diffusers
    import torch

    from dfa2_jax.benchmarking import median, model_config, step_inputs, text_tokens

    family = MODELS[model]
    cfg = model_config(family, tiny=smoke)
    text = text_tokens(family, tiny=smoke)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        torch.set_num_threads(1)  # tiny matmuls on a shared CPU
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    kw = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.SD3Transformer2DModel
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    with dev:
        m = cls(**kw).eval()
    torch.set_default_dtype(torch.float32)
    sync()
    init_s = time.perf_counter() - t0
    fw = "torch" if compile_mode is None else "torch-compile"
    if compile_mode is not None:
        m = (torch.compile(m, mode=compile_mode) if compile_backend == "inductor" else
             torch.compile(m, backend=compile_backend))
    results = []
    for res in resolutions:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def args_for(seed):
            out = {}
            for k, v in step_inputs(cfg, res=res, text_len=text, seed=seed).items():
                tt = torch.from_numpy(v).to(dev)
                out[k] = tt if k in ("img_ids", "txt_ids") else tt.to(dtype)
            return out

        def call(a):
            t0 = time.perf_counter()
            out = m(**a, return_dict=False)[0]
            sync()
            return out, time.perf_counter() - t0

        arg_sets = [args_for(s) for s in range(3)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
            t0 = time.perf_counter()
            m(**arg_sets[0], return_dict=False)  # torch.compile compiles here
            sync()
            first_s = time.perf_counter() - t0
            for a in arg_sets:
                m(**a, return_dict=False)
            times = []
            for i in range(iters):
                out, dt = call(arg_sets[i % len(arg_sets)])
                times.append(dt)
            t0 = time.perf_counter()
            for i in range(iters):
                out = m(**arg_sets[i % len(arg_sets)], return_dict=False)[0]
            sync()
            queued_s = (time.perf_counter() - t0) / iters
            profile = None
            if profile_dir and cuda:
                kernels, span = torch_kernel_times(lambda: m(**arg_sets[0], return_dict=False))
                profile = write_profile(profile_dir, fw, model, res, kernels, span)
        steady = median(times)
        results.append(dict(framework=fw, model=model, res=res, ms=1e3 * steady, queued_ms=1e3 * queued_s,
                            # torch.compile: the compile (first call − steady); eager: the first call's overhead
                            compile_s=first_s - steady, first_call_s=first_s, compile_mode=compile_mode,
                            init_s=init_s, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                            finite=bool(torch.isfinite(out.float()).all()),
                            params_b=sum(p.numel() for p in m.parameters()) / 1e9, profile=profile,
                            version=f"torch {torch.__version__} diffusers {diffusers.__version__}"))
        print(json.dumps(results[-1]), flush=True)
    return results


def print_profiles(rows: list[dict]) -> None:
    """Per (model, res): GPU ms per kernel kind for each profiled framework, then each one's largest
    non-matmul kernel families."""
    profiled = [r for r in rows if r.get("profile")]
    for key in sorted({(r["model"], r["res"]) for r in profiled}):
        group = [r for r in profiled if (r["model"], r["res"]) == key]
        print(f"\nGPU kernel ms of one call, {key[0]} {key[1]}²: " + "; ".join(
            f"{r['framework']}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["profile"]["kinds"].items()))
            + f", sum {r['profile']['total_ms']:.2f} ({r['profile']['n_kernels']} kernels)"
            + (f" in a span of {r['profile']['span_ms']:.2f}" if r["profile"].get("span_ms") else "") for r in group))
        for r in group:
            print(f"  {r['framework']} largest non-matmul: " + "; ".join(
                f"{t['family']} {t['ms']:.2f} ms ×{t['count']}" for t in r["profile"]["top_non_matmul"][:8]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="flux-dev,sd3-medium")
    ap.add_argument("--res", default=None, help="comma list of resolutions (default 1024,2048; --smoke: 128)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default 20; --smoke: 2)")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                    help="comma list of jax (ours), torch (diffusers eager), torch-compile (diffusers + torch.compile)")
    ap.add_argument("--torch-compile-mode", default="default",
                    help="torch.compile's mode (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--torch-compile-backend", default="inductor",
                    help="torch.compile's backend (default inductor; 'eager' checks the plumbing in seconds)")
    ap.add_argument("--smoke", action="store_true", help="tiny models (2 blocks, 4 heads × 16), float32, CPU ok")
    ap.add_argument("--out", default=None, help="folder for results.json and logs")
    ap.add_argument("--xla-options", default="",
                    help="XLA compile options for our step, comma-separated name=value (e.g. "
                         "xla_gpu_enable_dynamic_slice_fusion=true): passed to jax's compile()")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call per framework: GPU kernel times by name and kind (needs --out)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.res = args.res or ("128" if args.smoke else "1024,2048")
    args.iters = args.iters or (2 if args.smoke else 20)
    if args.profile and not args.out:
        raise SystemExit("--profile: give --out, the folder its kernel tables go to")
    xla_options = {}
    for item in filter(None, args.xla_options.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("xla_"):
            raise SystemExit(f"--xla-options: {item!r} is not name=value with an xla_ option name")
        low = value.lower()
        xla_options[name] = (low == "true" if low in ("true", "false") else
                             int(value) if value.lstrip("-").isdigit() else value)
    resolutions = [int(r) for r in args.res.split(",")]
    models = args.models.split(",")
    frameworks = args.frameworks.split(",")
    for name, given, known in (("--models", models, MODELS), ("--frameworks", frameworks, FRAMEWORKS)):
        if unknown := [x for x in given if x not in known]:
            raise SystemExit(f"{name}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if args.worker:
        fw, model = args.worker.split(":")
        prof = args.out if args.profile else None
        if fw == "jax":
            res = run_jax(model, resolutions, args.iters, args.smoke, prof, xla_options)
        else:
            res = run_torch(model, resolutions, args.iters, args.smoke,
                            args.torch_compile_mode if fw == "torch-compile" else None, args.torch_compile_backend,
                            prof)
        print("RESULT " + json.dumps(res), flush=True)
        return
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    rows = []
    for model in models:
        for fw in frameworks:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{fw}:{model}", "--res", args.res,
                   "--iters", str(args.iters), "--torch-compile-mode", args.torch_compile_mode,
                   "--torch-compile-backend", args.torch_compile_backend, "--xla-options", args.xla_options] + \
                (["--smoke"] if args.smoke else []) + (["--profile", "--out", args.out] if args.profile else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if args.out:
                with open(os.path.join(args.out, f"log_{fw}_{model}.txt"), "w") as f:
                    f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not found:
                print(f"{fw}:{model} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                continue
            rows += json.loads(found[-1][len("RESULT "):])
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=2)
    # ratio: ours / eager; jax/tc: ours / torch.compile (below 1: ours is faster); q: the queued timings
    print(f"\n{'model':<11} {'res':>5} {'jax ms':>9} {'torch ms':>9} {'ratio':>6} {'jax compile s':>13} "
          f"{'jax GiB':>8} {'torch GiB':>9} {'tc ms':>9} {'jax/tc':>6} {'tc compile s':>12} {'jax q ms':>9} "
          f"{'tc q ms':>9} {'q jax/tc':>8}")
    for model in models:
        for res in resolutions:
            def find(fw, model=model, res=res):
                return next((r for r in rows if r["framework"] == fw and r["model"] == model and r["res"] == res),
                            None)

            j, t, c = find("jax"), find("torch"), find("torch-compile")
            fmt = lambda r, k, f: (f"{r[k]:{f}}" if r else "-")  # noqa: E731
            ratio = f"{j['ms'] / t['ms']:.3f}" if j and t else "-"
            ratio_c = f"{j['ms'] / c['ms']:.3f}" if j and c else "-"
            ratio_q = f"{j['queued_ms'] / c['queued_ms']:.3f}" if j and c else "-"
            print(f"{model:<11} {res:>5} {fmt(j, 'ms', '9.1f'):>9} {fmt(t, 'ms', '9.1f'):>9} {ratio:>6} "
                  f"{fmt(j, 'compile_s', '13.1f'):>13} {fmt(j, 'peak_gib', '8.1f'):>8} {fmt(t, 'peak_gib', '9.1f'):>9} "
                  f"{fmt(c, 'ms', '9.1f'):>9} {ratio_c:>6} {fmt(c, 'compile_s', '12.1f'):>12} "
                  f"{fmt(j, 'queued_ms', '9.1f'):>9} {fmt(c, 'queued_ms', '9.1f'):>9} {ratio_q:>8}")
    if args.profile:
        print_profiles(rows)
    versions = sorted({r["version"] for r in rows})
    print("versions:", "; ".join(versions) + (f"; torch.compile mode {args.torch_compile_mode}"
                                               if "torch-compile" in frameworks else ""))
    if args.smoke:
        print("smoke: tiny models, float32; timings meaningless")


if __name__ == "__main__":
    main()
