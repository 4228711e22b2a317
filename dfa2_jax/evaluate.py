"""``dfa2 eval``: dense vs compressed images from the same noise, with image-quality metrics and cost.

    >>> pipe = dfa2_jax.pipeline.load_pipeline("/models/FLUX.1-dev", dtype="bfloat16")
    >>> report = evaluate(pipe, "plan.json", ["a red fox in the snow"], seed=0, out_dir="eval_out")
    >>> report["mean"]["psnr"], report["attention_flops_kept"]["tiles"]

Noise: prompt i starts from the noise the pipeline itself draws for a batch of one with seed ``seed + i``
(``jax.random.normal(jax.random.key(seed + i), ...)``; FLUX packed afterwards), passed as ``latents=`` to both the
dense and the compressed run. So the two runs share their noise exactly, an image does not depend on how the
prompts are batched, and the dense image i is what ``dfa2 generate --prompt <prompt i> --seed <seed + i>`` makes.

Metrics (numpy, float64): PSNR and SSIM on the uint8 RGB images. SSIM is Wang et al. 2004 as scikit-image's
``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
channel_axis=-1)`` computes it: K1 = 0.01, K2 = 0.03, a separable Gaussian window of σ = 1.5 truncated at 3.5σ
(radius int(3.5·1.5 + 0.5) = 5, 11 taps, weights normalised to sum 1), population (co)variances, the SSIM map
averaged over the region at least 5 pixels from every border (skimage's ``crop(S, pad)``), then over channels.
Because the cropped region never reads a padded pixel, no border mode is needed: the filter is a "valid"
correlation.

LPIPS and CLIP score (:func:`image_metrics`) use weights from a local metrics folder (``metrics_dir``, default
``$DFA2_METRICS_DIR``); nothing is ever downloaded. LPIPS v0.1 (:mod:`dfa2_jax.metrics.lpips`, net ``lpips_net``,
default alex) compares each dense image with its compressed one; its files are
``<metrics_dir>/lpips/alexnet-owt-7be5be79.pth`` (or ``vgg16-397923af.pth``) and
``<metrics_dir>/lpips/v0.1/alex.pth`` (or ``vgg.pth``). The CLIP score (:mod:`dfa2_jax.metrics.clip_score`,
100·max(cos, 0)) scores each dense and each compressed image with its prompt, with the first transformers
``CLIPModel`` folder of :data:`CLIP_FOLDERS` under ``metrics_dir`` (config.json, model.safetensors, tokenizer
files, optionally preprocessor_config.json). A metric whose files are missing is null, and ``lpips_skipped`` /
``clip_score_skipped`` names the missing file or folder by its full path.

Prompt accuracy (the procedural testbed, :mod:`dfa2_jax.testbed`): when every prompt is a testbed world caption
(``dfa2_jax.testbed.world.parse_caption`` accepts it), the shipped testbed classifier reads each dense and
compressed image (box-resized to 64x64) and scores the fraction of its caption's attributes it satisfies
(:func:`dfa2_jax.testbed.classifier.prompt_accuracy`); otherwise ``prompt_accuracy`` is null and
``prompt_accuracy_skipped`` says why.

Timings are the wall time of the pipeline calls for all prompts (text encoding, the scanned sampler, VAE decode).
The first call of each kind includes jit compilation (unless this process already compiled the same shapes and
plan structure); with ``repeat >= 2`` the later calls are timed again and their minimum is the compile-excluded
("steady") time. The calls alternate dense, compressed, dense, compressed, ...
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dfa2_jax.atomic import write_atomic

SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
KERNEL_BLOCKS = (128, 64)  # the arrow kernel's (block_q, block_k): dfa2_jax.plan.flops.DEFAULT_BLOCKS
LABEL_H = 14  # px of the label band above every row of grid.png
METRICS_ENV = "DFA2_METRICS_DIR"  # the metrics folder when no metrics_dir is given (a path setting)
LPIPS_NET = "alex"  # the lpips package's default net; files: dfa2_jax.metrics.lpips.lpips_files(metrics_dir, net)
# CLIP score model folders under metrics_dir (openai/clip-vit-* snapshots), the first one present is used;
# ViT-L/14 first: torchmetrics' CLIPScore default
CLIP_FOLDERS = ("clip-vit-large-patch14", "clip-vit-base-patch16", "clip-vit-base-patch32")


class EvalError(ValueError):
    """A user error of ``dfa2 eval`` (bad prompts file, empty prompt list, bad sizes, ...)."""


# ================================================================================================ metrics
def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images have different shapes {a.shape} and {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {a.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a, b, data_range: float = 255) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(data_range² / MSE) (skimage's ``peak_signal_noise_ratio``);
    ``inf`` for identical images."""
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10(float(data_range) ** 2 / mse))


def gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate·σ + 0.5), exp(−x²/2σ²) normalised to sum 1."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _valid_filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable correlation of x [H, W, ...] with taps w over the first two axes, "valid" region only."""
    n = len(w)
    h = x.shape[0] - n + 1
    out = sum(w[k] * x[k:k + h] for k in range(n))
    wd = x.shape[1] - n + 1
    return sum(w[k] * out[:, k:k + wd] for k in range(n))


def ssim(a, b, data_range: float = 255) -> float:
    """Mean structural similarity (Wang et al. 2004), as skimage's ``structural_similarity(a, b,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range, channel_axis=-1)``
    for HxWxC images (HxW: one channel). 1.0 for identical images. Needs H, W >= 11."""
    x, y = _pair(a, b)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    w = gaussian_taps()
    if min(x.shape[:2]) < len(w):
        raise ValueError(f"SSIM needs images of at least {len(w)}x{len(w)} pixels (the Gaussian window), got "
                         f"{x.shape[0]}x{x.shape[1]}")
    ux, uy = _valid_filter(x, w), _valid_filter(y, w)
    vx = _valid_filter(x * x, w) - ux * ux
    vy = _valid_filter(y * y, w) - uy * uy
    vxy = _valid_filter(x * y, w) - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(np.mean(s.mean(axis=(0, 1), dtype=np.float64)))


# ================================================================================================ inputs
def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped; surrounding whitespace is
    stripped. An empty list raises :class:`EvalError` naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise EvalError(f"{path}: no such prompts file") from None
    except IsADirectoryError:
        raise EvalError(f"{path}: is a folder, not a prompts file") from None
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not a UTF-8 text file (expected one prompt per line)") from None
    prompts = [s.strip() for s in lines]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise EvalError(f"{path}: no prompts (one prompt per line; blank lines and # comments are skipped)")
    return prompts


def default_resolution(pipe, plan=None) -> tuple[int, int]:
    """(height, width): the plan's calibration resolution when it records one, else the pipeline's default
    (SD3: sample_size · vae_scale_factor; FLUX: 128 · vae_scale_factor)."""
    r = ((plan.calibration or {}) if plan is not None else {}).get("resolution")
    if isinstance(r, int) and not isinstance(r, bool) and r > 0:
        return r, r
    if isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) and x > 0 for x in r):
        return int(r[0]), int(r[1])
    cfg = pipe.transformer.config
    base = cfg.sample_size if pipe.family == "sd3" else 128
    return base * pipe.vae_scale_factor, base * pipe.vae_scale_factor


def image_token_count(pipe, height: int, width: int) -> int:
    """N_img of the pipeline at height x width (SD3: patch_size² patches of the latent; FLUX: 2x2 packing)."""
    p = pipe.transformer.config.patch_size if pipe.family == "sd3" else 2
    f = pipe.vae_scale_factor
    return (height // f // p) * (width // f // p)


def text_token_count(pipe, max_sequence_length: int | None = None) -> int:
    """Text tokens in the joint attention: SD3 CLIP length (77) + T5 length; FLUX the T5 length."""
    if max_sequence_length is None:
        max_sequence_length = inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default
    if pipe.family == "sd3":
        clip = getattr(pipe.tokenizers["text_encoder"], "model_max_length", 77) or 77
        return int(clip) + int(max_sequence_length)
    return int(max_sequence_length)


def initial_noise(pipe, height: int, width: int, seed: int) -> np.ndarray:
    """The noise ``pipe(prompt, height=, width=, seed=seed)`` draws for one prompt, in the layout its
    ``latents=`` takes (SD3 [1, C, H/f, W/f]; FLUX packed [1, N, 4C])."""
    import jax
    import jax.numpy as jnp

    cfg = pipe.transformer.config
    f = pipe.vae_scale_factor
    h, w = height // f, width // f
    if pipe.family == "sd3":
        return np.asarray(jax.random.normal(jax.random.key(seed), (1, cfg.in_channels, h, w), jnp.float32))
    from dfa2_jax.pipeline import pack_latents

    noise = jax.random.normal(jax.random.key(seed), (1, cfg.in_channels // 4, h, w), jnp.float32)
    return pack_latents(np.asarray(noise))


def metrics_status(metrics_dir: str | os.PathLike | None = None, lpips_net: str = LPIPS_NET) -> dict[str, Any]:
    """Which weight-based metrics can run, from files only (nothing is loaded or downloaded):
    ``{"metrics_dir", "lpips_files": [backbone, heads] | None, "lpips_skipped": reason | None, "clip_folder":
    folder | None, "clip_score_skipped": reason | None}``. A reason names the missing file or folder by its full
    path. ``metrics_dir`` defaults to ``$DFA2_METRICS_DIR``."""
    from dfa2_jax.metrics.clip_score import missing_clip_file
    from dfa2_jax.metrics.lpips import lpips_files

    folder = os.fspath(metrics_dir) if metrics_dir is not None else os.environ.get("DFA2_METRICS_DIR") or None
    out: dict[str, Any] = {"metrics_dir": folder, "lpips_files": None, "lpips_skipped": None, "clip_folder": None,
                           "clip_score_skipped": None}
    if folder is None:
        out["lpips_skipped"] = out["clip_score_skipped"] = (f"no --metrics-dir or ${METRICS_ENV} given; never "
                                                            "downloaded")
        return out
    files = list(lpips_files(folder, lpips_net))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        out["lpips_skipped"] = (f"missing {' and '.join(missing)} (LPIPS-{lpips_net}: torchvision's backbone "
                                "checkpoint and the lpips v0.1 head file, see dfa2_jax.metrics.lpips); never "
                                "downloaded")
    else:
        out["lpips_files"] = files
    clip = next((os.path.join(folder, n) for n in CLIP_FOLDERS if os.path.isdir(os.path.join(folder, n))), None)
    if clip is None:
        others = ", ".join(CLIP_FOLDERS[1:])
        out["clip_score_skipped"] = (f"missing {os.path.join(folder, CLIP_FOLDERS[0])} (or {others} there): a "
                                     "transformers CLIPModel folder; never downloaded")
    elif (lack := missing_clip_file(clip)) is not None:
        out["clip_score_skipped"] = f"missing {lack} (the CLIP score folder {clip}); never downloaded"
    else:
        out["clip_folder"] = clip
    return out


def image_metrics(prompts: Sequence[str], images: dict[str, Sequence],
                  metrics_dir: str | os.PathLike | None = None, lpips_net: str = LPIPS_NET) -> dict[str, Any]:
    """The report's ``lpips`` and ``clip_score`` entries (with ``metrics_dir``) for ``images`` = {"dense": [...],
    "compressed": [...]} (PIL or uint8 arrays): LPIPS of each dense image against its compressed one, per image and
    mean; the CLIP score of each image with its prompt, per image and mean for each kind. A metric that cannot run
    is null with ``<key>_skipped`` saying why (missing files by full path, a weights file that does not load,
    images too small for the net)."""
    st = metrics_status(metrics_dir, lpips_net)
    out: dict[str, Any] = {"metrics_dir": st["metrics_dir"], "lpips": None, "clip_score": None}
    if st["lpips_files"] is None:
        out["lpips_skipped"] = st["lpips_skipped"]
    else:
        from dfa2_jax.metrics import lpips

        try:
            cfg, graphdef, state = lpips.load_lpips(*st["lpips_files"], net=lpips_net)
            per = lpips.lpips_images(cfg, graphdef, state, images["dense"], images["compressed"])
            out["lpips"] = {"what": f"LPIPS v0.1 ({lpips_net}) of each compressed image against its dense one "
                                    "(0: identical; lower is closer)",
                            "net": lpips_net, "weights": st["lpips_files"], "per_image": [float(v) for v in per],
                            "mean": float(np.mean(per))}
        except (ValueError, OSError) as e:  # a bad weights file (the message names it), images too small
            out["lpips_skipped"] = f"LPIPS: {e}"
    if st["clip_folder"] is None:
        out["clip_score_skipped"] = st["clip_score_skipped"]
    else:
        from dfa2_jax.metrics import clip_score

        try:
            scorer = clip_score.load_clip_scorer(st["clip_folder"])
            per = {kind: clip_score.clip_scores(scorer, ims, prompts) for kind, ims in images.items()}
            out["clip_score"] = {"what": "CLIP score 100·max(cos(image embedding, prompt embedding), 0) of each "
                                         "image with its prompt (higher: closer to the prompt)",
                                 "model": st["clip_folder"], **{k: [float(v) for v in p] for k, p in per.items()},
                                 "mean": {k: float(np.mean(p)) for k, p in per.items()}}
        except (ValueError, OSError) as e:
            out["clip_score_skipped"] = f"CLIP score: {e}"
    return out


def testbed_prompt_accuracy(prompts: Sequence[str], images: dict[str, Sequence],
                            classifier: str | os.PathLike | None = None) -> dict[str, Any]:
    """The report's ``prompt_accuracy`` entry: per image and mean testbed prompt accuracy of each kind of image
    (``images``: {"dense": [...], "compressed": [...]}, PIL or uint8 arrays), or null with
    ``prompt_accuracy_skipped`` saying why (a prompt that is not a world caption, images smaller than 64x64,
    no classifier weights). ``classifier``: a weights file (default: the shipped one)."""
    from dfa2_jax.testbed import world

    worlds = [world.detect_world(p) for p in prompts]
    for i, (p, w) in enumerate(zip(prompts, worlds)):
        if w is None:
            try:
                world.parse_caption(p)  # the v1 parser's message names the first bad word
            except ValueError as e:
                return {"prompt_accuracy": None,
                        "prompt_accuracy_skipped": f"prompt {i} is not a testbed world caption: {e}"}
        if w != worlds[0]:
            return {"prompt_accuracy": None,
                    "prompt_accuracy_skipped": f"prompt {i} is a {w} world caption, prompt 0 a {worlds[0]} one"}
    from dfa2_jax.testbed import classifier as tc

    try:
        clf = tc.load_classifier(classifier, world=worlds[0])
    except (FileNotFoundError, ValueError) as e:  # no weights, a bad weights file
        return {"prompt_accuracy": None, "prompt_accuracy_skipped": f"testbed classifier: {e}"}
    per = {}
    for kind, ims in images.items():
        try:
            per[kind] = tc.prompt_accuracy(ims, prompts, classifier=clf)
        except ValueError as e:  # images below 64x64, not RGB
            return {"prompt_accuracy": None, "prompt_accuracy_skipped": f"{kind} images: {e}"}
    entry: dict[str, Any] = {
        "what": "fraction of each caption's attributes the image satisfies (per object: present in its cell, "
                "shape, colour, size; the background; each object seen in a cell the caption leaves empty is one "
                "more failed attribute), read by the testbed classifier of the captions' world on the image box-resized to its size",
        "classifier": clf.path,
        **{kind: [float(v) for v in acc] for kind, acc in per.items()},
        "mean": {kind: float(np.mean(acc)) for kind, acc in per.items()},
    }
    return {"prompt_accuracy": entry}


# ================================================================================================ outputs
def make_grid(dense: Sequence, compressed: Sequence, labels: Sequence[tuple[str, str]] | None = None):
    """A PIL image: one row per prompt, dense | compressed, each row under a LABEL_H-pixel label band.
    Size (2·W, n·(H + LABEL_H))."""
    from PIL import Image, ImageDraw, ImageFont

    if len(dense) != len(compressed) or not dense:
        raise ValueError(f"make_grid: {len(dense)} dense and {len(compressed)} compressed images")
    w, h = dense[0].size
    grid = Image.new("RGB", (2 * w, len(dense) * (h + LABEL_H)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (d, c) in enumerate(zip(dense, compressed)):
        y = i * (h + LABEL_H)
        left, right = labels[i] if labels is not None else (f"{i} dense", f"{i} compressed")
        draw.text((2, y + 1), left, fill=(0, 0, 0), font=font)
        draw.text((w + 2, y + 1), right, fill=(0, 0, 0), font=font)
        grid.paste(d.convert("RGB"), (0, y + LABEL_H))
        grid.paste(c.convert("RGB"), (w, y + LABEL_H))
    return grid


def _jsonable(x):
    """inf / nan -> "inf" / "-inf" / "nan" (strict JSON has no such numbers); numpy -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON via a temp file in the same folder + os.replace (inf written as "inf")."""
    write_atomic(path, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib

    import dfa2_jax

    dev = jax.devices()[0]
    return {"dfa2_jax": dfa2_jax.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count()}


# ================================================================================================ evaluate
def _fmt_psnr(p: float) -> str:
    return "inf" if math.isinf(p) else f"{p:.2f}"


def evaluate(pipe, plan, prompts: Sequence[str], *, seed: int = 0, height: int | None = None,
             width: int | None = None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
             out_dir: str | os.PathLike | None = None, batch_size: int | None = None, repeat: int = 2,
             max_sequence_length: int | None = None, metrics_dir: str | os.PathLike | None = None,
             model: str | None = None, progress: bool = False,
             log: Callable[[str], None] | None = None,
             testbed_classifier: str | os.PathLike | None = None, attention_impl: str = "auto",
             lpips_net: str = LPIPS_NET) -> dict[str, Any]:
    """Dense and compressed (``plan``: a :class:`dfa2_jax.plan.Plan` or a plan file) images of ``prompts`` from
    the same noise (prompt i: seed + i), compared per image (PSNR, SSIM) and on average, with the plan's
    attention FLOPs kept at the actual token counts and the wall time of both.

    ``num_inference_steps`` defaults to the plan's steps; ``height``/``width`` to the plan's calibration
    resolution, else the pipeline's default. ``batch_size`` prompts per pipeline call (default: all at once).
    ``repeat``: calls of each kind (>= 1); the first includes compilation, the minimum of the others is the
    steady time. ``out_dir``: also write ``dense_<i>.png``, ``compressed_<i>.png``, ``grid.png`` and
    ``report.json`` (atomically). ``model``: a name or path for the report. ``log``: called with progress lines.
    ``testbed_classifier``: weights for the testbed prompt accuracy (default: the shipped file; used only when
    every prompt is a testbed world caption). ``metrics_dir`` (default ``$DFA2_METRICS_DIR``) and ``lpips_net``
    ("alex" or "vgg"): LPIPS and CLIP score weights (:func:`image_metrics`).

    Returns the report (as written to report.json, with float inf for PSNR of identical images) plus
    ``"images": {"dense": [PIL], "compressed": [PIL]}`` and, with ``out_dir``, ``"report_path"``.
    """
    from dfa2_jax.plan.flops import plan_stats
    from dfa2_jax.plan import Plan

    say = log or (lambda _msg: None)
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise EvalError("no prompts to evaluate")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise EvalError(f"prompts must be strings, got {type(bad[0]).__name__}")
    if repeat < 1:
        raise EvalError(f"repeat = {repeat} must be >= 1")
    batch_size = len(prompts) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise EvalError(f"batch size {batch_size} must be >= 1")
    if testbed_classifier is not None and not os.path.isfile(testbed_classifier):
        raise EvalError(f"{os.fspath(testbed_classifier)}: no such testbed classifier weights file")

    plan_path = None
    if not isinstance(plan, Plan):
        plan_path = os.fspath(plan)
        plan = Plan.load(plan_path)
    steps = plan.steps if num_inference_steps is None else int(num_inference_steps)
    from dfa2_jax.defaults import pipeline_defaults  # None: the model's defaults, as the pipeline would take them

    gd = pipeline_defaults(pipe)
    guidance_scale = gd.guidance_scale if guidance_scale is None else guidance_scale
    max_sequence_length = gd.max_sequence_length if max_sequence_length is None else max_sequence_length
    dh, dw = default_resolution(pipe, plan)
    height, width = int(height or dh), int(width or dw)
    if height <= 0 or width <= 0:
        raise EvalError(f"height={height} and width={width} must be positive")
    pipe._check_size(height, width)
    n_img = image_token_count(pipe, height, width)
    if pipe.family == "sd3":
        g_eff = pipe.default_guidance if guidance_scale is None else float(guidance_scale)
        do_cfg = g_eff > 1.0
    else:
        if guidance_scale is not None and not pipe.transformer.config.guidance_embeds:
            raise EvalError("this FLUX model has no guidance embedding (FLUX.1-schnell): do not pass a guidance "
                            "scale")
        g_eff = (3.5 if guidance_scale is None else float(guidance_scale)) if \
            pipe.transformer.config.guidance_embeds else None
        do_cfg = False
    # validate the plan against the model, steps, resolution and CFG before the (long) dense run
    pipe.plan_arrays(plan, n_img, steps, do_cfg)
    text_len = text_token_count(pipe, max_sequence_length)

    kwargs: dict[str, Any] = dict(height=height, width=width, num_inference_steps=steps,
                                  guidance_scale=guidance_scale, progress=progress)
    if max_sequence_length is not None:
        kwargs["max_sequence_length"] = int(max_sequence_length)
    noise = [initial_noise(pipe, height, width, seed + i) for i in range(len(prompts))]
    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]

    def run(kind: str, r: int):
        images, t0 = [], time.perf_counter()
        for bi, idx in enumerate(batches):
            out = pipe([prompts[i] for i in idx], latents=np.concatenate([noise[i] for i in idx]),
                       plan=None if kind == "dense" else plan, attention_impl=attention_impl, **kwargs)
            images += out.images
        dt = time.perf_counter() - t0
        say(f"{kind} run {r + 1}/{repeat}: {len(prompts)} image(s) in {dt:.2f} s"
            + (" (compile included)" if r == 0 else ""))
        return images, dt

    times: dict[str, list[float]] = {"dense": [], "compressed": []}
    images: dict[str, list] = {}
    identical_repeats = True
    for r in range(repeat):
        for kind in ("dense", "compressed"):
            ims, dt = run(kind, r)
            times[kind].append(dt)
            if r == 0:
                images[kind] = ims
            else:
                identical_repeats &= all(np.array_equal(np.asarray(a), np.asarray(b))
                                         for a, b in zip(images[kind], ims))

    per_image = []
    for i, (d, c) in enumerate(zip(images["dense"], images["compressed"])):
        per_image.append({"index": i, "prompt": prompts[i], "seed": seed + i, "psnr": psnr(d, c), "ssim": ssim(d, c),
                          "identical": bool(np.array_equal(np.asarray(d), np.asarray(c)))})
    mean = {"psnr": float(np.mean([p["psnr"] for p in per_image])),
            "ssim": float(np.mean([p["ssim"] for p in per_image]))}

    flops_plan = dataclasses.replace(plan, model={**plan.model, "text_tokens": text_len})
    tiles = plan_stats(flops_plan, n_img, blocks=KERNEL_BLOCKS)
    exact = plan_stats(flops_plan, n_img)

    def timing(kind: str) -> dict[str, Any]:
        t = times[kind]
        return {"first_s": t[0], "repeats_s": t[1:], "steady_s": min(t[1:]) if len(t) > 1 else None}

    td, tc = timing("dense"), timing("compressed")
    cfg = pipe.transformer.config
    report: dict[str, Any] = {
        "format": "dfa2-eval", "version": 1,
        "model": {"name": model if model is not None else cfg.diffusers_class, "family": pipe.family,
                  "class": cfg.diffusers_class, "dtype": str(np.dtype(pipe.dtype))},
        "plan": {"path": plan_path, "source": plan.source, "steps": plan.steps, "methods": list(plan.methods),
                 "method_counts": exact["method_counts"]},
        "prompts": prompts, "seed": seed,
        "noise": "prompt i: jax.random.normal(jax.random.key(seed + i)) as the pipeline draws it for one prompt; "
                 "the same latents for dense and compressed",
        "resolution": [height, width], "steps": steps, "guidance_scale": g_eff, "cfg": do_cfg,
        "image_tokens": n_img, "text_tokens": text_len, "batch_size": batch_size,
        "per_image": per_image, "mean": mean,
        "attention_flops_kept": {"tiles": tiles["attention_flops_kept"], "exact": exact["attention_flops_kept"],
                                 "blocks": list(KERNEL_BLOCKS),
                                 "dense_flops_per_image": exact["attention_flops_dense"]},
        "timings": {"what": "wall time of the pipeline calls for all prompts (text encoding, sampler, VAE decode); "
                            "first_s includes jit compilation, steady_s is the minimum of the repeats",
                    "dense": td, "compressed": tc,
                    "speedup_first": td["first_s"] / tc["first_s"] if tc["first_s"] > 0 else None,
                    "speedup_steady": (td["steady_s"] / tc["steady_s"]
                                       if td["steady_s"] is not None and tc["steady_s"] else None),
                    "repeats_identical": identical_repeats if repeat > 1 else None},
        **image_metrics(prompts, images, metrics_dir, lpips_net),
        **testbed_prompt_accuracy(prompts, images, testbed_classifier),
        "versions": _versions(),
    }
    result = dict(report)
    result["images"] = images
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        for i, (d, c) in enumerate(zip(images["dense"], images["compressed"])):
            d.save(os.path.join(out_dir, f"dense_{i}.png"))
            c.save(os.path.join(out_dir, f"compressed_{i}.png"))
        labels = [(f"{i} dense", f"{i} compressed {_fmt_psnr(p['psnr'])} dB {p['ssim']:.3f}")
                  for i, p in enumerate(per_image)]
        make_grid(images["dense"], images["compressed"], labels).save(os.path.join(out_dir, "grid.png"))
        report["files"] = {"grid": "grid.png", "dense": [f"dense_{i}.png" for i in range(len(prompts))],
                           "compressed": [f"compressed_{i}.png" for i in range(len(prompts))]}
        path = os.path.join(out_dir, "report.json")
        write_json_atomic(path, report)
        result["files"] = report["files"]
        result["report_path"] = path
    return result


def format_table(report: dict[str, Any]) -> str:
    """A short text summary of an evaluation report: per image PSNR / SSIM (and testbed prompt accuracy when the
    report has it), means, FLOPs kept, times."""
    pa = report.get("prompt_accuracy")
    lines = [f"{report['model']['name']} ({report['model']['family']}), {report['resolution'][0]}x"
             f"{report['resolution'][1]}, {report['steps']} steps, seed {report['seed']}, plan "
             f"{report['plan']['path'] or report['plan']['source']}",
             f"  {'#':>3} {'PSNR dB':>8} {'SSIM':>7}" + (f" {'acc D':>6} {'acc C':>6}" if pa else "") + "  prompt"]
    for p in report["per_image"]:
        prompt = p["prompt"] if len(p["prompt"]) <= 48 else p["prompt"][:45] + "..."
        acc = f" {pa['dense'][p['index']]:>6.3f} {pa['compressed'][p['index']]:>6.3f}" if pa else ""
        lines.append(f"  {p['index']:>3} {_fmt_psnr(p['psnr']):>8} {p['ssim']:>7.4f}{acc}  {prompt}")
    m = report["mean"]
    acc = f" {pa['mean']['dense']:>6.3f} {pa['mean']['compressed']:>6.3f}" if pa else ""
    lines.append(f"  {'mean':>3} {_fmt_psnr(m['psnr']):>8} {m['ssim']:>7.4f}{acc}")
    if pa:
        lines.append("acc D / acc C: testbed prompt accuracy of the dense / compressed image (fraction of the "
                     "caption's attributes the testbed classifier sees)")
    f = report["attention_flops_kept"]
    lines.append(f"attention FLOPs kept: {100 * f['tiles']:.1f}% ({f['blocks'][0]}x{f['blocks'][1]} kernel tiles), "
                 f"{100 * f['exact']:.1f}% (exact mask) at {report['image_tokens']} image + "
                 f"{report['text_tokens']} text tokens")
    t = report["timings"]

    def tm(d):
        s = f"{d['first_s']:.2f} s with compile"
        return s + (f", {d['steady_s']:.2f} s steady" if d["steady_s"] is not None else "")

    lines.append(f"time: dense {tm(t['dense'])}; compressed {tm(t['compressed'])}"
                 + (f"; speedup {t['speedup_steady']:.2f}x" if t["speedup_steady"] else ""))
    lp, cs = report.get("lpips"), report.get("clip_score")
    if lp is not None:
        lines.append(f"lpips ({lp['net']}, compressed vs dense): mean {lp['mean']:.4f}")
    if cs is not None:
        lines.append(f"clip score ({os.path.basename(cs['model'])}): dense {cs['mean']['dense']:.2f}, "
                     f"compressed {cs['mean']['compressed']:.2f}")
    for key in ("lpips", "clip_score"):
        if report.get(key) is None:
            lines.append(f"{key}: skipped ({report.get(key + '_skipped')})")
    if pa is None and "prompt_accuracy_skipped" in report:
        lines.append(f"prompt_accuracy: skipped ({report['prompt_accuracy_skipped']})")
    return "\n".join(lines)


__all__ = ["EvalError", "psnr", "ssim", "gaussian_taps", "read_prompts", "evaluate", "format_table", "make_grid",
           "initial_noise", "metrics_status", "image_metrics", "default_resolution", "image_token_count",
           "text_token_count", "write_json_atomic", "testbed_prompt_accuracy", "LABEL_H", "KERNEL_BLOCKS",
           "CLIP_FOLDERS", "LPIPS_NET", "METRICS_ENV"]
