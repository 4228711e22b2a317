"""δ sweep on a shipped testbed (CPU is enough): how much attention each δ removes and what it costs.

    python3 scripts/testbed_sweep.py --out docs/testbed            # ~20 min on 2 CPU cores
    python3 scripts/testbed_sweep.py --family flux --out docs/testbed/flux
    python3 scripts/testbed_sweep.py --out /tmp/sw --eval-prompts 8 --deltas 0.01,0.1 --steps 6

For every δ: calibrate a plan (progressive per-head RSE + CP-SAT, candidates ``--candidates``, savings from the
exact attention mask) on ``--calibration-prompts`` held-out world captions (``world.make_batch(0, n,
"heldout")``), then generate ``--eval-prompts`` other held-out captions (``world.make_batch(1, n, "heldout")``,
any caption also in the calibration set dropped) densely once and with each plan, every caption from the same
noise (prompt i: the noise the pipeline draws with seed ``--seed + i``, as ``dfa2 eval``), and compare:
attention FLOPs kept (exact mask, at the testbed's 64 image + 109 (SD3) or 32 (FLUX) text tokens), PSNR / SSIM
of the compressed images against the dense ones, and the testbed prompt accuracy
(:mod:`dfa2_jax.testbed.classifier`) of both.

Writes to ``--out``: ``sweep.json`` (everything, per-δ method mix per step and per layer), ``sweep.md`` (the
table), ``sweep_heatmap.png`` (methods chosen per step × (layer, head) for the δ whose plan removes closest to
half of the attention FLOPs, or ``--heatmap-delta``), ``sweep_samples.png`` (a few captions: world render, dense,
then every δ) and ``plans/plan_delta_<δ>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

DEFAULT_DELTAS = "0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.4,0.8"
# 64 image tokens (8x8 patches): arrow:k keeps a band of half-width 64 // (2k) = 16, 8, 4 tokens = ±2 rows,
# ±1 row, ±half a row of the patch grid. Larger k (arrow:16 -> 2, arrow:32 -> 1) save almost nothing more
# (at 109 text tokens the image-image block is only 14% of the joint attention).
DEFAULT_CANDIDATES = "arrow:2,arrow:4,arrow:8,cache"
CELL = 14


def _generate(pipe, prompts, noise, settings, plan, batch):
    images = []
    for i in range(0, len(prompts), batch):
        out = pipe(prompts[i:i + batch], latents=np.concatenate(noise[i:i + batch]), plan=plan,
                   **settings.generate_kwargs())
        images += [np.asarray(im.convert("RGB")) for im in out.images]
    return images


def method_map(plan, path: str, title: str) -> tuple[int, int]:
    """PNG: one row per (layer, head), one column per step, each cell coloured by the method chosen (legend
    below). Layers are separated by a white gap."""
    from PIL import Image, ImageDraw, ImageFont

    from dfa2_jax.plan.report import method_colours

    a = np.asarray(plan.assignment)  # [T, L, H]
    steps, layers, heads = a.shape
    colours = method_colours(list(plan.methods))
    left, top, gap = 40, 30, 4
    legend_h = 18 * ((len(plan.methods) + 3) // 4) + 8
    w = left + steps * CELL + 10
    h = top + layers * (heads * CELL + gap) + legend_h
    img = Image.new("RGB", (max(w, 360), h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((4, 2), title, fill=(0, 0, 0), font=font)
    for s in range(0, steps, 5):
        d.text((left + s * CELL, top - 12), str(s), fill=(60, 60, 60), font=font)
    for li in range(layers):
        y0 = top + li * (heads * CELL + gap)
        d.text((4, y0 + (heads * CELL) // 2 - 6), f"L{li}", fill=(0, 0, 0), font=font)
        for hi in range(heads):
            y = y0 + hi * CELL
            d.text((24, y + 1), str(hi), fill=(120, 120, 120), font=font)
            for s in range(steps):
                d.rectangle([left + s * CELL, y, left + (s + 1) * CELL - 2, y + CELL - 2], fill=colours[a[s, li, hi]])
    yl = top + layers * (heads * CELL + gap) + 4
    for i, name in enumerate(plan.methods):
        x, y = 4 + (i % 4) * 90, yl + (i // 4) * 18
        d.rectangle([x, y, x + 10, y + 10], fill=colours[i], outline=(0, 0, 0))
        d.text((x + 14, y), name, fill=(0, 0, 0), font=font)
    img.save(path, format="PNG")
    return img.size


def samples_png(path: str, renders, dense, compressed: dict[float, list], rows: int) -> None:
    """Rows: captions; columns: world render | dense | compressed at every δ (column labels on top)."""
    from PIL import Image, ImageDraw, ImageFont

    cols = [("render", renders), ("dense", dense)] + [(f"d={d:g}", ims) for d, ims in compressed.items()]
    s, top = 64, 14
    img = Image.new("RGB", (len(cols) * (s + 2), top + rows * (s + 2)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for c, (name, ims) in enumerate(cols):
        d.text((c * (s + 2) + 2, 1), name, fill=(0, 0, 0), font=font)
        for r in range(rows):
            img.paste(Image.fromarray(np.asarray(ims[r], np.uint8)), (c * (s + 2), top + r * (s + 2)))
    img.save(path, format="PNG")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/testbed")
    ap.add_argument("--family", default="sd3", choices=("sd3", "flux"), help="which shipped testbed")
    ap.add_argument("--deltas", default=DEFAULT_DELTAS)
    ap.add_argument("--candidates", default=DEFAULT_CANDIDATES)
    ap.add_argument("--calibration-prompts", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--steps", type=int, default=None, help="default: the testbed's 28")
    ap.add_argument("--batch", type=int, default=50, help="captions per pipeline call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heatmap-delta", type=float, default=None,
                    help="δ of the heat-map (default: the plan removing closest to 50%% of attention FLOPs)")
    ap.add_argument("--sample-rows", type=int, default=8)
    args = ap.parse_args(argv)

    import dataclasses

    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.evaluate import initial_noise, psnr, ssim, write_json_atomic
    from dfa2_jax.plan.flops import plan_stats
    from dfa2_jax.plan.report import method_mix
    from dfa2_jax.testbed import classifier, load_testbed, world

    t_all = time.perf_counter()
    os.makedirs(os.path.join(args.out, "plans"), exist_ok=True)
    pipe, settings = load_testbed(args.family)
    if args.steps is not None:
        settings = dataclasses.replace(settings, num_inference_steps=args.steps)
    deltas = [float(x) for x in args.deltas.split(",")]
    _, cal, _ = world.make_batch(0, args.calibration_prompts, "heldout")
    _, ev_all, scenes_all = world.make_batch(1, args.eval_prompts, "heldout")
    keep = [i for i, c in enumerate(ev_all) if c not in set(cal)]
    ev = [ev_all[i] for i in keep]
    renders = world.render_batch([scenes_all[i] for i in keep])
    print(f"{len(cal)} calibration captions, {len(ev)} evaluation captions "
          f"({len(ev_all) - len(ev)} dropped as also in the calibration set)", flush=True)
    h, w = settings.height, settings.width
    noise = [initial_noise(pipe, h, w, args.seed + i) for i in range(len(ev))]
    clf = classifier.load_classifier()

    t0 = time.perf_counter()
    dense = _generate(pipe, ev, noise, settings, None, args.batch)
    t_dense = time.perf_counter() - t0
    acc_dense = classifier.prompt_accuracy(dense, ev, classifier=clf)
    print(f"dense: {len(ev)} images in {t_dense:.1f} s, prompt accuracy {acc_dense.mean():.4f}", flush=True)

    results, plans, compressed = [], {}, {}
    for delta in deltas:
        t0 = time.perf_counter()
        res = calibrate(pipe, cal, resolution=(h, w), steps=settings.num_inference_steps, delta=delta,
                        candidates=args.candidates, seed=args.seed, guidance_scale=settings.guidance_scale,
                        savings="exact", progress=False, max_sequence_length=settings.max_sequence_length)
        t_cal = time.perf_counter() - t0
        plan = res.plan
        plans[delta] = plan
        plan.save(os.path.join(args.out, "plans", f"plan_delta_{delta:g}.json"))
        t0 = time.perf_counter()
        ims = _generate(pipe, ev, noise, settings, plan, args.batch)
        t_gen = time.perf_counter() - t0
        compressed[delta] = ims
        acc = classifier.prompt_accuracy(ims, ev, classifier=clf)
        p = np.array([psnr(a, b) for a, b in zip(dense, ims)])
        s = np.array([ssim(a, b) for a, b in zip(dense, ims)])
        n_img = plan.calibration["image_tokens"]
        stats = plan_stats(plan, n_img)
        row = {"delta": delta, "attention_flops_kept": stats["attention_flops_kept"],
               "removed": 1.0 - stats["attention_flops_kept"],
               "psnr_mean": float(np.mean(np.minimum(p, 100.0))), "psnr_median": float(np.median(p)),
               "psnr_min": float(p.min()), "identical_images": int(np.isinf(p).sum()),
               "ssim_mean": float(s.mean()), "ssim_min": float(s.min()),
               "prompt_accuracy_dense": float(acc_dense.mean()), "prompt_accuracy_compressed": float(acc.mean()),
               "prompt_accuracy_drop": float(acc_dense.mean() - acc.mean()),
               "captions_all_attributes_dense": float(np.mean(acc_dense == 1.0)),
               "captions_all_attributes_compressed": float(np.mean(acc == 1.0)),
               "method_counts": stats["method_counts"], "method_mix": method_mix(plan),
               "per_step_kept": stats["per_step"], "per_layer_kept": stats["per_layer"],
               "calibration_s": t_cal, "generation_s": t_gen}
        results.append(row)
        print(f"δ={delta:g}: removed {100 * row['removed']:.1f}%, PSNR {row['psnr_mean']:.2f} dB, SSIM "
              f"{row['ssim_mean']:.4f}, prompt acc {row['prompt_accuracy_compressed']:.4f} (dense "
              f"{row['prompt_accuracy_dense']:.4f}); calibrate {t_cal:.1f} s, generate {t_gen:.1f} s", flush=True)

    hd = args.heatmap_delta
    if hd is None:
        hd = min(results, key=lambda r: abs(r["removed"] - 0.5))["delta"]
    if hd not in plans:
        raise SystemExit(f"--heatmap-delta {hd} is not one of the swept deltas {deltas}")
    hrow = next(r for r in results if r["delta"] == hd)
    method_map(plans[hd], os.path.join(args.out, "sweep_heatmap.png"),
               f"testbed {args.family.upper()}, delta={hd:g}: {100 * hrow['removed']:.0f}% of attention FLOPs removed")
    rows = min(args.sample_rows, len(ev))
    samples_png(os.path.join(args.out, "sweep_samples.png"), renders, dense, compressed, rows)

    info = {"format": "dfa2-testbed-sweep", "version": 1, "family": args.family,
            "settings": dataclasses.asdict(settings), "candidates": args.candidates.split(","),
            "savings": "exact", "seed": args.seed,
            "calibration_captions": cal, "evaluation_captions": len(ev),
            "evaluation_source": f"world.make_batch(1, {args.eval_prompts}, 'heldout'), minus calibration captions",
            "image_tokens": int(plans[deltas[0]].calibration["image_tokens"]),
            "text_tokens": int(plans[deltas[0]].model["text_tokens"]),
            "dense": {"prompt_accuracy": float(acc_dense.mean()),
                      "captions_all_attributes": float(np.mean(acc_dense == 1.0)), "generation_s": t_dense},
            "heatmap_delta": hd, "results": results, "wall_time_s": time.perf_counter() - t_all}
    write_json_atomic(os.path.join(args.out, "sweep.json"), info)
    names = list(plans[deltas[0]].methods)
    head = ("| δ | attention FLOPs removed | " + " | ".join(names) + " | PSNR dB (mean / min) | SSIM (mean / min) "
            "| prompt acc. compressed | drop (dense − compressed) |")
    lines = [f"Dense prompt accuracy on the {len(ev)} evaluation captions: {acc_dense.mean():.4f} "
             f"({100 * np.mean(acc_dense == 1.0):.1f}% of captions with every attribute right). Method columns: "
             "share of the (step ≥ 1, layer, head) slots.", "", head,
             "|" + "---|" * (6 + len(names))]
    for r in results:
        mix = r["method_mix"]["overall"]
        lines.append(f"| {r['delta']:g} | {100 * r['removed']:.1f}% | "
                     + " | ".join(f"{100 * mix[n]:.0f}%" for n in names)
                     + f" | {r['psnr_mean']:.1f} / {r['psnr_min']:.1f} | {r['ssim_mean']:.4f} / {r['ssim_min']:.3f} "
                       f"| {r['prompt_accuracy_compressed']:.4f} | {r['prompt_accuracy_drop']:+.4f} |")
    with open(os.path.join(args.out, "sweep.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wall time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
