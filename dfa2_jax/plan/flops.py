"""Attention FLOPs accounting per head and method: exact allowed-pair counts of the arrow mask and the number of
(block_q × block_k) tiles a block-sparse kernel visits, both in closed form (no S×S mask is built).

Sequence of S = N_img + T tokens, text first (FLUX) or last (SD3). The arrow mask (methods.arrow_mask) allows
(i, j) iff i is text, or j is text, or both are image tokens with |img(i) − img(j)| ≤ w. Dense attention costs
4·S²·head_dim FLOPs per head (QKᵀ and PV, 2 FLOPs per multiply-add); every method's cost is a fraction of it.
"""

from __future__ import annotations

import numpy as np

from dfa2_jax.plan.methods import ARROW, CACHE, CFG_SHARE, CFG_SHARE_ARROW, FULL, WARS, Method, parse_method

DEFAULT_BLOCKS = (128, 64)  # (block_q, block_k) of the arrow kernel (official FA2 fork: 128×64 tiles at hdim 128)


def attention_flops(n_img: int, text_len: int, head_dim: int) -> int:
    """Dense attention FLOPs of one head for one batch element: 4·S²·head_dim."""
    s = n_img + text_len
    return 4 * s * s * head_dim


def band_pairs(n: int, w: int) -> int:
    """#(i, j) in [0, n)² with |i − j| ≤ w (w < 0: all n² pairs)."""
    if w < 0:
        return n * n
    m = min(w, n - 1) if n > 0 else 0
    return n + 2 * (m * n - m * (m + 1) // 2)


def arrow_pairs(n_img: int, text_len: int, half_window: int) -> int:
    """Allowed pairs of the arrow mask: S² − N_img² + band(N_img, w). Independent of the token order."""
    s = n_img + text_len
    if half_window < 0:
        return s * s
    return s * s - n_img * n_img + band_pairs(n_img, half_window)


def _block_range(lo: int, hi: int, b: int) -> tuple[int, int]:
    """Block indices [first, last] (inclusive) covering positions [lo, hi] (inclusive); empty if hi < lo."""
    if hi < lo:
        return 0, -1
    return lo // b, hi // b


def _union_len(r1: tuple[int, int], r2: tuple[int, int]) -> int:
    n1, n2 = max(0, r1[1] - r1[0] + 1), max(0, r2[1] - r2[0] + 1)
    inter = max(0, min(r1[1], r2[1]) - max(r1[0], r2[0]) + 1) if n1 and n2 else 0
    return n1 + n2 - inter


def arrow_tiles(n_img: int, text_len: int, text_first: bool, half_window: int,
                blocks: tuple[int, int] = DEFAULT_BLOCKS) -> int:
    """Number of (block_q × block_k) tiles of the S × S score matrix holding at least one allowed pair.

    Tiles are laid on the unpadded sequence (the last row/column of tiles may be partial): ⌈S/bq⌉·⌈S/bk⌉ in
    all. O(S / block_q): for every query block the visited key blocks are the text key blocks united with the
    key blocks that meet the band of its image rows.
    """
    bq, bk = blocks
    s = n_img + text_len
    nq, nk = -(-s // bq), -(-s // bk)
    if half_window < 0 or s == 0:
        return nq * nk
    off = text_len if text_first else 0  # sequence position of image token 0
    t_lo, t_hi = (0, text_len - 1) if text_first else (n_img, s - 1)  # text positions, inclusive
    text_kblocks = _block_range(t_lo, t_hi, bk)
    total = 0
    for qb in range(nq):
        q0, q1 = qb * bq, min((qb + 1) * bq, s) - 1  # inclusive
        if text_len and not (q1 < t_lo or q0 > t_hi):  # a text row sees every key
            total += nk
            continue
        a0, a1 = q0 - off, q1 - off  # image indices of the rows
        lo, hi = max(a0 - half_window, 0) + off, min(a1 + half_window, n_img - 1) + off
        total += _union_len(text_kblocks, _block_range(lo, hi, bk))
    return total


def total_tiles(n_img: int, text_len: int, blocks: tuple[int, int] = DEFAULT_BLOCKS) -> int:
    s = n_img + text_len
    return -(-s // blocks[0]) * -(-s // blocks[1])


def kept_fraction(method: str | Method, n_img: int, text_len: int, text_first: bool, *,
                  blocks: tuple[int, int] | None = None) -> float:
    """Fraction of the dense attention FLOPs one head spends at one step with ``method``.

    full 1; cache 0; ``arrow:k`` the allowed pairs / S² (with ``blocks``: visited tiles / all tiles, the work of
    a block-sparse kernel); ``wars:k`` as ``arrow:k`` at its own steps (the full steps that also compute the
    window for its residual are counted by :func:`plan_stats`, see :meth:`Plan.residual_steps`); ``cfg_share``
    0.5 (one CFG half computed); ``cfg_share+arrow:k`` 0.5 · arrow.
    """
    m = parse_method(method) if isinstance(method, str) else method
    if m.code == FULL:
        return 1.0
    if m.code == CACHE:
        return 0.0
    if m.code == CFG_SHARE:
        return 0.5
    w = m.half_window(n_img)
    if blocks is None:
        frac = arrow_pairs(n_img, text_len, w) / (n_img + text_len) ** 2
    else:
        frac = arrow_tiles(n_img, text_len, text_first, w, blocks) / total_tiles(n_img, text_len, blocks)
    if m.code in (ARROW, WARS):
        return frac
    assert m.code == CFG_SHARE_ARROW
    return 0.5 * frac


def layer_text_len(layer_name: str, text_tokens: int) -> int:
    """SD3.5's ``.attn2`` layers are image-only self-attention: no text tokens."""
    return 0 if layer_name.endswith(".attn2") else text_tokens


def kept_table(plan, n_img: int, *, blocks: tuple[int, int] | None = None) -> np.ndarray:
    """float64 [T, L, H]: kept fraction of every (step, layer, head), residual computations included."""
    plan.validate(n_img=n_img)
    model = plan.model
    methods = plan.parsed_methods()
    text_first = model["text_position"] == "first"
    a = np.asarray(plan.assignment)
    resid_steps = plan.residual_steps()
    _, _, resid_w = plan.to_arrays(n_img)
    out = np.empty(a.shape, np.float64)
    for li, name in enumerate(model["layers"]):
        t = layer_text_len(name, model["text_tokens"])
        per_method = np.array([kept_fraction(m, n_img, t, text_first, blocks=blocks) for m in methods])
        out[:, li] = per_method[a[:, li]]
        # a full step that feeds a later wars step also runs the window attention for the residual
        for h in np.nonzero(resid_w[li] >= 0)[0]:
            w = int(resid_w[li, h])
            k_frac = (arrow_pairs(n_img, t, w) / (n_img + t) ** 2 if blocks is None else
                      arrow_tiles(n_img, t, text_first, w, blocks) / total_tiles(n_img, t, blocks))
            out[resid_steps[:, li, h], li, h] += k_frac
    return out


def layer_weights(plan, n_img: int) -> np.ndarray:
    """float64 [L]: each layer's dense attention cost S_l² (head_dim and heads are shared by all layers)."""
    return np.array([(n_img + layer_text_len(n, plan.model["text_tokens"])) ** 2 for n in plan.model["layers"]],
                    np.float64)


def plan_stats(plan, n_img: int, *, blocks: tuple[int, int] | None = None) -> dict:
    """Attention FLOPs kept by a plan at ``n_img`` image tokens (fractions of dense; exact mask counts, or
    kernel tiles with ``blocks``): overall (every (step, layer, head) weighted by its layer's S²), per layer
    (mean over steps and heads), per step (weighted over layers), and the method counts."""
    kept = kept_table(plan, n_img, blocks=blocks)  # [T, L, H]
    wl = layer_weights(plan, n_img)
    per_layer = kept.mean(axis=(0, 2))
    per_step = (kept.mean(axis=2) * wl).sum(axis=1) / wl.sum()
    overall = float((per_layer * wl).sum() / wl.sum())
    counts = np.bincount(np.asarray(plan.assignment).ravel(), minlength=len(plan.methods))
    model = plan.model
    dense = sum(attention_flops(n_img, layer_text_len(n, model["text_tokens"]), model["head_dim"])
                for n in model["layers"]) * model["num_heads"] * plan.steps
    return {"n_img": int(n_img), "blocks": list(blocks) if blocks else None,
            "attention_flops_kept": overall,
            "attention_flops_dense": int(dense),  # per image (batch element), all steps
            "per_layer": [float(x) for x in per_layer],
            "per_step": [float(x) for x in per_step],
            "method_counts": {m: int(c) for m, c in zip(plan.methods, counts)}}


__all__ = ["DEFAULT_BLOCKS", "attention_flops", "band_pairs", "arrow_pairs", "arrow_tiles", "total_tiles",
           "kept_fraction", "kept_table", "layer_weights", "plan_stats", "layer_text_len"]
