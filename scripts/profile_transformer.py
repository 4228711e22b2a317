"""Where a transformer step's time goes: attention vs the rest, JAX vs PyTorch, same run.

For each (model, resolution): (1) our full jitted step; (2) our step with every attention replaced by a
near-zero-cost stand-in (:class:`dfa2_jax.benchmarking.NoAttention`: q + k + v, element-wise, which still needs
the q/k projections, norms and RoPE that a stand-in returning v alone would let XLA drop), i.e. the non-attention
time; (3) one attention call of the layer's shape in JAX (cuDNN) and (4) in torch (cuDNN SDPA), times the number
of attention sites.

    python3 scripts/profile_transformer.py --models sd3-medium,flux-dev --res 1024,2048 --iters 10   # one GPU
    python3 scripts/profile_transformer.py --smoke                                                    # CPU
"""

from __future__ import annotations

import argparse
import time

MODELS = {"flux-dev": "flux", "sd3-medium": "sd3"}


def _time(fn, iters):
    """Median ms of ``iters`` calls of ``fn`` after 3 warm-up calls."""
    from dfa2_jax.benchmarking import median, time_calls

    return 1e3 * median(time_calls(lambda: fn(), lambda i: (), iters=iters, warmup=3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd3-medium,flux-dev")
    ap.add_argument("--res", default=None, help="comma list (default 2048; --smoke: 128)")
    ap.add_argument("--iters", type=int, default=None, help="default 10 (--smoke: 2)")
    ap.add_argument("--smoke", action="store_true", help="the tiny benchmark models, float32 (CPU check)")
    args = ap.parse_args()
    args.res = args.res or ("128" if args.smoke else "2048")
    args.iters = args.iters or (2 if args.smoke else 10)
    import functools

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import dfa2_jax
    from dfa2_jax.benchmarking import NoAttention, image_tokens, median, model_config, step_inputs, text_tokens
    from dfa2_jax.models.attention import dense_attention
    from dfa2_jax.transformer import flux_rope

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype, tdtype = (jnp.float32, torch.float32) if args.smoke else (jnp.bfloat16, torch.bfloat16)
    no_attention = NoAttention()

    def torch_attention_ms(tq):
        def sdpa():
            torch.nn.functional.scaled_dot_product_attention(tq[0], tq[1], tq[2])

        if not cuda:  # host timing
            for _ in range(3):
                sdpa()
            ts = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                sdpa()
                ts.append(1e3 * (time.perf_counter() - t0))
            return median(ts)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for _ in range(3):
                sdpa()
            torch.cuda.synchronize()
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(args.iters):
                st.record()
                sdpa()
                en.record()
                torch.cuda.synchronize()
                ts.append(st.elapsed_time(en))
        return median(ts)

    rows = []
    for model in args.models.split(","):
        family = MODELS[model]
        cfg = model_config(family, tiny=args.smoke)
        text = text_tokens(family, tiny=args.smoke)
        tr = dfa2_jax.random_transformer(cfg, dtype=jnp.dtype(dtype).name)
        sites = len(tr.attention_layer_names())
        for res in [int(r) for r in args.res.split(",")]:
            x = {k: jnp.asarray(v, dtype) if v.ndim > 1 and not k.endswith("ids") else jnp.asarray(v)
                 for k, v in step_inputs(cfg, res=res, text_len=text).items()}
            extra = ()
            if family == "flux":
                extra = (flux_rope(cfg, x["txt_ids"], x["img_ids"]), x["guidance"])

            @functools.partial(jax.jit, static_argnums=(0, 1))
            def step(graphdef, stub, state, *a):
                m = nnx.merge(graphdef, state)
                return m(*a, runtime=no_attention if stub else None)

            a = (x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], x["timestep"]) + extra
            full = _time(lambda tr=tr: step(tr.graphdef, False, tr.state, *a), args.iters)
            rest = _time(lambda tr=tr: step(tr.graphdef, True, tr.state, *a), args.iters)
            s = image_tokens(res) + text
            h, d = cfg.num_attention_heads, cfg.attention_head_dim
            q = jax.random.normal(jax.random.key(0), (3, 1, s, h, d), dtype)
            att = jax.jit(lambda q: dense_attention(q[0], q[1], q[2]))
            jax_attn = _time(lambda q=q: att(q), args.iters)
            tq = torch.randn(3, 1, h, s, d, device=dev, dtype=tdtype)
            torch_attn = torch_attention_ms(tq)
            tflops = lambda ms: 4 * s * s * d * h / (ms * 1e-3) / 1e12  # noqa: E731
            rows.append((model, res, full, rest, full - rest, sites * jax_attn, sites * torch_attn,
                         tflops(jax_attn), tflops(torch_attn)))
            del q, tq
        del tr
    print(f"\n{'model':<11} {'res':>5} {'step ms':>8} {'no-attn ms':>10} {'attn ms':>8} {'jax attn×L':>10} "
          f"{'torch attn×L':>12} {'jax TF/s':>8} {'torch TF/s':>10}")
    for r in rows:
        print(f"{r[0]:<11} {r[1]:>5} {r[2]:>8.1f} {r[3]:>10.1f} {r[4]:>8.1f} {r[5]:>10.1f} {r[6]:>12.1f} "
              f"{r[7]:>8.0f} {r[8]:>10.0f}")
    if args.smoke:
        print("smoke: tiny models, float32, host timings; meaningless as figures")


if __name__ == "__main__":
    main()
