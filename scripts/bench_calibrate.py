"""Calibration wall time vs one dense generation of the same prompts (goal: ≤ 3×), same run.

FLUX.1-dev architecture with random bf16 weights, --prompts prompts in one batch (random text embeddings
stand in for the encoders, which both sides would share), --res², --steps steps, candidates
arrow:8,arrow:16,arrow:32,cache, δ = --delta, savings from the kernel's 128×64 tiles.

    PYTHONPATH=. python3 scripts/bench_calibrate.py --res 1024 --prompts 8 --steps 28
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Pipe:
    """The part of a FluxPipeline that calibration uses, with random conditioning."""

    def __init__(self, transformer, res, n_prompts, steps):
        import jax.numpy as jnp
        import numpy as np

        from dfa2_jax.pipeline import Prepared, flux_image_ids
        from dfa2_jax.scheduler import FlowMatchEulerConfig, calculate_shift, set_timesteps
        from dfa2_jax.transformer import flux_rope

        self.transformer = transformer
        cfg = transformer.config
        h = w = res // 8
        n = (h // 2) * (w // 2)
        rng = np.random.default_rng(0)
        bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
        cond = {"prompt_embeds": bf(rng.standard_normal((n_prompts, 512, 4096))),
                "pooled_projections": bf(rng.standard_normal((n_prompts, 768))),
                "rope": flux_rope(cfg, np.zeros((512, 3), np.float32), flux_image_ids(h, w)),
                "guidance": jnp.full((n_prompts,), 3.5, jnp.float32)}
        ts, sig = set_timesteps(FlowMatchEulerConfig.flux_dev(), steps, sigmas=np.linspace(1, 1 / steps, steps),
                                mu=calculate_shift(n))
        self.prepared = Prepared(bf(rng.standard_normal((n_prompts, n, 64))), cond, ts, sig, False, n, 512, (res, res))

    def _check_size(self, h, w):
        pass

    def prepare(self, prompts, **kw):
        return self.prepared


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--delta", type=float, default=0.6)
    ap.add_argument("--smoke", action="store_true", help="a 2+2-layer, 2-head model (CPU check of the script)")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import dfa2_jax
    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.sample import denoise

    cfg = dfa2_jax.FluxConfig.dev()
    if args.smoke:
        cfg = dfa2_jax.FluxConfig.dev(num_layers=2, num_single_layers=2, num_attention_heads=2)
    tr = dfa2_jax.random_transformer(cfg, dtype="bfloat16")
    pipe = _Pipe(tr, args.res, args.prompts, args.steps)
    p = pipe.prepared
    times = []
    for _ in range(2):  # first includes compilation
        t0 = time.perf_counter()
        out = denoise(tr.graphdef, tr.state, jnp.array(p.latents, copy=True), p.cond, p.timesteps, p.sigmas,
                      family="flux")
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    dense_first, dense = times
    t0 = time.perf_counter()
    res = calibrate(pipe, [f"prompt {i}" for i in range(args.prompts)], resolution=args.res, steps=args.steps,
                    delta=args.delta, progress=False)
    calib = time.perf_counter() - t0
    s = res.summary
    print(f"\nFLUX.1-dev {args.res}², {args.prompts} prompts, {args.steps} steps, bf16, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}")
    print(f"dense generation: {dense:.1f} s (first call with compile {dense_first:.1f} s)")
    print(f"calibration: {calib:.1f} s incl. compile; solver {s['solver_time_s']:.1f} s over {s['solves']} solves; "
          f"kept {s['attention_flops_kept']:.3f} exact / {s['attention_tiles_kept']:.3f} tiles; {s['method_counts']}")
    print(f"ratio calibration / dense = {calib / dense:.2f} (goal <= 3)")


if __name__ == "__main__":
    main()
