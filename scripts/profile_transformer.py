"""Where a transformer step's time goes: attention vs the rest, JAX vs PyTorch, same run.

For each (model, resolution): (1) our full jitted step; (2) our step with every attention replaced by a
near-zero-cost stand-in (q + k + v, element-wise: it still needs the q/k projections, norms and RoPE, which
a stand-in returning v alone would let XLA drop), i.e. the non-attention time; (3) one attention call of the layer's shape in
JAX (cuDNN) and (4) in torch (cuDNN SDPA), times the number of attention sites.

    PYTHONPATH=. python3 scripts/profile_transformer.py --models sd3-medium --res 2048
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.bench_transformer import TEXT_TOKENS, _inputs_np, _median  # noqa: E402


def _time(fn, iters):
    import jax

    for _ in range(3):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return 1e3 * _median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd3-medium,flux-dev")
    ap.add_argument("--res", default="2048")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    import functools

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import dfa2_jax
    from dfa2_jax.models.attention import dense_attention
    from dfa2_jax.transformer import flux_rope

    class NoAttention:
        """A runtime whose attention is nearly free (q + k + v): the step's non-attention time. Returning v
        alone would let XLA drop the q/k projections, norms and RoPE (dead code), undercounting the rest."""

        def __call__(self, q, k, v, *, layer, layout):
            return q + k + v

        def run_layer(self, layer, compute):
            return compute()

    no_attention = NoAttention()

    rows = []
    for model in args.models.split(","):
        cfg = dfa2_jax.FluxConfig.dev() if model == "flux-dev" else dfa2_jax.SD3Config.medium()
        tr = dfa2_jax.random_transformer(cfg, dtype="bfloat16")
        sites = len(tr.attention_layer_names())
        for res in [int(r) for r in args.res.split(",")]:
            x = {k: jnp.asarray(v, jnp.bfloat16) if v.ndim > 1 and not k.endswith("ids") else jnp.asarray(v)
                 for k, v in _inputs_np(model, res, 0).items()}
            extra = ()
            if model == "flux-dev":
                extra = (flux_rope(cfg, x["txt_ids"], x["img_ids"]), x["guidance"])

            @functools.partial(jax.jit, static_argnums=(0, 1))
            def step(graphdef, stub, state, *a):
                m = nnx.merge(graphdef, state)
                return m(*a, runtime=no_attention if stub else None)

            a = (x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], x["timestep"]) + extra
            full = _time(lambda tr=tr: step(tr.graphdef, False, tr.state, *a), args.iters)
            rest = _time(lambda tr=tr: step(tr.graphdef, True, tr.state, *a), args.iters)
            n_img = (res // 16) ** 2
            s = n_img + TEXT_TOKENS[model]
            h, d = cfg.num_attention_heads, cfg.attention_head_dim
            q = jax.random.normal(jax.random.key(0), (3, 1, s, h, d), jnp.bfloat16)
            att = jax.jit(lambda q: dense_attention(q[0], q[1], q[2]))
            jax_attn = _time(lambda q=q: att(q), args.iters)
            tq = torch.randn(3, 1, h, s, d, device="cuda", dtype=torch.bfloat16)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                for _ in range(3):
                    torch.nn.functional.scaled_dot_product_attention(tq[0], tq[1], tq[2])
                torch.cuda.synchronize()
                st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ts = []
                for _ in range(args.iters):
                    st.record()
                    torch.nn.functional.scaled_dot_product_attention(tq[0], tq[1], tq[2])
                    en.record()
                    torch.cuda.synchronize()
                    ts.append(st.elapsed_time(en))
            torch_attn = _median(ts)
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


if __name__ == "__main__":
    main()
