"""One transformer forward step: our jitted Flax model vs diffusers' PyTorch model of the same shape.

Full-size architectures with random bf16 weights (no checkpoint), batch 1, side by side in one run:
- FLUX.1-dev: packed latents [1, (R/16)², 64], 512 T5 tokens, guidance 3.5;
- SD3-medium: latents [1, 16, R/8, R/8], 333 text tokens (77 CLIP + 256 T5).
Each framework runs in its own subprocess (so peak-memory figures are its own); JAX with cuDNN flash
attention (`jax.nn.dot_product_attention(implementation="cudnn")`), torch with the cuDNN SDPA backend.
Timings: median of --iters calls after warm-up, device-synchronised; fresh random inputs per call set.

    PYTHONPATH=. python3 scripts/bench_transformer.py --out $OUT        # on the GPU machine
    python3 scripts/bench_transformer.py --models flux-dev --res 256 --iters 3   # smoke test (CPU ok, slow)

Prints one JSON line per (framework, model, resolution) and a table last; --out writes results.json there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_TOKENS = {"flux-dev": 512, "sd3-medium": 333}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _inputs_np(model: str, res: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    t = TEXT_TOKENS[model]
    if model == "flux-dev":
        g = res // 16
        ids = np.zeros((g, g, 3), np.float32)
        ids[..., 1] = np.arange(g)[:, None]
        ids[..., 2] = np.arange(g)[None, :]
        return dict(hidden_states=rng.standard_normal((1, g * g, 64), np.float32),
                    encoder_hidden_states=rng.standard_normal((1, t, 4096), np.float32),
                    pooled_projections=rng.standard_normal((1, 768), np.float32),
                    timestep=np.array([0.7], np.float32), guidance=np.array([3.5], np.float32),
                    img_ids=ids.reshape(-1, 3), txt_ids=np.zeros((t, 3), np.float32))
    lat = res // 8
    return dict(hidden_states=rng.standard_normal((1, 16, lat, lat), np.float32),
                encoder_hidden_states=rng.standard_normal((1, t, 4096), np.float32),
                pooled_projections=rng.standard_normal((1, 2048), np.float32),
                timestep=np.array([700.0], np.float32))


def run_jax(model: str, resolutions: list[int], iters: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    import dfa2_jax
    from dfa2_jax.transformer import flux_forward, sd3_forward, flux_rope

    cfg = dfa2_jax.FluxConfig.dev() if model == "flux-dev" else dfa2_jax.SD3Config.medium()
    t0 = time.perf_counter()
    tr = dfa2_jax.random_transformer(cfg, dtype="bfloat16", seed=0)
    jax.block_until_ready(tr.state)
    init_s = time.perf_counter() - t0
    results = []
    for res in resolutions:
        def args_for(seed):
            x = _inputs_np(model, res, seed)
            bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
            if model == "flux-dev":
                rope = flux_rope(cfg, x["txt_ids"], x["img_ids"])
                return (flux_forward, (tr.graphdef, tr.state, bf(x["hidden_states"]), bf(x["encoder_hidden_states"]),
                                        bf(x["pooled_projections"]), jnp.asarray(x["timestep"]), rope,
                                        jnp.asarray(x["guidance"])))
            return (sd3_forward, (tr.graphdef, tr.state, bf(x["hidden_states"]), bf(x["encoder_hidden_states"]),
                                   bf(x["pooled_projections"]), jnp.asarray(x["timestep"])))

        fn, args = args_for(0)
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
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
        finite = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        stats = jax.devices()[0].memory_stats() or {}
        results.append(dict(framework="jax", model=model, res=res, ms=1e3 * _median(times), compile_s=compile_s,
                            init_s=init_s, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                            finite=finite, params_b=tr.num_params() / 1e9,
                            version=f"jax {jax.__version__}"))
        print(json.dumps(results[-1]), flush=True)
    return results


def run_torch(model: str, resolutions: list[int], iters: int) -> list[dict]:
    import diffusers
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        if model == "flux-dev":
            m = diffusers.FluxTransformer2DModel(guidance_embeds=True).eval()  # defaults = FLUX.1 shape
        else:
            m = diffusers.SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                                attention_head_dim=64, num_attention_heads=24,
                                                joint_attention_dim=4096, caption_projection_dim=1536,
                                                pooled_projection_dim=2048, out_channels=16,
                                                pos_embed_max_size=192).eval()
    torch.set_default_dtype(torch.float32)
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    results = []
    for res in resolutions:
        torch.cuda.reset_peak_memory_stats()

        def args_for(seed):
            x = _inputs_np(model, res, seed)
            out = {}
            for k, v in x.items():
                tt = torch.from_numpy(v).to(dev)
                out[k] = tt if k in ("img_ids", "txt_ids", "timestep", "guidance") else tt.to(torch.bfloat16)
            if "timestep" in out:
                out["timestep"] = out["timestep"].to(torch.bfloat16)
            if "guidance" in out:
                out["guidance"] = out["guidance"].to(torch.bfloat16)
            return out

        arg_sets = [args_for(s) for s in range(3)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            t0 = time.perf_counter()
            m(**arg_sets[0], return_dict=False)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            for a in arg_sets:
                m(**a, return_dict=False)
            times = []
            for i in range(iters):
                a = arg_sets[i % len(arg_sets)]
                start.record()
                out = m(**a, return_dict=False)[0]
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        results.append(dict(framework="torch", model=model, res=res, ms=1e3 * _median(times), compile_s=first_s,
                            init_s=init_s, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                            finite=bool(torch.isfinite(out.float()).all()),
                            params_b=sum(p.numel() for p in m.parameters()) / 1e9,
                            version=f"torch {torch.__version__} diffusers {diffusers.__version__}"))
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="flux-dev,sd3-medium")
    ap.add_argument("--res", default="1024,2048")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--frameworks", default="jax,torch")
    ap.add_argument("--out", default=None, help="folder for results.json and logs")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    resolutions = [int(r) for r in args.res.split(",")]
    if args.worker:
        fw, model = args.worker.split(":")
        res = (run_jax if fw == "jax" else run_torch)(model, resolutions, args.iters)
        print("RESULT " + json.dumps(res), flush=True)
        return
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for model in args.models.split(","):
        for fw in args.frameworks.split(","):
            cmd = [sys.executable, __file__, "--worker", f"{fw}:{model}", "--res", args.res, "--iters", str(args.iters)]
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
    print(f"\n{'model':<11} {'res':>5} {'jax ms':>9} {'torch ms':>9} {'ratio':>6} {'jax compile s':>13} "
          f"{'jax GiB':>8} {'torch GiB':>9}")
    for model in args.models.split(","):
        for res in resolutions:
            j = next((r for r in rows if r["framework"] == "jax" and r["model"] == model and r["res"] == res), None)
            t = next((r for r in rows if r["framework"] == "torch" and r["model"] == model and r["res"] == res), None)
            fmt = lambda r, k, f: (f"{r[k]:{f}}" if r else "-")  # noqa: E731
            ratio = f"{j['ms'] / t['ms']:.3f}" if j and t else "-"
            print(f"{model:<11} {res:>5} {fmt(j, 'ms', '9.1f'):>9} {fmt(t, 'ms', '9.1f'):>9} {ratio:>6} "
                  f"{fmt(j, 'compile_s', '13.1f'):>13} {fmt(j, 'peak_gib', '8.1f'):>8} {fmt(t, 'peak_gib', '9.1f'):>9}")
    versions = sorted({r["version"] for r in rows})
    print("versions:", "; ".join(versions))


if __name__ == "__main__":
    main()
