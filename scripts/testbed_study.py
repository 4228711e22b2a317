"""The paper's checks on a testbed: δ sweep, RSE vs final quality, the per-head coefficient c, locality across
prompts, and head-wise V2 plans against V1 plans and plain layer caching at equal attention cost.

    python3 scripts/testbed_study.py --model testbed2-sd3 --out docs/testbed2/sd3       # one GPU, ~6 min
    python3 scripts/testbed_study.py --model testbed2-flux --out docs/testbed2/flux
    python3 scripts/testbed_study.py --model testbed-sd3 --out /tmp/st --steps 4 --eval-prompts 4 \\
        --deltas 0.05,0.5 --v1-deltas 0.5 --perturbations 3 --locality-prompts 2 --c-values 1,inf   # CPU smoke

Every figure compares a compressed generation with the dense one from the same noise (caption i: the noise
the pipeline draws with seed ``--seed + i``, as ``dfa2 eval``), on ``--eval-prompts`` held-out world captions
(``world.make_batch(1, n, "heldout", world=...)`` minus the calibration captions); calibration uses
``--calibration-prompts`` other held-out captions (``make_batch(0, ...)``). Quality: PSNR and SSIM against the
dense image, and prompt accuracy (the world's classifier, :mod:`dfa2_jax.testbed.classifier`: the share of
caption attributes read back). Cost: attention FLOPs kept, counted in the kernel's 128x64 tiles (what the
Pallas kernel visits) and by the exact mask.

Studies (``--studies``, default all, in this order):

* ``delta``: head-wise calibration (DiTFastAttnV2: CP-SAT per head, ``--candidates``) at every ``--deltas``; per
  δ the cost, the quality and the method mix per step and per layer.
* ``rse``: the RSE table of the dense trajectory (one calibration pass at a δ no candidate fits); then
  ``--perturbations`` single (layer, head, method) changes, each applied at every step >= 1 and nowhere else;
  the head's mean RSE against the final image's PSNR drop and prompt-accuracy drop; Spearman ρ with a 95%
  bootstrap interval (2 000 resamples of the perturbations).
* ``c``: the per-head pre-filter coefficient c in ``--c-values`` at the δ of the ``delta`` study whose plan
  removes closest to half of the attention tiles (or ``--c-delta``).
* ``locality``: on ``--locality-prompts`` captions, at ``--locality-steps``, per (layer, head): the share of
  each image query's image-image attention mass inside each arrow band, averaged over queries, its spread
  across prompts, and how alike two prompts' per-query profiles are (mean pairwise Pearson r) — next to the
  same for the text-involved parts (the image queries' mass on text keys; the text queries' distribution
  over image keys).
* ``compare``: at equal attention cost (tiles kept): the V2 curve of the ``delta`` study, V1 plans (layer-wise
  greedy choice in the same δ budget, ``--v1-candidates``: window attention with residual sharing, attention
  sharing across steps, CFG sharing where the model runs CFG) at ``--v1-deltas``, and plain layer caching
  (every head of every layer reuses its output on odd steps); V2 and V1 are interpolated to caching's cost.

Writes to ``--out``: ``study.json`` (everything), ``study.md`` (the tables), plots ``delta.png``,
``delta_mix.png``, ``rse.png``, ``c.png``, ``locality.png``, ``compare.png`` (``--replot study.json`` redraws
them), and ``plans/*.json``. ``--previous study.json`` keeps an earlier run's studies that are not rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np

DEFAULT_DELTAS = "0.01,0.02,0.05,0.1,0.2,0.4,0.8,1.6"
DEFAULT_CANDIDATES = "arrow:2,arrow:4,arrow:8,arrow:16,cache"
DEFAULT_V1_CANDIDATES = "wars:8,cache"  # one window per head: the plan format keeps one residual per head
PSNR_CAP = 100.0  # identical images: PSNR is infinite; averages cap it here


# ============================================================================================ plotting (Pillow)
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot(path: str, title: str, xlabel: str, ylabel: str, series: list[dict], *, size=(560, 380),
         xlim=None, ylim=None) -> None:
    """A line / scatter chart: each series {label, x, y, lines (bool), colour index}."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 62, 16, 34, 58
    font = ImageFont.load_default()
    xs = [v for s in series for v in s["x"] if np.isfinite(v)]
    ys = [v for s in series for v in s["y"] if np.isfinite(v)]
    x0, x1 = xlim or (min(xs, default=0.0), max(xs, default=1.0))
    y0, y1 = ylim or (min(ys, default=0.0), max(ys, default=1.0))
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x0 + 0.5
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y0 + 0.5
    # 5% margins, so that points on the range's edge stay inside the frame
    x0, x1 = x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0)
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    rows, lx = 1, 0
    for s in series:  # legend rows needed at this width
        step = 16 + 6 * len(s["label"])
        if lx and lx + step > w - left:
            rows, lx = rows + 1, 0
        lx += step
    bottom += 16 * (rows - 1)
    h += 16 * (rows - 1)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for t in _ticks(x0, x1):
        d.line([px(t), h - bottom, px(t), h - bottom + 4], fill=(0, 0, 0))
        d.text((px(t) - 12, h - bottom + 6), f"{t:.3g}", fill=(0, 0, 0), font=font)
    for t in _ticks(y0, y1):
        d.line([left - 4, py(t), left, py(t)], fill=(0, 0, 0))
        d.text((4, py(t) - 6), f"{t:.3g}", fill=(0, 0, 0), font=font)
    d.text((4, 4), title, fill=(0, 0, 0), font=font)
    d.text((left + (w - left - right) // 2 - 3 * len(xlabel), h - bottom + 20), xlabel, fill=(0, 0, 0), font=font)
    d.text((4, top - 14), ylabel, fill=(0, 0, 0), font=font)
    lx, ly = left + 6, h - bottom + 40
    for i, s in enumerate(series):
        col = PALETTE[s.get("colour", i) % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if np.isfinite(x) and np.isfinite(y)]
        if s.get("lines", True) and len(pts) > 1:
            d.line(pts, fill=col, width=2)
        r = s.get("radius", 3)
        for x, y in pts:
            d.ellipse([x - r, y - r, x + r, y + r], fill=col)
        step = 16 + 6 * len(s["label"])
        if lx > left + 6 and lx + step > w:
            lx, ly = left + 6, ly + 16
        d.rectangle([lx, ly + 2, lx + 8, ly + 10], fill=col)
        d.text((lx + 11, ly), s["label"], fill=(0, 0, 0), font=font)
        lx += step
    img.save(path, format="PNG")


def stacked_bars(path: str, title: str, labels: list[str], parts: list[dict[str, float]], names: list[str]) -> None:
    """One bar per label, stacked shares of ``names`` (each part sums to 1)."""
    from PIL import Image, ImageDraw, ImageFont

    from dfa2_jax.plan.report import method_colours

    colours = method_colours(names)
    bw, gap, left, top, hgt = 34, 10, 40, 24, 220
    w = max(left + len(labels) * (bw + gap) + 20, 100 * ((len(names) + 1) // 2) + 20)
    img = Image.new("RGB", (w, top + hgt + 70), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((4, 4), title, fill=(0, 0, 0), font=font)
    for i, (lab, part) in enumerate(zip(labels, parts)):
        x, y = left + i * (bw + gap), top + hgt
        for n, c in zip(names, colours):
            hh = part.get(n, 0.0) * hgt
            if hh > 0:
                d.rectangle([x, y - hh, x + bw, y], fill=c)
            y -= hh
        d.text((x, top + hgt + 4), lab, fill=(0, 0, 0), font=font)
    for k, (n, c) in enumerate(zip(names, colours)):
        x, y = 4 + (k % 4) * 100, top + hgt + 24 + (k // 4) * 16
        d.rectangle([x, y, x + 8, y + 8], fill=c)
        d.text((x + 12, y - 2), n, fill=(0, 0, 0), font=font)
    img.save(path, format="PNG")


# ============================================================================================ statistics
def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), np.float64)
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x, y) -> float:
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_ci(x, y, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(ρ, 2.5%, 97.5%): the percentile bootstrap over pairs."""
    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        r = spearman(x[i], y[i])
        if np.isfinite(r):
            boots.append(r)
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan")))
    return spearman(x, y), float(lo), float(hi)


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation on (x, y) points sorted by x; nan outside their range."""
    pts = sorted(points)
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        if xa <= x <= xb:
            return ya if xb == xa else ya + (yb - ya) * (x - xa) / (xb - xa)
    if pts and math.isclose(pts[0][0], x):
        return pts[0][1]
    return float("nan")


def mean_pairwise_r(profiles: np.ndarray) -> float:
    """Mean Pearson r over all pairs of rows of [P, N] (rows with no variance left out)."""
    p = np.asarray(profiles, np.float64)
    p = p[p.std(axis=1) > 1e-12]
    if len(p) < 2:
        return float("nan")
    c = np.corrcoef(p)
    return float(c[np.triu_indices(len(p), 1)].mean())


# ============================================================================================ the study
class Study:
    """The model, the captions, the dense images and the scoring shared by every study."""

    def __init__(self, args):
        from dfa2_jax.evaluate import initial_noise
        from dfa2_jax.pipeline import load_pipeline
        from dfa2_jax.testbed import classifier, world
        from dfa2_jax.testbed.shipped import model_path, read_settings

        self.args = args
        folder = model_path(args.model) or args.model
        self.folder = folder
        self.settings = read_settings(folder)
        if args.steps is not None:
            self.settings = dataclasses.replace(self.settings, num_inference_steps=args.steps)
        self.pipe = load_pipeline(folder, dtype="float32", cache_dir=False)
        w = self.settings.world
        _, self.cal, _ = world.make_batch(0, args.calibration_prompts, "heldout", world=w)
        _, ev_all, scenes = world.make_batch(1, args.eval_prompts, "heldout", world=w)
        keep = [i for i, c in enumerate(ev_all) if c not in set(self.cal)]
        self.ev = [ev_all[i] for i in keep]
        self.renders = world.render_batch([scenes[i] for i in keep], world=w)
        h, wd = self.settings.height, self.settings.width
        self.noise = [initial_noise(self.pipe, h, wd, args.seed + i) for i in range(len(self.ev))]
        self.clf = classifier.load_classifier(world=w)
        self.compiles = 0
        t = time.perf_counter()
        self.dense = self.generate(None)
        self.dense_acc = classifier.prompt_accuracy(self.dense, self.ev, classifier=self.clf)
        self.t_dense = time.perf_counter() - t
        log(f"{args.model}: {len(self.cal)} calibration + {len(self.ev)} evaluation captions (world {w}); dense "
            f"prompt accuracy {self.dense_acc.mean():.4f} ({self.t_dense:.1f} s)")

    # ---- generation and scoring
    def generate(self, plan, prompts=None, noise=None) -> list[np.ndarray]:
        prompts = self.ev if prompts is None else prompts
        noise = self.noise if noise is None else noise
        b = self.args.batch
        out = []
        for i in range(0, len(prompts), b):
            res = self.pipe(prompts[i:i + b], latents=np.concatenate(noise[i:i + b]), plan=plan,
                            attention_impl=self.args.attention_impl, **self.settings.generate_kwargs())
            out += [np.asarray(im.convert("RGB")) for im in res.images]
        return out

    def score(self, images, prompts=None, dense=None) -> dict:
        from dfa2_jax.evaluate import psnr, ssim
        from dfa2_jax.testbed import classifier

        prompts = self.ev if prompts is None else prompts
        dense = self.dense if dense is None else dense
        p = np.array([psnr(a, b) for a, b in zip(dense, images)])
        s = np.array([ssim(a, b) for a, b in zip(dense, images)])
        acc = classifier.prompt_accuracy(images, prompts, classifier=self.clf)
        base = classifier.prompt_accuracy(dense, prompts, classifier=self.clf)
        return {"psnr_mean": float(np.mean(np.minimum(p, PSNR_CAP))), "psnr_min": float(p.min()),
                "identical_images": int(np.isinf(p).sum()), "ssim_mean": float(s.mean()), "ssim_min": float(s.min()),
                "prompt_accuracy": float(acc.mean()), "prompt_accuracy_dense": float(base.mean()),
                "prompt_accuracy_drop": float(base.mean() - acc.mean())}

    def cost(self, plan) -> dict:
        from dfa2_jax.plan.flops import DEFAULT_BLOCKS, plan_stats

        n_img = self.n_img
        tiles = plan_stats(plan, n_img, blocks=DEFAULT_BLOCKS)["attention_flops_kept"]
        exact = plan_stats(plan, n_img)["attention_flops_kept"]
        return {"tiles_kept": float(tiles), "tiles_removed": float(1 - tiles), "exact_kept": float(exact),
                "exact_removed": float(1 - exact)}

    @property
    def n_img(self) -> int:
        from dfa2_jax.evaluate import image_token_count

        return image_token_count(self.pipe, self.settings.height, self.settings.width)

    def calibrate(self, delta: float, *, candidates: str, c: float = 1.5, strategy: str = "headwise"):
        from dfa2_jax.calibrate.calibrate import calibrate

        s = self.settings
        return calibrate(self.pipe, self.cal, resolution=(s.height, s.width), steps=s.num_inference_steps,
                         delta=delta, c=c, candidates=candidates, seed=self.args.seed, guidance_scale=s.guidance_scale,
                         progress=False, max_sequence_length=s.max_sequence_length,
                         attention_impl=self.args.attention_impl, strategy=strategy)

    def run_plan(self, plan, name: str) -> dict:
        """Generate with ``plan``, save it under plans/, and return cost + quality + method mix."""
        from dfa2_jax.plan.report import method_mix

        plan.save(os.path.join(self.args.out, "plans", f"{name}.json"))
        t = time.perf_counter()
        ims = self.generate(plan)
        row = {"plan": name, **self.cost(plan), **self.score(ims), "generation_s": time.perf_counter() - t,
               "method_mix": method_mix(plan)}
        log(f"{name}: tiles removed {100 * row['tiles_removed']:.1f}% (exact {100 * row['exact_removed']:.1f}%), "
            f"PSNR {row['psnr_mean']:.2f} dB, SSIM {row['ssim_mean']:.4f}, prompt acc {row['prompt_accuracy']:.4f} "
            f"(dense {row['prompt_accuracy_dense']:.4f})")
        return row

    def plan_from(self, assignment: np.ndarray, methods: list[str], note: dict):
        from dfa2_jax.evaluate import text_token_count
        from dfa2_jax.plan import Plan, model_info_for

        info = model_info_for(self.pipe.transformer.config, text_token_count(self.pipe,
                                                                             self.settings.max_sequence_length))
        plan = Plan(info, int(assignment.shape[0]), list(methods), assignment.astype(np.int32),
                    {"image_tokens": self.n_img, **note})
        plan.validate(info, n_img=self.n_img, cfg=self.settings.guidance_scale is not None
                      and self.settings.guidance_scale > 1)
        return plan


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- δ sweep
def study_delta(st: Study, res: dict) -> None:
    rows = []
    for delta in [float(x) for x in st.args.deltas.split(",")]:
        t = time.perf_counter()
        cal = st.calibrate(delta, candidates=st.args.candidates)
        row = {"delta": delta, "calibration_s": time.perf_counter() - t,
               **st.run_plan(cal.plan, f"v2_delta_{delta:g}")}
        rows.append(row)
    res["delta"] = {"candidates": st.args.candidates.split(","), "rows": rows}


# ---- RSE vs final quality
def study_rse(st: Study, res: dict) -> None:
    cands = st.args.candidates.split(",")
    base = st.calibrate(1e-12, candidates=st.args.candidates)  # nothing fits: the dense trajectory
    rse = base.rse  # [T, L, H, M]
    steps, layers, heads, m = rse.shape
    rng = np.random.default_rng(st.args.seed)
    triples = [(int(li), int(h), int(k)) for li in range(layers) for h in range(heads) for k in range(m)]
    pick = rng.choice(len(triples), size=min(st.args.perturbations, len(triples)), replace=False)
    rows = []
    for n, idx in enumerate(sorted(pick)):
        li, h, k = triples[idx]
        a = np.zeros((steps, layers, heads), np.int32)
        a[1:, li, h] = k + 1
        plan = st.plan_from(a, ["full"] + cands, {"study": "rse", "layer": li, "head": h, "method": cands[k]})
        ims = st.generate(plan)
        q = st.score(ims)
        row = {"layer": li, "head": h, "method": cands[k], "rse_mean": float(np.mean(rse[1:, li, h, k])),
               "rse_max": float(np.max(rse[1:, li, h, k])), **q, "psnr_drop": PSNR_CAP - q["psnr_mean"]}
        rows.append(row)
        log(f"perturbation {n + 1}/{len(pick)}: layer {li} head {h} {cands[k]}: mean RSE {row['rse_mean']:.4g}, "
            f"PSNR {q['psnr_mean']:.2f}, acc drop {q['prompt_accuracy_drop']:+.4f}")
    x = [r["rse_mean"] for r in rows]
    out = {"rows": rows, "rse_table_shape": list(rse.shape), "candidates": cands,
           "rse_mean_per_candidate": {c: float(np.mean(rse[1:, :, :, i])) for i, c in enumerate(cands)}}
    for key, y in (("psnr", [-r["psnr_mean"] for r in rows]), ("ssim", [-r["ssim_mean"] for r in rows]),
                   ("prompt_accuracy", [r["prompt_accuracy_drop"] for r in rows])):
        rho, lo, hi = spearman_ci(x, y, seed=st.args.seed)
        out[f"spearman_{key}"] = {"rho": rho, "ci95": [lo, hi]}
        log(f"Spearman ρ(RSE, {key} loss) = {rho:.3f} [{lo:.3f}, {hi:.3f}] over {len(rows)} perturbations")
    res["rse"] = out


# ---- the per-head coefficient c
def study_c(st: Study, res: dict) -> None:
    delta = st.args.c_delta
    if delta is None:
        rows = res.get("delta", {}).get("rows")
        if not rows:
            raise SystemExit("--studies c needs the delta study before it, or --c-delta")
        delta = min(rows, key=lambda r: abs(r["tiles_removed"] - 0.5))["delta"]
    out = []
    swept = {r["delta"]: r for r in res.get("delta", {}).get("rows", [])}
    for c in [float(x) for x in st.args.c_values.split(",")]:
        if c == 1.5 and delta in swept:  # the δ sweep's own plan (default c)
            row = {k: v for k, v in swept[delta].items() if k not in ("delta", "calibration_s")}
        else:
            row = st.run_plan(st.calibrate(delta, candidates=st.args.candidates, c=c).plan,
                              f"v2_delta_{delta:g}_c_{c:g}")
        out.append({"c": c if math.isfinite(c) else "inf", **row})
    res["c"] = {"delta": delta, "rows": out}


# ---- locality across prompts
def study_locality(st: Study, res: dict) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dfa2_jax.models.attention import dense_attention
    from dfa2_jax.plan.methods import parse_method
    from dfa2_jax.sample import velocity
    from dfa2_jax.scheduler import euler_step

    s = st.settings
    arrows = [parse_method(c) for c in st.args.candidates.split(",") if c.startswith("arrow:")]
    n_img = st.n_img
    widths = [m.half_window(n_img) for m in arrows]
    prompts = st.ev[:st.args.locality_prompts]
    prep = st.pipe.prepare(prompts, height=s.height, width=s.width, num_inference_steps=s.num_inference_steps,
                           guidance_scale=s.guidance_scale, seed=st.args.seed,
                           max_sequence_length=s.max_sequence_length)
    tr = st.pipe.transformer
    n = len(prompts)

    class Probe:
        """Dense attention that also returns, per layer: the in-band share of each image query's image-image
        mass per band [B, H, K, N], the image queries' mass on text keys [B, H, N] and the text queries' mean
        distribution over image keys [B, H, N]."""

        def __init__(self):
            self.stats = {}

        def __call__(self, q, k, v, *, layer, layout):
            o = dense_attention(q, k, v)
            qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
            if prep.do_cfg:  # the conditional half
                qf, kf = qf[qf.shape[0] // 2:], kf[kf.shape[0] // 2:]
            p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(q.shape[-1]), axis=-1)
            t = layout.text_len
            img = slice(t, None) if layout.text_first else slice(0, p.shape[-1] - t)
            txt = slice(0, t) if layout.text_first else slice(p.shape[-1] - t, None)
            p_ii = p[:, :, img, img]
            vis = p_ii.sum(-1)
            idx = jnp.arange(p_ii.shape[-1])
            dist = jnp.abs(idx[:, None] - idx[None, :])
            inband = jnp.stack([(p_ii * (dist <= w)).sum(-1) / vis for w in widths], axis=2)
            self.stats[str(layer)] = {"inband": inband, "img_to_text": p[:, :, img, txt].sum(-1),
                                      "text_to_img": p[:, :, txt, img].mean(2)}
            return o

        def run_layer(self, layer, compute):
            return compute()

    @jax.jit
    def step(params, x, t, sigma, sigma_next, cond):
        probe = Probe()
        v = velocity(nnx.merge(tr.graphdef, params), x, t, cond, family=tr.family, do_cfg=prep.do_cfg,
                     runtime=probe)
        return euler_step(x, v, sigma, sigma_next), probe.stats

    want = sorted({int(x) for x in st.args.locality_steps.split(",") if int(x) < s.num_inference_steps})
    x = prep.latents
    per_step = {}
    for i in range(max(want) + 1):
        x, stats = step(tr.state, x, jnp.asarray(prep.timesteps[i]), jnp.asarray(prep.sigmas[i]),
                        jnp.asarray(prep.sigmas[i + 1]), prep.cond)
        if i in want:
            per_step[i] = jax.tree.map(np.asarray, stats)
    layers = tr.attention_layer_names()
    heads = tr.config.num_attention_heads
    rows = []
    for li, name in enumerate(layers):
        for h in range(heads):
            row = {"layer": li, "layer_name": name, "head": h}
            for kk, m in enumerate(arrows):
                share = np.stack([per_step[i][str(li)]["inband"][:, h, kk] for i in want])  # [S, P, N]
                per_prompt = share.mean(axis=(0, 2))  # [P]
                row[f"{m.name}_share"] = float(per_prompt.mean())
                row[f"{m.name}_share_std_across_prompts"] = float(per_prompt.std())
                row[f"{m.name}_profile_r"] = float(np.mean([mean_pairwise_r(share[j]) for j in range(len(want))]))
            i2t = np.stack([per_step[i][str(li)]["img_to_text"][:, h] for i in want])  # [S, P, N]
            t2i = np.stack([per_step[i][str(li)]["text_to_img"][:, h] for i in want])
            row["img_to_text_share"] = float(i2t.mean())
            row["img_to_text_share_std_across_prompts"] = float(i2t.mean(axis=(0, 2)).std())
            row["img_to_text_profile_r"] = float(np.mean([mean_pairwise_r(i2t[j]) for j in range(len(want))]))
            row["text_to_img_profile_r"] = float(np.mean([mean_pairwise_r(t2i[j]) for j in range(len(want))]))
            rows.append(row)
    summ = {"prompts": n, "steps": want, "bands": {m.name: w for m, w in zip(arrows, widths)}}
    for m in arrows:
        summ[f"{m.name}_profile_r_median"] = float(np.nanmedian([r[f"{m.name}_profile_r"] for r in rows]))
        summ[f"{m.name}_share_median"] = float(np.median([r[f"{m.name}_share"] for r in rows]))
    summ["img_to_text_profile_r_median"] = float(np.nanmedian([r["img_to_text_profile_r"] for r in rows]))
    summ["text_to_img_profile_r_median"] = float(np.nanmedian([r["text_to_img_profile_r"] for r in rows]))
    res["locality"] = {"summary": summ, "rows": rows}
    log("locality: " + ", ".join(f"{k} {v:.3f}" for k, v in summ.items() if isinstance(v, float)))


# ---- V2 vs V1 vs layer caching at equal cost
def study_compare(st: Study, res: dict) -> None:
    steps = st.settings.num_inference_steps
    layers = len(st.pipe.transformer.attention_layer_names())
    heads = st.pipe.transformer.config.num_attention_heads
    a = np.zeros((steps, layers, heads), np.int32)
    a[1::2] = 1
    cache_row = st.run_plan(st.plan_from(a, ["full", "cache"], {"study": "layer caching every other step"}),
                            "layer_cache_every_other_step")
    v1_cands = st.args.v1_candidates
    if st.settings.guidance_scale is not None and st.settings.guidance_scale > 1 and "cfg_share" not in v1_cands:
        v1_cands += ",cfg_share"
    v1 = []
    for delta in [float(x) for x in st.args.v1_deltas.split(",")]:
        cal = st.calibrate(delta, candidates=v1_cands, strategy="layerwise")
        v1.append({"delta": delta, **st.run_plan(cal.plan, f"v1_delta_{delta:g}")})
    v2 = res.get("delta", {}).get("rows", [])
    target = cache_row["tiles_removed"]
    metrics = ("psnr_mean", "ssim_mean", "prompt_accuracy")
    at = {"layer_cache": {k: cache_row[k] for k in metrics}}
    for name, rows in (("v2", v2), ("v1", v1)):
        at[name] = {k: interpolate([(r["tiles_removed"], r[k]) for r in rows], target) for k in metrics}
    res["compare"] = {"v1_candidates": v1_cands.split(","), "layer_cache": cache_row, "v1": v1,
                      "at_layer_cache_cost": {"tiles_removed": target, **at}}
    log(f"at {100 * target:.1f}% tiles removed: " + "; ".join(
        f"{n}: PSNR {v['psnr_mean']:.2f}, SSIM {v['ssim_mean']:.4f}, acc {v['prompt_accuracy']:.4f}"
        for n, v in at.items()))


def draw_plots(res: dict, out: str) -> list[str]:
    """The figures of the studies in ``res`` (a study.json), into ``out``. Returns the files written."""
    written = []

    def path(name):
        written.append(os.path.join(out, name))
        return written[-1]

    if "delta" in res:
        rows = res["delta"]["rows"]
        xs = [r["tiles_removed"] for r in rows]
        plot(path("delta.png"), "delta sweep: quality vs attention tiles removed", "attention tiles removed",
             "prompt accuracy / SSIM",
             [{"label": "prompt acc.", "x": xs, "y": [r["prompt_accuracy"] for r in rows]},
              {"label": "SSIM", "x": xs, "y": [r["ssim_mean"] for r in rows]},
              {"label": "dense prompt acc.", "x": [0.0, max(xs)], "y": [res["dense_prompt_accuracy"]] * 2,
               "colour": 7}], ylim=(0.0, 1.0))
        names = ["full"] + res["delta"]["candidates"]
        stacked_bars(path("delta_mix.png"), "method mix per delta (steps >= 1)", [f"{r['delta']:g}" for r in rows],
                     [r["method_mix"]["overall"] for r in rows], names)
    if "rse" in res:
        r = res["rse"]
        series = []
        for i, c in enumerate(r["candidates"]):
            sel = [x for x in r["rows"] if x["method"] == c]
            if sel:
                series.append({"label": c, "x": [math.log10(max(x["rse_mean"], 1e-12)) for x in sel],
                               "y": [x["psnr_mean"] for x in sel], "lines": False, "colour": i})
        rho = r["spearman_psnr"]
        fmt = lambda v: f"{float(v):.2f}"  # noqa: E731  (nan is stored as a string)
        plot(path("rse.png"), f"single-head perturbations: RSE vs final PSNR (Spearman rho {fmt(rho['rho'])} "
             f"[{fmt(rho['ci95'][0])}, {fmt(rho['ci95'][1])}])", "log10 mean RSE of the head (dense trajectory)",
             "PSNR vs dense, dB", series)
    if "c" in res:
        rows = res["c"]["rows"]
        xs = [r["tiles_removed"] for r in rows]
        series = [{"label": f"c={r['c']}", "x": [r["tiles_removed"]], "y": [r["psnr_mean"]], "lines": False,
                   "colour": i, "radius": 5} for i, r in enumerate(rows)]
        plot(path("c.png"), f"per-head coefficient c at delta={res['c']['delta']:g}", "attention tiles removed",
             "PSNR vs dense, dB", series)
    if "locality" in res:
        rows, summ = res["locality"]["rows"], res["locality"]["summary"]
        bands = list(summ["bands"])
        xs = list(range(len(rows)))
        heads = 1 + max(r["head"] for r in rows)
        series = [{"label": f"{b} share", "x": xs, "y": [r[f"{b}_share"] for r in rows], "colour": i}
                  for i, b in enumerate(bands)]
        series.append({"label": f"{bands[-1]} profile r", "x": xs, "y": [r[f"{bands[-1]}_profile_r"] for r in rows],
                       "colour": 6, "lines": False})
        series.append({"label": "img->text profile r", "x": xs, "y": [r["img_to_text_profile_r"] for r in rows],
                       "colour": 7, "lines": False})
        plot(path("locality.png"), f"per head: in-band share of image-image mass, and how alike prompts are "
             f"({summ['prompts']} prompts, steps {summ['steps']})", f"layer * {heads} + head", "share / Pearson r",
             series, size=(760, 420), ylim=(-0.2, 1.0))
    if "compare" in res:
        c = res["compare"]
        series = []
        for i, (name, rows) in enumerate((("V2 head-wise", res.get("delta", {}).get("rows", [])),
                                          ("V1 layer-wise", c["v1"]))):
            rows = sorted(rows, key=lambda r: r["tiles_removed"])
            series.append({"label": name, "x": [r["tiles_removed"] for r in rows],
                           "y": [r["psnr_mean"] for r in rows], "colour": i})
        series.append({"label": "layer caching, every other step", "x": [c["layer_cache"]["tiles_removed"]],
                       "y": [c["layer_cache"]["psnr_mean"]], "lines": False, "colour": 2, "radius": 5})
        plot(path("compare.png"), "equal attention cost: PSNR vs dense", "attention tiles removed",
             "PSNR dB", series)
    return written


STUDIES = {"delta": study_delta, "rse": study_rse, "c": study_c, "locality": study_locality,
           "compare": study_compare}


# ============================================================================================ report
def markdown(res: dict) -> str:
    out = [f"# Testbed study: {res['model']}", "",
           f"{res['evaluation_captions']} evaluation captions, {res['calibration_captions']} calibration captions, "
           f"{res['image_tokens']} image tokens, {res['steps']} steps; dense prompt accuracy "
           f"{res['dense_prompt_accuracy']:.4f}. Cost: attention FLOPs removed in 128x64 kernel tiles (exact mask in "
           "brackets).", ""]

    def table(rows, first, firstkey):
        lines = [f"| {first} | tiles removed (exact) | PSNR dB mean / min | SSIM mean | prompt acc. | drop | mix |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            mix = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["method_mix"]["overall"].items() if v >= 0.005)
            lines.append(f"| {r[firstkey]} | {100 * r['tiles_removed']:.1f}% ({100 * r['exact_removed']:.1f}%) | "
                         f"{r['psnr_mean']:.1f} / {r['psnr_min']:.1f} | {r['ssim_mean']:.4f} | "
                         f"{r['prompt_accuracy']:.4f} | {r['prompt_accuracy_drop']:+.4f} | {mix} |")
        return lines

    if "delta" in res:
        out += ["## δ sweep (head-wise, V2)", ""] + table(res["delta"]["rows"], "δ", "delta") + [""]
    if "rse" in res:
        r = res["rse"]
        out += ["## RSE vs final quality", ""]
        for k in ("psnr", "ssim", "prompt_accuracy"):
            s = r[f"spearman_{k}"]
            lo, hi = s["ci95"]  # nan is stored as a string in study.json
            out.append(f"- Spearman ρ(mean RSE, {k} loss) = {float(s['rho']):.3f}, 95% CI [{float(lo):.3f}, "
                       f"{float(hi):.3f}] over {len(r['rows'])} perturbations")
        out.append("")
    if "c" in res:
        out += [f"## c at δ = {res['c']['delta']:g}", ""] + table(res["c"]["rows"], "c", "c") + [""]
    if "locality" in res:
        out += ["## Locality across prompts", ""] + [f"- {k}: {v}" for k, v in res["locality"]["summary"].items()] + [""]
    if "compare" in res:
        c = res["compare"]
        out += ["## V2 vs V1 vs layer caching", "", "V1 plans (layer-wise):", ""]
        out += table(c["v1"], "δ", "delta") + ["", "Layer caching every other step:", ""]
        out += table([{**c["layer_cache"], "name": "cache"}], "plan", "name") + [""]
        a = c["at_layer_cache_cost"]
        out.append(f"At layer caching's cost ({100 * a['tiles_removed']:.1f}% of tiles removed), interpolated:")
        out.append("")
        out.append("| plans | PSNR dB | SSIM | prompt acc. |")
        out.append("|---|---|---|---|")
        for n in ("v2", "v1", "layer_cache"):
            out.append(f"| {n} | {a[n]['psnr_mean']:.2f} | {a[n]['ssim_mean']:.4f} | {a[n]['prompt_accuracy']:.4f} |")
        out.append("")
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="testbed2-sd3", help="a testbed folder or short name (default testbed2-sd3)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, of {', '.join(STUDIES)}")
    ap.add_argument("--deltas", default=DEFAULT_DELTAS)
    ap.add_argument("--candidates", default=DEFAULT_CANDIDATES)
    ap.add_argument("--v1-candidates", default=DEFAULT_V1_CANDIDATES,
                    help="V1's methods (cfg_share added where the model runs CFG)")
    ap.add_argument("--v1-deltas", default="0.05,0.2,0.8,3.2")
    ap.add_argument("--c-values", default="1,1.5,2,inf")
    ap.add_argument("--c-delta", type=float, default=None)
    ap.add_argument("--perturbations", type=int, default=40)
    ap.add_argument("--locality-prompts", type=int, default=16)
    ap.add_argument("--locality-steps", default="1,7,14,21,27")
    ap.add_argument("--calibration-prompts", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="default: the testbed's")
    ap.add_argument("--batch", type=int, default=64, help="captions per pipeline call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", default=None, help="a study.json: only draw its figures and tables into --out")
    ap.add_argument("--previous", default=None,
                    help="a study.json of an earlier run on the same model and settings: its studies that are not "
                         "rerun are kept (the c and compare studies read the δ sweep from it)")
    ap.add_argument("--attention-impl", default="xla",
                    help="how compressed heads run (default xla: the same images as the kernels, no kernel compiles)")
    args = ap.parse_args(argv)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    bad = [s for s in studies if s not in STUDIES]
    if bad or not studies:
        ap.error(f"--studies {args.studies!r}: expected some of {', '.join(STUDIES)}")
    args.studies = studies
    for flag in ("deltas", "v1_deltas", "c_values"):
        try:
            vals = [float(x) for x in getattr(args, flag).split(",")]
        except ValueError:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: comma-separated numbers")
        if not vals or any(not (v > 0) for v in vals):
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: every value must be > 0")
    for flag in ("perturbations", "locality_prompts", "calibration_prompts", "eval_prompts", "batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from dfa2_jax.evaluate import write_json_atomic

    if args.replot:
        import json

        with open(args.replot, encoding="utf-8") as f:
            res = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        for p in draw_plots(res, args.out):
            print(p)
        with open(os.path.join(args.out, "study.md"), "w", encoding="utf-8") as f:
            f.write(markdown(res))
        return 0

    t0 = time.perf_counter()
    os.makedirs(os.path.join(args.out, "plans"), exist_ok=True)
    st = Study(args)
    res = {"format": "dfa2-testbed-study", "version": 1, "model": args.model, "folder": st.folder,
           "settings": dataclasses.asdict(st.settings), "image_tokens": st.n_img,
           "steps": st.settings.num_inference_steps, "calibration_captions": len(st.cal),
           "evaluation_captions": len(st.ev), "dense_prompt_accuracy": float(st.dense_acc.mean()),
           "attention_impl": args.attention_impl, "seed": args.seed, "timings_s": {"dense": st.t_dense}}
    if args.previous:
        import json

        with open(args.previous, encoding="utf-8") as f:
            prev = json.load(f)
        same = ("model", "image_tokens", "steps", "calibration_captions", "evaluation_captions", "seed")
        diff = [k for k in same if prev.get(k) != res[k]]
        if diff:
            raise SystemExit(f"--previous {args.previous}: made with other settings ({', '.join(diff)})")
        res.update({k: prev[k] for k in STUDIES if k in prev and k not in args.studies})
        res["timings_s"].update({k: v for k, v in prev.get("timings_s", {}).items() if k in res})
    for name in args.studies:
        t = time.perf_counter()
        STUDIES[name](st, res)
        res["timings_s"][name] = time.perf_counter() - t
        write_json_atomic(os.path.join(args.out, "study.json"), res)  # after each study: a partial run keeps it
        with open(os.path.join(args.out, "study.md"), "w", encoding="utf-8") as f:
            f.write(markdown(res))
    res["timings_s"]["total"] = time.perf_counter() - t0
    write_json_atomic(os.path.join(args.out, "study.json"), res)
    draw_plots(res, args.out)
    text = markdown(res)
    with open(os.path.join(args.out, "study.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["timings_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
