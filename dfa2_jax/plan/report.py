"""What a plan looks like: a text summary (FLOPs kept, method mix per layer, step and head) and a heat-map PNG
(Pillow only). ``dfa2 plan show`` prints and draws these; the demo and the testbed sweep draw them too."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from dfa2_jax.plan.format import Plan


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


def method_mix(plan: Plan) -> dict:
    """Fractions of the (step >= 1, layer, head) slots per method name: ``overall``, ``per_step`` (index t is
    step t + 1) and ``per_layer`` (step 0 is always full, so it is left out)."""
    a = np.asarray(plan.assignment)[1:]
    names = list(plan.methods)

    def frac(x):
        return {n: float(np.mean(x == i)) for i, n in enumerate(names)}

    return {"overall": frac(a), "per_step": [frac(a[t]) for t in range(a.shape[0])],
            "per_layer": [frac(a[:, li]) for li in range(a.shape[1])]}


def summary(plan: Plan, source: str, res, n_img: int, layer: str | None = None) -> str:
    from dfa2_jax.plan.flops import DEFAULT_BLOCKS, kept_table, plan_stats

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
        li = layer_index(plan, layer)
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


def layer_index(plan: Plan, layer: str) -> int:
    """Index of ``layer`` (a layer name or its short form, :func:`short_layer`) among the plan's layers."""
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

    from dfa2_jax.plan.flops import kept_table

    kept = kept_table(plan, n_img)  # [T, L, H]
    a = np.asarray(plan.assignment)
    n_steps, n_layers, n_heads = a.shape
    layers = plan.model["layers"]
    per_ls = kept.mean(axis=2)  # [T, L]
    li = layer_index(plan, layer) if layer is not None else int(np.argmin(kept.mean(axis=(0, 2))))
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


__all__ = ["summary", "method_mix", "render_heatmap", "heatmap_size", "method_colours", "short_layer", "layer_index"]
