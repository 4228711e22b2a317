"""``dfa2 plan show | import | export``: inspect plans and convert to/from the official DiTFastAttn files.

Wire into the main parser with ``add_plan_parser(subparsers)``; each subcommand sets ``fn(args) -> int`` and
raises ValueError subclasses (PlanError, OfficialFormatError, ConfigError) for user errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from dfa2_jax.plan import Plan, image_tokens, model_info_for

DEFAULT_RESOLUTION = 1024


# ============================================================================================ helpers
def parse_resolution(text) -> tuple[int, int]:
    """``"1024"`` -> (1024, 1024); ``"768x1024"`` -> (768, 1024) (height x width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(text))
    if not m:
        raise ValueError(f"--resolution {text!r}: expected R or HxW in pixels, e.g. 1024 or 768x1024")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def _res_label(res: tuple[int, int]):
    return res[0] if res[0] == res[1] else f"{res[0]}_{res[1]}"


def model_dir_info(path: str, text_tokens: int | None = None):
    """(model_info, vae_scale_factor, patch) of a model folder: the transformer config from
    ``<DIR>/transformer/config.json`` (or ``<DIR>/config.json``; a single .safetensors file is inspected), the VAE
    scale factor 2 ** (len(block_out_channels) − 1) from ``<DIR>/vae/config.json`` (8 without one), patch 2
    (SD3's patch_size; FLUX packs 2×2 latents)."""
    from dfa2_jax.models.configs import ConfigError, config_from_json

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model folder or file")
    cfg_path = next((p for p in (os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json"))
                     if os.path.isfile(p)), None)
    if cfg_path is not None:
        config = config_from_json(cfg_path)
    else:
        from dfa2_jax.transformer import config_of

        config = config_of(path)
    vae_factor = 8
    vae_cfg = os.path.join(path, "vae", "config.json") if os.path.isdir(path) else None
    if vae_cfg and os.path.isfile(vae_cfg):
        try:
            with open(vae_cfg) as f:
                blocks = json.load(f)["block_out_channels"]
            vae_factor = 2 ** (len(blocks) - 1)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{vae_cfg}: cannot read block_out_channels ({type(e).__name__}: {e})") from None
    patch = config.patch_size if config.family == "sd3" else 2
    return model_info_for(config, text_tokens), vae_factor, patch


def _calibration_resolution(plan: Plan):
    r = (plan.calibration or {}).get("resolution")
    if isinstance(r, int) and not isinstance(r, bool):
        return r, r
    if isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r):
        return tuple(r)
    return None


def resolve_image_tokens(plan: Plan, resolution, model: str | None) -> tuple[tuple[int, int], int]:
    """(resolution, N_img) for show/export: --resolution (else the plan's calibration resolution, else 1024);
    the VAE factor and patch from --model, else the image-token count the plan recorded for that resolution,
    else 8 and 2 (every released SD3 / FLUX)."""
    cal_res = _calibration_resolution(plan)
    res = parse_resolution(resolution) if resolution is not None else (cal_res or (DEFAULT_RESOLUTION,) * 2)
    if model is not None:
        _, vae, patch = model_dir_info(model)
        return res, image_tokens(res, vae, patch)
    recorded = (plan.calibration or {}).get("image_tokens")
    if cal_res == res and isinstance(recorded, int):
        return res, recorded
    return res, image_tokens(res)


# ============================================================================================ show
def short_layer(name: str) -> str:
    """``transformer_blocks.12.attn`` -> ``T12``, ``.attn2`` -> ``T12b``, ``single_transformer_blocks.3.attn`` ->
    ``S3``."""
    m = re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.attn(2?)", name)
    if not m:
        return name[-6:]
    return ("S" if m.group(1) else "T") + m.group(2) + ("b" if m.group(3) else "")


def _mix(assign: np.ndarray, n_methods: int) -> np.ndarray:
    c = np.bincount(assign.ravel(), minlength=n_methods)
    return 100.0 * c / max(1, assign.size)


def summary(plan: Plan, source: str, res, n_img: int, layer: str | None = None) -> str:
    from dfa2_jax.flops import DEFAULT_BLOCKS, kept_table, plan_stats

    m = plan.model
    stats = plan_stats(plan, n_img)
    tiles = plan_stats(plan, n_img, blocks=DEFAULT_BLOCKS)
    a = np.asarray(plan.assignment)
    nm = len(plan.methods)
    out = [f"{source}: {m['family']}, {len(m['layers'])} attention layers x {m['num_heads']} heads (head_dim "
           f"{m['head_dim']}, {m['text_tokens']} text tokens {m['text_position']}), {plan.steps} steps",
           f"methods: {', '.join(plan.methods)}"]
    if plan.calibration:
        out.append("calibration: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in plan.calibration.items()
                                               if not isinstance(v, (dict, list)) or len(json.dumps(v)) < 40))
    out.append(f"at {res[0]}x{res[1]} ({n_img} image tokens): attention FLOPs kept "
               f"{100 * stats['attention_flops_kept']:.1f}% (exact mask), "
               f"{100 * tiles['attention_flops_kept']:.1f}% ({DEFAULT_BLOCKS[0]}x{DEFAULT_BLOCKS[1]} kernel tiles); "
               f"dense {stats['attention_flops_dense'] / 1e12:.1f} TFLOP per image (all steps)")
    mix = _mix(a, nm)
    out.append("method mix: " + "  ".join(f"{name} {p:.1f}%" for name, p in zip(plan.methods, mix)))
    cols = [n for n, c in zip(plan.methods, stats["method_counts"].values()) if c] or plan.methods
    idx = [plan.methods.index(c) for c in cols]
    widths = [max(6, len(c)) for c in cols]
    lw = max(len(x) for x in m["layers"] + ["layer"])

    def row(label, pct, kept, w0):
        return (f"  {label:<{w0}} " + " ".join(f"{pct[i]:>{w}.1f}" for i, w in zip(idx, widths))
                + f" {100 * kept:>6.1f}")

    head = " ".join(f"{c:>{w}}" for c, w in zip(cols, widths)) + f" {'kept%':>6}"
    out.append(f"per layer (% of steps x heads):\n  {'layer':<{lw}} {head}")
    for li, name in enumerate(m["layers"]):
        out.append(row(name, _mix(a[:, li], nm), stats["per_layer"][li], lw))
    out.append(f"per step (% of layers x heads):\n  {'step':<5} {head}")
    for s in range(plan.steps):
        out.append(row(str(s), _mix(a[s], nm), stats["per_step"][s], 5))
    if layer is not None:
        li = _layer_index(plan, layer)
        sym = _symbols(plan.methods)
        kept = kept_table(plan, n_img)[:, li].mean(axis=0)
        out.append(f"per head of {layer} (columns: steps; " + ", ".join(f"{sym[i]}={n}" for i, n in
                                                                       enumerate(plan.methods)) + "):")
        for h in range(plan.num_heads):
            out.append(f"  head {h:>3} " + "".join(sym[i] for i in a[:, li, h]) + f"  kept {100 * kept[h]:.1f}%")
    return "\n".join(out)


def _symbols(methods: list[str]) -> list[str]:
    pool = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    return ["#" if n == "full" else "." if n == "cache" else next(pool, "?") for n in methods]


def _layer_index(plan: Plan, layer: str) -> int:
    layers = plan.model["layers"]
    if layer in layers:
        return layers.index(layer)
    shorts = [short_layer(x) for x in layers]
    if layer in shorts:
        return shorts.index(layer)
    raise ValueError(f"--layer {layer!r} is not a layer of the plan (e.g. {layers[0]!r} or {shorts[0]!r})")


# ---------------------------------------------------------------------------------------------- heat-map
CELL = 12  # px per (row, step) cell
MARGIN = 8
LABEL_W = 48  # layer / head labels
TOP = 32  # title line + step ticks
GAP = 30  # between the panels (holds the second title)
BAR_GAP = 12
LEGEND_W = 128
LEGEND_ROW = 14
MIN_PANEL_W = 240
MIN_PANEL_A_H = 100
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_PALETTE = [(230, 85, 13), (253, 174, 107), (117, 107, 177), (49, 130, 189), (158, 202, 225), (49, 163, 84),
            (161, 217, 155), (214, 39, 40), (255, 152, 150), (140, 86, 75), (227, 119, 194), (188, 189, 34)]


def heatmap_size(n_layers: int, n_steps: int, n_heads: int, n_methods: int) -> tuple[int, int]:
    """(width, height) of ``plan show --png``: panel A layers × steps, panel B heads × steps of one layer, each
    cell CELL px, with a fixed label column and a legend column on the right."""
    w = MARGIN + LABEL_W + max(n_steps * CELL, MIN_PANEL_W) + BAR_GAP + LEGEND_W + MARGIN
    h = (TOP + max(n_layers * CELL, MIN_PANEL_A_H) + GAP + max(n_heads * CELL, n_methods * LEGEND_ROW)
         + MARGIN)
    return w, h


def _viridis(x: float) -> tuple[int, int, int]:
    x = min(max(float(x), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    f = x - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(int(round(a[c] + f * (b[c] - a[c]))) for c in range(3))


def method_colours(methods: list[str]) -> list[tuple[int, int, int]]:
    it = iter(_PALETTE * 4)
    return [(215, 215, 215) if n == "full" else (25, 25, 25) if n == "cache" else next(it) for n in methods]


def render_heatmap(plan: Plan, n_img: int, path: str, *, layer: str | None = None, title: str = "") -> tuple[int, int]:
    """Draw the heat-map PNG (Pillow only); returns its size. Panel A: layers × steps coloured by the kept
    fraction of attention FLOPs (viridis, colour bar on the right); panel B: heads × steps of one layer (``layer``,
    default the most compressed one) coloured by method (legend on the right)."""
    from PIL import Image, ImageDraw, ImageFont

    from dfa2_jax.flops import kept_table

    kept = kept_table(plan, n_img)  # [T, L, H]
    a = np.asarray(plan.assignment)
    n_steps, n_layers, n_heads = a.shape
    layers = plan.model["layers"]
    per_ls = kept.mean(axis=2)  # [T, L]
    li = _layer_index(plan, layer) if layer is not None else int(np.argmin(kept.mean(axis=(0, 2))))
    size = heatmap_size(n_layers, n_steps, n_heads, len(plan.methods))
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0 = MARGIN + LABEL_W
    d.text((MARGIN, 2), title or f"attention FLOPs kept per layer and step at {n_img} image tokens", fill=(0, 0, 0),
           font=font)
    tick = 5 if n_steps > 10 else 1
    for s in range(0, n_steps, tick):
        d.text((x0 + s * CELL, TOP - 14), str(s), fill=(60, 60, 60), font=font)
    # panel A
    for l_ in range(n_layers):
        y = TOP + l_ * CELL
        d.text((MARGIN, y), short_layer(layers[l_]), fill=(0, 0, 0), font=font)
        for s in range(n_steps):
            d.rectangle([x0 + s * CELL, y, x0 + (s + 1) * CELL - 2, y + CELL - 2], fill=_viridis(per_ls[s, l_]))
    # colour bar
    bx = x0 + max(n_steps * CELL, MIN_PANEL_W) + BAR_GAP
    bh = max(n_layers * CELL, MIN_PANEL_A_H)
    for yy in range(bh):
        d.line([bx, TOP + yy, bx + 12, TOP + yy], fill=_viridis(1 - yy / max(1, bh - 1)))
    d.text((bx + 16, TOP), "1.0 full", fill=(0, 0, 0), font=font)
    d.text((bx + 16, TOP + bh // 2 - 6), "0.5", fill=(0, 0, 0), font=font)
    d.text((bx + 16, TOP + bh - 12), "0 cached", fill=(0, 0, 0), font=font)
    # panel B
    yb = TOP + bh + GAP
    d.text((MARGIN, yb - 16), f"per head: {layers[li]} (method per step)", fill=(0, 0, 0), font=font)
    colours = method_colours(plan.methods)
    for h in range(n_heads):
        y = yb + h * CELL
        d.text((MARGIN, y), f"h{h}", fill=(0, 0, 0), font=font)
        for s in range(n_steps):
            d.rectangle([x0 + s * CELL, y, x0 + (s + 1) * CELL - 2, y + CELL - 2], fill=colours[a[s, li, h]])
    for i, name in enumerate(plan.methods):
        y = yb + i * LEGEND_ROW
        d.rectangle([bx, y, bx + 10, y + 10], fill=colours[i], outline=(0, 0, 0))
        d.text((bx + 16, y), name, fill=(0, 0, 0), font=font)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    img.save(path, format="PNG")
    return size


# ============================================================================================ commands
def _cmd_show(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    res, n_img = resolve_image_tokens(plan, args.resolution, args.model)
    if args.layer is not None:
        _layer_index(plan, args.layer)
    print(summary(plan, args.plan, res, n_img, args.layer))
    if args.png:
        w, h = render_heatmap(plan, n_img, args.png, layer=args.layer,
                              title=f"{os.path.basename(args.plan)}: attention FLOPs kept at {res[0]}x{res[1]}")
        print(f"wrote {args.png} ({w}x{h})")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from dfa2_jax.official import DEFAULT_KS, import_official, import_v1

    v2 = args.head_option is not None or args.output_share is not None
    if v2 == (args.v1 is not None):
        raise ValueError("give either the official V2 files (--head-option and/or --output-share) or a V1 plan "
                         "(--v1), not both" if v2 else "nothing to import: give --head-option/--output-share or --v1")
    info, vae, patch = model_dir_info(args.model, args.text_tokens)
    if v2:
        if args.resolution is None:
            raise ValueError("--resolution is needed to turn the official windows (in tokens) into arrow:k")
        res = parse_resolution(args.resolution)
        n_img = image_tokens(res, vae, patch)
        ks = tuple(int(x) for x in args.candidates.split(",")) if args.candidates else DEFAULT_KS
        plan = import_official(args.head_option, args.output_share, info, n_img, steps=args.steps, candidates=ks,
                               resolution=list(res))
    else:
        plan = import_v1(args.v1, info, window_k=args.window_k, steps=args.steps)
        if args.resolution is not None:
            res = parse_resolution(args.resolution)
            plan.calibration = {**(plan.calibration or {}), "resolution": list(res),
                                "image_tokens": image_tokens(res, vae, patch)}
            plan.validate(n_img=plan.calibration["image_tokens"])
    plan.save(args.output)
    counts = np.bincount(np.asarray(plan.assignment).ravel(), minlength=len(plan.methods))
    print(f"wrote {args.output}: {plan.steps} steps x {plan.num_layers} layers x {plan.num_heads} heads; "
          + ", ".join(f"{m} {c}" for m, c in zip(plan.methods, counts)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dfa2_jax.official import export_official

    plan = Plan.load(args.plan)
    if args.model is not None:
        info, _, _ = model_dir_info(args.model, plan.model["text_tokens"])
        plan.validate(info)
    res, n_img = resolve_image_tokens(plan, args.resolution, args.model)
    paths = export_official(plan, args.out_dir, n_img=n_img, resolution=_res_label(res), name=args.name,
                            delta=args.delta)
    for p in paths:
        print(p)
    return 0


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``plan show|import|export`` on the main parser's subparsers."""
    p = subparsers.add_parser("plan", help="inspect a plan; import/export the official DiTFastAttn files")
    sub = p.add_subparsers(dest="plan_command", required=True)

    show = sub.add_parser("show", help="summary (FLOPs kept, method mix per layer and step) and a heat-map PNG")
    show.add_argument("plan", help="plan.json")
    show.add_argument("--resolution", default=None,
                      help="R or HxW pixels (default: the plan's calibration resolution, else 1024)")
    show.add_argument("--model", default=None, help="model folder, for its VAE scale factor (default 8)")
    show.add_argument("--png", default=None, help="write a heat-map PNG (layers x steps, and heads x steps of one "
                                                  "layer)")
    show.add_argument("--layer", default=None, help="layer for the per-head table and panel (name, or T12 / S3 / "
                                                    "T0b); default for the panel: the most compressed layer")
    show.set_defaults(fn=_cmd_show)

    imp = sub.add_parser("import", help="official DiTFastAttnV2 (or V1) plan files -> plan.json")
    imp.add_argument("--head-option", default=None, help="{model}_{res}_head_option_{delta}.json")
    imp.add_argument("--output-share", default=None, help="{model}_{res}_outputshare_option_{delta}.json")
    imp.add_argument("--v1", default=None, help="a DiTFastAttn (V1) plan instead")
    imp.add_argument("--model", required=True, help="model folder (transformer/config.json, vae/config.json)")
    imp.add_argument("--resolution", default=None, help="R or HxW pixels the official files were made for")
    imp.add_argument("--steps", type=int, default=None, help="number of steps (default: the files' last step + 1)")
    imp.add_argument("--text-tokens", type=int, default=None, help="text length (default SD3 333, FLUX 512)")
    imp.add_argument("--candidates", default=None, help="preferred arrow k values, comma-separated (8,16,32)")
    imp.add_argument("--window-k", type=int, default=8, help="V1: wars:k for residual_window_attn (default 8)")
    imp.add_argument("-o", "--output", required=True, help="plan.json to write")
    imp.set_defaults(fn=_cmd_import)

    exp = sub.add_parser("export", help="plan.json -> official DiTFastAttnV2 head_option / outputshare files")
    exp.add_argument("plan", help="plan.json")
    exp.add_argument("--resolution", default=None, help="R or HxW pixels (default: the plan's calibration "
                                                        "resolution)")
    exp.add_argument("--out-dir", required=True)
    exp.add_argument("--name", default=None, help="model name in the file names (default: the family)")
    exp.add_argument("--delta", default=None, help="delta in the file names (default: the plan's calibration delta)")
    exp.add_argument("--model", default=None, help="model folder: check the plan against it; its VAE scale factor")
    exp.set_defaults(fn=_cmd_export)
    return p


__all__ = ["add_plan_parser", "summary", "render_heatmap", "heatmap_size", "model_dir_info", "parse_resolution",
           "resolve_image_tokens", "short_layer"]
