"""``dfa2 demo``: the whole loop (calibrate -> plan -> dense and compressed images -> comparison) on the CPU in
well under two minutes, with no checkpoint to fetch.

Default (``model="testbed"``): the SD3-style testbed pipeline shipped in ``dfa2_jax/assets/testbed_sd3``
(:func:`dfa2_jax.testbed.load_testbed`; 6 layers x 4 heads, 64x64 images, trained on the procedural world of
:mod:`dfa2_jax.testbed.world`), so the pictures are real samples and the testbed classifier scores how well they
follow their captions (prompt accuracy). A few held-out world captions calibrate a plan; other held-out
captions are generated dense and compressed from the same noise and compared (PSNR / SSIM, prompt accuracy,
attention FLOPs kept).

``model="tiny-random"``: the older demo on tiny SD3-style and FLUX-style pipelines built in code (random weights
from a fixed seed, tokenizers made offline; :func:`dfa2_jax.tiny.tiny_pipelines`). Its pictures are noise-like textures: it
shows the machinery of both families, not quality.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from dfa2_jax.cli.common import add_attention_impl_arg
from dfa2_jax.tiny import tiny_pipelines

DEMO_PROMPTS = ("a small red circle at the top left and a blue square in the centre",
                "a green triangle on a grey background")


def run_tiny_demo(out_dir: str = "demo_out", *, steps: int = 8, size: int = 64, seed: int = 0, delta: float = 0.3,
                  attention_impl: str = "auto") -> list[str]:
    """The main job on the embedded tiny random pipelines: calibrate a plan (progressive RSE + CP-SAT), then dense and
    compressed images from the same noise, compared (PSNR / SSIM, attention FLOPs kept, times) with a grid PNG
    and a JSON report per family. Returns the files written."""
    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.evaluate import evaluate

    os.makedirs(out_dir, exist_ok=True)
    written = []
    candidates = {"sd3": "arrow:2,arrow:4,cache,cfg_share", "flux": "arrow:2,arrow:4,cache"}
    with tempfile.TemporaryDirectory() as work:
        pipes = tiny_pipelines(work, seed)
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            res = calibrate(pipe, list(DEMO_PROMPTS), resolution=size, steps=steps, delta=delta,
                            candidates=candidates[name], seed=seed, savings="exact", progress=False,
                            max_sequence_length=32, attention_impl=attention_impl)
            plan_path = os.path.join(out_dir, f"plan_{name}.json")
            res.plan.save(plan_path)
            s = res.summary
            print(f"{name}: calibrated in {time.perf_counter() - t0:.1f} s: attention FLOPs kept "
                  f"{s['attention_flops_kept']:.3f}, methods {s['method_counts']}, solver {s['solver_time_s']:.2f} s")
            report = evaluate(pipe, res.plan, list(DEMO_PROMPTS), seed=seed, height=size, width=size,
                              out_dir=os.path.join(out_dir, name), max_sequence_length=32, repeat=1,
                              attention_impl=attention_impl)
            m = report["mean"]
            psnr = m["psnr"] if isinstance(m["psnr"], str) else f"{m['psnr']:.1f}"
            print(f"{name}: compressed vs dense over {len(DEMO_PROMPTS)} prompts: PSNR {psnr} dB, "
                  f"SSIM {m['ssim']:.3f}; report {report['report_path']}")
            written += [plan_path, report["report_path"], os.path.join(out_dir, name, "grid.png")]
    for p in written:
        print(p)
    return written


# ================================================================================================ testbed demo
MODELS = ("testbed", "testbed2", "tiny-random")
# 64 image tokens (8x8 patches of the 16x16 latent): arrow:k keeps a band of half-width 64 // (2k) = 16, 8, 4 image
# tokens, i.e. ±2 rows, ±1 row, ±half a row of the patch grid. The default arrow:8,16,32 would give 4, 2, 1.
TESTBED_CANDIDATES = "arrow:2,arrow:4,arrow:8,cache"
TESTBED_DELTA = 0.02  # about half of the attention FLOPs removed at 28 steps (docs/TESTBED.md, δ sweep)
# The 1024-token testbed (world v2): bands of ±8, ±4, ±2 and ±1 rows of the 32x32 token grid, and caching.
TESTBED2_CANDIDATES = "arrow:2,arrow:4,arrow:8,arrow:16,cache"
TESTBED2_DELTA = 0.2


def world_grid(renders, dense, compressed, labels: list[str]):
    """A PIL image, one row per caption: world render | dense | compressed, each row under a label band."""
    from PIL import Image, ImageDraw, ImageFont

    from dfa2_jax.evaluate import LABEL_H

    w, h = dense[0].size
    grid = Image.new("RGB", (3 * w, len(dense) * (h + LABEL_H)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (r, d, c) in enumerate(zip(renders, dense, compressed)):
        y = i * (h + LABEL_H)
        draw.text((2, y + 1), labels[i], fill=(0, 0, 0), font=font)
        for j, im in enumerate((Image.fromarray(r).resize((w, h), Image.NEAREST), d, c)):
            grid.paste(im.convert("RGB"), (j * w, y + LABEL_H))
    return grid


def run_testbed_demo(out_dir: str = "demo_out", *, steps: int | None = None, seed: int = 0,
                     delta: float = TESTBED_DELTA, candidates: str = TESTBED_CANDIDATES,
                     calibration_prompts: int = 4, eval_prompts: int = 8, repeat: int = 2,
                     log=print, attention_impl: str = "auto", world_name: str = "v1") -> list[str]:
    """The main job on the shipped SD3-style testbed: calibrate a plan on ``calibration_prompts`` held-out world
    captions (``world.make_batch(0, n, "heldout")``), then generate ``eval_prompts`` other held-out captions
    (``world.make_batch(1, n, "heldout")``, calibration captions dropped) dense and compressed from the same noise
    and compare them (:func:`dfa2_jax.evaluate.evaluate`: PSNR / SSIM, prompt accuracy, attention FLOPs kept,
    times). ``steps``: default the testbed's 28. Writes ``plan.json``, ``plan.png`` (heat-map), ``report.json``,
    ``grid.png`` (dense | compressed), ``grid_world.png`` (world render | dense | compressed), the images and the
    two caption lists. ``world_name``: "v1" (the 64-token testbed) or "v2" (the 1024-token one, ``testbed2_sd3``;
    its savings are counted in kernel tiles, which its arrow bands skip). Returns the main files written."""
    import dataclasses

    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.evaluate import evaluate, format_table, write_json_atomic
    from dfa2_jax.plan.report import render_heatmap
    from dfa2_jax.testbed import load_testbed, world

    if calibration_prompts < 1 or eval_prompts < 1:
        raise ValueError(f"calibration_prompts={calibration_prompts} and eval_prompts={eval_prompts} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    pipe, settings = load_testbed("sd3", world=world_name)
    if steps is not None:
        settings = dataclasses.replace(settings, num_inference_steps=int(steps))
    log(f"testbed: loaded {pipe.transformer.config.diffusers_class} ({pipe.transformer.num_params() / 1e6:.2f} M "
        f"params) in {time.perf_counter() - t0:.1f} s; {settings.height}x{settings.width}, "
        f"{settings.num_inference_steps} steps, CFG {settings.guidance_scale:g}, T5 length "
        f"{settings.max_sequence_length}")
    _, cal, _ = world.make_batch(0, calibration_prompts, "heldout", world=world_name)
    _, ev, scenes = world.make_batch(1, eval_prompts + calibration_prompts, "heldout", world=world_name)
    keep = [i for i, c in enumerate(ev) if c not in set(cal)][:eval_prompts]
    ev, renders = [ev[i] for i in keep], world.render_batch([scenes[i] for i in keep], world=world_name)
    for name, caps in (("prompts_calibration.txt", cal), ("prompts_eval.txt", ev)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write("\n".join(caps) + "\n")

    t0 = time.perf_counter()
    # v1: savings="exact": at 64 image + 109 text tokens the kernel's 128x64 tiles would cover every arrow band
    # whole, so tile savings would credit arrow with nothing (only cache); the exact mask counts the pairs skipped.
    # v2 (1024 image tokens): the kernel's tiles, what it skips.
    res = calibrate(pipe, cal, resolution=(settings.height, settings.width), steps=settings.num_inference_steps,
                    delta=delta, candidates=candidates, seed=seed, guidance_scale=settings.guidance_scale,
                    savings="exact" if world_name == "v1" else "tiles", progress=False, max_sequence_length=settings.max_sequence_length,
                    attention_impl=attention_impl)
    t_cal = time.perf_counter() - t0
    plan_path = os.path.join(out_dir, "plan.json")
    res.plan.save(plan_path)
    s = res.summary
    log(f"calibrated on {len(cal)} held-out captions in {t_cal:.1f} s (δ={delta:g}, candidates {candidates}): "
        f"attention FLOPs kept {s['attention_flops_kept']:.3f}, methods {s['method_counts']}")
    n_img = res.plan.calibration["image_tokens"]
    heat_path = os.path.join(out_dir, "plan.png")
    render_heatmap(res.plan, n_img, heat_path, title=f"testbed plan, delta={delta:g}: attention FLOPs kept")

    report = evaluate(pipe, res.plan, ev, seed=seed, height=settings.height, width=settings.width,
                      guidance_scale=settings.guidance_scale, max_sequence_length=settings.max_sequence_length,
                      out_dir=out_dir, repeat=repeat,
                      model=f"dfa2_jax/assets/{'testbed' if world_name == 'v1' else 'testbed2'}_sd3 (shipped testbed)",
                      attention_impl=attention_impl)
    pa = report["prompt_accuracy"]
    labels = [f"{i} acc {pa['dense'][i]:.2f} / {pa['compressed'][i]:.2f}" for i in range(len(ev))]
    world_path = os.path.join(out_dir, "grid_world.png")
    world_grid(renders, report["images"]["dense"], report["images"]["compressed"], labels).save(world_path)
    saved = {k: v for k, v in report.items() if k not in ("images", "report_path")}
    saved["plan"] = {**saved["plan"], "path": "plan.json"}
    saved["demo"] = {"calibration_captions": cal, "calibration": {**s, "delta": delta, "candidates": candidates},
                     "generation": dataclasses.asdict(settings), "grid_world": "grid_world.png",
                     "plan": "plan.json", "plan_heatmap": "plan.png"}
    write_json_atomic(report["report_path"], saved)
    log(format_table(saved))
    written = [plan_path, heat_path, report["report_path"], os.path.join(out_dir, "grid.png"), world_path]
    for p in written:
        log(p)
    return written


def run_demo(out_dir: str = "demo_out", *, model: str = "testbed", steps: int | None = None, size: int | None = None,
             seed: int = 0, delta: float | None = None, attention_impl: str = "auto", **testbed_kw) -> list[str]:
    """``dfa2 demo``: :func:`run_testbed_demo` (``model="testbed"``, default; ``"testbed2"``: the 1024-token
    SD3-style testbed, 2 calibration and 2 evaluation captions, one call of each kind unless given) or
    :func:`run_tiny_demo` (``model="tiny-random"``; ``steps`` default 8, ``size`` 64, ``delta`` 0.3). Returns the
    files written."""
    if model in ("testbed", "testbed2"):
        trained = 64 if model == "testbed" else 128
        if size is not None and size != trained:
            raise ValueError(f"--size {size}: the {model} model was trained at {trained}x{trained} only")
        if model == "testbed":
            return run_testbed_demo(out_dir, steps=steps, seed=seed, delta=TESTBED_DELTA if delta is None else delta,
                                    attention_impl=attention_impl, **testbed_kw)
        kw = {"calibration_prompts": 2, "eval_prompts": 2, "repeat": 1, **testbed_kw}
        return run_testbed_demo(out_dir, steps=steps, seed=seed, delta=TESTBED2_DELTA if delta is None else delta,
                                candidates=TESTBED2_CANDIDATES, attention_impl=attention_impl, world_name="v2", **kw)
    if model == "tiny-random":
        if testbed_kw:
            raise ValueError(f"{sorted(testbed_kw)}: options of the testbed demo, not of --model tiny-random")
        return run_tiny_demo(out_dir, steps=8 if steps is None else steps, size=64 if size is None else size,
                             seed=seed, delta=0.3 if delta is None else delta, attention_impl=attention_impl)
    raise ValueError(f"--model {model!r}: expected one of {', '.join(MODELS)}")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    kw = {k: v for k, v in (("calibration_prompts", args.calibration_prompts), ("eval_prompts", args.eval_prompts),
                            ("repeat", args.repeat)) if v is not None}
    if kw and args.model == "tiny-random":
        raise ValueError("--calibration-prompts, --eval-prompts and --repeat are options of --model testbed / testbed2")
    run_demo(args.out, model=args.model, steps=args.steps, size=args.size, seed=args.seed, delta=args.delta,
             attention_impl=args.attention_impl, **kw)
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    demo = sub.add_parser("demo", help="the whole loop (calibrate, dense vs compressed, compare) on the shipped "
                                        "SD3-style testbed (CPU, < 1 min)")
    demo.add_argument("--out", default="demo_out", help="folder for the plan, PNGs and report.json")
    demo.add_argument("--model", default="testbed", choices=list(MODELS),
                      help="testbed: the trained SD3-style testbed shipped in dfa2_jax/assets (default; 64 image "
                           "tokens, CPU < 1 min); testbed2: the 1024-token SD3-style one (CPU: a few minutes); "
                           "tiny-random: tiny SD3- and FLUX-style pipelines with random weights (textures)")
    demo.add_argument("--steps", type=int, default=None,
                      help="sampling steps (testbed, testbed2: 28; tiny-random: 8)")
    demo.add_argument("--size", type=int, default=None,
                      help="image height and width (testbed: 64 only; testbed2: 128 only; tiny-random: default 64, "
                           "multiple of 16)")
    demo.add_argument("--delta", type=float, default=None,
                      help=f"calibration RSE budget δ (testbed: {TESTBED_DELTA:g}, about half the attention removed; "
                           f"testbed2: {TESTBED2_DELTA:g}; tiny: 0.3)")
    demo.add_argument("--calibration-prompts", type=int, default=None,
                      help="testbed(2): held-out captions calibrated on (default 4; testbed2: 2)")
    demo.add_argument("--eval-prompts", type=int, default=None,
                      help="testbed(2): other held-out captions compared on (default 8; testbed2: 2)")
    demo.add_argument("--repeat", type=int, default=None,
                      help="testbed(2): pipeline calls of each kind (default 2: the first compiles, the second gives "
                           "the steady time; testbed2: 1)")
    demo.add_argument("--seed", type=int, default=0)
    add_attention_impl_arg(demo)
    demo.set_defaults(fn=run)
    return demo
