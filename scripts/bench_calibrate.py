"""Calibration wall time vs one dense generation of the same prompts (goal: ≤ 2×), same run.

FLUX.1-dev architecture with random bf16 weights, --prompts prompts in one batch (random text embeddings stand in
for the encoders, which both sides would share: :func:`dfa2_jax.benchmarking.sampler_inputs`), --res², --steps
steps, candidates arrow:8,arrow:16,arrow:32,cache, δ = --delta, savings from the kernel's 128×64 tiles; the arrow
candidates run as ``--attention-impl`` names (default "auto": the Pallas kernel on a GPU).

Each side runs --runs times in one process (default 2): the first call includes its compile, later ones reuse it.
Two ratios: steady calibration / steady dense generation (the work itself), and first / first (compile included
on both sides: what one calibration costs in a fresh process next to one generation).

    python3 scripts/bench_calibrate.py --res 1024 --prompts 8 --steps 28       # one GPU
    python3 scripts/bench_calibrate.py --smoke                                 # CPU: the tiny model, 128², 3 steps
"""

from __future__ import annotations

import argparse
import time


class RandomConditioningPipeline:
    """The part of a FluxPipeline that calibration uses (``transformer``, ``prepare``, the size check), with
    random conditioning instead of text encoders."""

    def __init__(self, transformer, res, n_prompts, steps, *, text_len, dtype):
        from dfa2_jax.benchmarking import image_tokens, sampler_inputs, schedule
        from dfa2_jax.pipeline import Prepared

        self.transformer = transformer
        n = image_tokens(res)
        latents, cond = sampler_inputs(transformer.config, res=res, batch=n_prompts, text_len=text_len, dtype=dtype)
        ts, sig = schedule("flux", steps, n)
        self.prepared = Prepared(latents=latents, cond=cond, timesteps=ts, sigmas=sig, do_cfg=False, n_img=n,
                                 text_len=text_len, size=(res, res))

    def _check_size(self, h, w):  # the pipelines' size check, which calibrate() calls: any size is prepared here
        pass

    def prepare(self, prompts, *args, **kw):  # the same conditioning whatever is asked
        return self.prepared


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=None, help="default 1024 (--smoke: 128)")
    ap.add_argument("--prompts", type=int, default=None, help="default 8 (--smoke: 2)")
    ap.add_argument("--steps", type=int, default=None, help="default 28 (--smoke: 3)")
    ap.add_argument("--delta", type=float, default=0.6)
    ap.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "triton", "mosaic_gpu", "interpret"),
                    help="how the arrow candidates run (calibrate's attention_impl)")
    ap.add_argument("--runs", type=int, default=2, help="calibrations and dense generations timed (the first of "
                    "each compiles; >= 2 for a steady figure)")
    ap.add_argument("--smoke", action="store_true", help="the tiny benchmark model, float32 (CPU check of the script)")
    args = ap.parse_args()
    if args.runs < 1:
        raise SystemExit(f"--runs {args.runs}: give 1 or more")
    args.res = args.res or (128 if args.smoke else 1024)
    args.prompts = args.prompts or (2 if args.smoke else 8)
    args.steps = args.steps or (3 if args.smoke else 28)
    import jax
    import jax.numpy as jnp

    import dfa2_jax
    from dfa2_jax.benchmarking import model_config, text_tokens
    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.sample import denoise

    cfg, text = model_config("flux", tiny=args.smoke), text_tokens("flux", tiny=args.smoke)
    dtype = "float32" if args.smoke else "bfloat16"
    tr = dfa2_jax.random_transformer(cfg, dtype=dtype)
    pipe = RandomConditioningPipeline(tr, args.res, args.prompts, args.steps, text_len=text, dtype=dtype)
    p = pipe.prepared
    dense_times, calib_times = [], []
    for _ in range(args.runs):  # the first includes compilation
        t0 = time.perf_counter()
        out = denoise(tr.graphdef, tr.state, jnp.array(p.latents, copy=True), p.cond, p.timesteps, p.sigmas,
                      family="flux")
        jax.block_until_ready(out)
        dense_times.append(time.perf_counter() - t0)
    for _ in range(args.runs):
        t0 = time.perf_counter()
        res = calibrate(pipe, [f"prompt {i}" for i in range(args.prompts)], resolution=args.res, steps=args.steps,
                        delta=args.delta, progress=False, attention_impl=args.attention_impl)
        calib_times.append(time.perf_counter() - t0)
    s = res.summary
    steady = len(dense_times) > 1
    dense, calib = (min(t[1:]) if steady else t[0] for t in (dense_times, calib_times))
    print(f"\nFLUX.1-dev{'-tiny' if args.smoke else ''} {args.res}², {args.prompts} prompts, {args.steps} steps, "
          f"{'bf16' if dtype == 'bfloat16' else dtype}, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"attention_impl {args.attention_impl}")
    print(f"dense generation: first call (with compile) {dense_times[0]:.1f} s"
          + (f", steady {dense:.1f} s" if steady else ""))
    print(f"calibration: first call (with compile) {calib_times[0]:.1f} s" + (f", steady {calib:.1f} s" if steady else "")
          + f"; solver {s['solver_time_s']:.1f} s over {s['solves']} solves; kept {s['attention_flops_kept']:.3f} "
          f"exact / {s['attention_tiles_kept']:.3f} tiles; {s['method_counts']}")
    if steady:
        print(f"ratio calibration / dense = {calib / dense:.2f} steady (goal <= 2), "
              f"{calib_times[0] / dense_times[0]:.2f} first calls")
    else:
        print(f"ratio calibration / dense = {calib / dense:.2f} first calls (--runs 2 for the steady ratio)")


if __name__ == "__main__":
    main()
