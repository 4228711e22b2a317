"""``calibrate``: prompts -> a plan, through the progressive pass and CP-SAT (``dfa2 calibrate``).

Savings per (layer, candidate) come from the exact attention-FLOP accounting of :mod:`dfa2_jax.plan.flops` for the
actual token layout: visited tiles of the kernel's block size (``savings="tiles"``, default, what the Pallas
kernel runs), exact mask pairs (``"exact"``), or a measured latency table ``{method: latency / full}``.

Two ways to choose (``strategy``): ``"headwise"`` (DiTFastAttnV2: per head, CP-SAT maximises the saving with
Σ_h RSE ≤ δ and each head's RSE < c·δ/H) and ``"layerwise"`` (DiTFastAttn V1's greedy choice in the same
budget: one method for every head of the layer, the most-saving candidate whose Σ_h RSE ≤ δ, else full).
Either way the RSE table of every (step, layer, head, candidate) is kept (``CalibrationResult.rse``).

Resumable: after every step the latents, the per-layer state, the assignment so far and the settings' hash are
written to one ``.npz`` (temp file + rename). ``resume=True`` continues from it and gives the same plan as an
uninterrupted run (same inputs, same compiled steps, same solver answers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfa2_jax.plan import flops
from dfa2_jax.atomic import atomic_open
from dfa2_jax.plan import methods as M
from dfa2_jax.calibrate.progressive import initial_state, run_step
from dfa2_jax.runtime import check_attention_impl
from dfa2_jax.calibrate.solver import solve
from dfa2_jax.plan import Plan, model_info_for

DEFAULT_CANDIDATES = ("arrow:8", "arrow:16", "arrow:32", "cache")
STRATEGIES = ("headwise", "layerwise")
CKPT_VERSION = 2


class CalibrationError(ValueError):
    """Bad calibration settings (names the argument)."""


def parse_candidates(names: Sequence[str] | str, *, cfg: bool) -> tuple[M.Method, ...]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        raise CalibrationError("candidates: at least one method is needed")
    out = []
    for name in names:
        try:
            m = M.parse_method(name.strip())
        except ValueError as e:
            raise CalibrationError(f"candidates: {e}") from None
        if m.code == M.FULL:
            raise CalibrationError("candidates: 'full' is always available (unchosen heads stay full); do not list it")
        if m.code in M.CFG_CODES and not cfg:
            raise CalibrationError(f"candidates: {m.name} needs classifier-free guidance (SD3 with guidance > 1, "
                                   "FLUX with negative_prompt and true_cfg_scale > 1); this run has none")
        if m in out:
            raise CalibrationError(f"candidates: {m.name} is listed twice")
        out.append(m)
    return tuple(out)


def savings_table(candidates: tuple[M.Method, ...], layer_names: list[str], n_img: int, text_len: int,
                  text_first: bool, *, savings="tiles", blocks=flops.DEFAULT_BLOCKS) -> np.ndarray:
    """saving(layer, m) = 1 − the FLOP fraction the method keeps for that layer's token layout: [L, M]."""
    table = np.zeros((len(layer_names), len(candidates)))
    for li, name in enumerate(layer_names):
        t = flops.layer_text_len(name, text_len)
        for mi, m in enumerate(candidates):
            if isinstance(savings, dict):
                if m.name not in savings:
                    raise CalibrationError(f"latency table: no entry for candidate {m.name!r} "
                                           f"(has {sorted(savings)})")
                table[li, mi] = 1.0 - float(savings[m.name])
            elif savings in ("tiles", "exact"):
                kept = flops.kept_fraction(m, n_img, t, text_first, blocks=blocks if savings == "tiles" else None)
                table[li, mi] = 1.0 - kept
            else:
                raise CalibrationError(f"savings={savings!r}: expected 'tiles', 'exact' or a latency table")
    return np.clip(table, 0.0, 1.0)


def load_latency_table(path: str) -> dict[str, float]:
    """JSON ``{"arrow:8": 0.31, "cache": 0.0, ...}``: each method's latency relative to full attention."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read the latency table ({e})") from None
    if not isinstance(d, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in d.values()):
        raise CalibrationError(f"{path}: expected a JSON object {{method: relative latency >= 0}}")
    return {M.parse_method(k).name: float(v) for k, v in d.items()}


@dataclasses.dataclass
class CalibrationResult:
    """``plan`` (None when stopped early), ``summary`` (kept FLOPs, method counts, timings) and ``rse``: float32
    [steps, layers, heads, candidates], the RSE of each candidate against the full output where the pass ran
    (step 0 included; candidates in ``plan.methods[1:]`` order); NaN for steps not run."""

    plan: Plan | None
    summary: dict
    rse: np.ndarray | None = None


def layerwise_choice(rse: np.ndarray, savings: np.ndarray, delta: float) -> np.ndarray:
    """DiTFastAttn V1's choice for one layer: every head takes the most-saving candidate m with
    Σ_h rse[h, m] ≤ δ (ties: the earlier candidate); -1 (full) for every head when none fits. -> int32 [H]."""
    rse, savings = np.asarray(rse, np.float64), np.asarray(savings, np.float64)
    total = np.where(np.isnan(rse), np.inf, rse).sum(axis=0)  # [M]
    best = -1
    for m in np.argsort(-savings, kind="stable"):
        if total[m] <= delta and savings[m] > 0:
            best = int(m)
            break
    return np.full(rse.shape[0], best, np.int32)


def _settings_key(**kw) -> str:
    return hashlib.sha256(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _save_ckpt(path: str, x, state, meta: dict) -> None:
    arrays = {"x": np.asarray(x)}
    for layer, d in state.items():
        for name, a in d.items():
            arrays[f"state/{layer}/{name}"] = np.asarray(a)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_ckpt(path: str, key: str):
    try:
        z = np.load(path)
        meta = json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError) as e:
        raise CalibrationError(f"{path}: unreadable calibration checkpoint ({e})") from None
    if meta.get("version") != CKPT_VERSION or meta.get("key") != key:
        raise CalibrationError(f"{path}: the checkpoint was made with other settings (model, prompts, resolution, "
                               "steps, delta, c, candidates, seed or savings); remove it or drop --resume")
    state: dict[str, dict[str, jax.Array]] = {}
    for name in z.files:
        if name.startswith("state/"):
            _, layer, leaf = name.split("/")
            state.setdefault(layer, {})[leaf] = jnp.asarray(z[name])
    return jnp.asarray(z["x"]), state, meta


def _true_cfg(prep) -> float | None:
    """FLUX's true-CFG scale when the calibration ran with it, else None."""
    s = prep.cond.get("true_cfg_scale")
    return None if s is None else float(s)


def _effective_guidance(prep) -> float | None:
    """The guidance the calibration ran with (SD3 CFG scale / FLUX guidance embedding), None without."""
    if "guidance_scale" in prep.cond and prep.do_cfg:
        return float(prep.cond["guidance_scale"])
    g = prep.cond.get("guidance")
    return None if g is None else float(np.asarray(g).reshape(-1)[0])


def calibrate(pipe, prompts: Sequence[str], *, resolution, steps: int, delta: float, c: float = 1.5,
              candidates: Sequence[str] | str = DEFAULT_CANDIDATES, seed: int = 0, guidance_scale: float | None = None,
              batch: int | None = None, savings="tiles", blocks=flops.DEFAULT_BLOCKS,
              checkpoint: str | None = None, resume: bool = False, progress: bool = True,
              stop_after: int | None = None, time_limit_s: float = 10.0,
              max_sequence_length: int | None = None, mesh=None, fsdp: bool = False,
              attention_impl: str = "auto", negative_prompt: str | Sequence[str] | None = None,
              true_cfg_scale: float | None = None, strategy: str = "headwise") -> CalibrationResult:
    """Calibrate a plan for ``pipe`` (an SD3Pipeline / FluxPipeline) on ``prompts``.

    ``resolution``: int or (height, width) in pixels. ``batch``: the most prompts run together; the progressive
    pass decides each layer from all prompts at once, so every prompt is in one batch and ``batch`` must be at
    least the number of prompts (a guard against out-of-memory surprises). ``checkpoint``: the ``.npz`` progress
    file (written after every step); ``resume``: continue from it. ``stop_after``: stop after that many steps
    (leaving the checkpoint; for tests and time-boxed runs) — the returned plan is then None. ``mesh``: run the
    pass on a device mesh (a Mesh, "data=2,heads=4", "auto" or None; :func:`dfa2_jax.parallel.sharded.resolve_mesh`):
    prompts over ``data`` (and SD3's CFG halves over ``cfg``), heads over ``heads``; ``fsdp``: params sharded
    over ``data``. The host still answers every (step, layer) once. ``attention_impl``: how the arrow candidates
    are computed (:func:`dfa2_jax.runtime.check_attention_impl`; "auto": the Pallas kernel on a GPU, the banded
    jnp form elsewhere). ``negative_prompt`` (one string, or one per prompt): SD3's CFG negative prompt, or with
    ``true_cfg_scale`` > 1 FLUX's true CFG (the pipelines' ``prepare``), under which ``cfg_share`` candidates
    become valid; ``true_cfg_scale`` is FLUX's only. ``c``: the per-head bound (``math.inf``: none). ``strategy``:
    ``"headwise"`` (V2, CP-SAT per head) or ``"layerwise"`` (V1's greedy per layer; ``c`` unused), module docstring.
    """
    attention_impl = check_attention_impl(attention_impl)
    t_start = time.perf_counter()
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise CalibrationError("prompts: at least one prompt (a string) is needed")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise CalibrationError(f"delta={delta!r} must be a finite number > 0")
    if not (isinstance(c, (int, float)) and not math.isnan(c) and c > 0):
        raise CalibrationError(f"c={c!r} must be a number > 0 (inf: no per-head bound)")
    if strategy not in STRATEGIES:
        raise CalibrationError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if steps < 2:
        raise CalibrationError(f"steps={steps}: at least 2 (step 0 is always full)")
    if batch is not None and batch < len(prompts):
        raise CalibrationError(f"batch={batch} < {len(prompts)} prompts: the progressive pass needs all calibration "
                               "prompts in one batch (use fewer prompts or a larger batch)")
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    pipe._check_size(h, w)
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if true_cfg_scale is not None:
        if pipe.transformer.config.family != "flux":
            raise CalibrationError(f"true_cfg_scale={true_cfg_scale}: FLUX only (SD3's CFG scale is guidance_scale)")
        extra["true_cfg_scale"] = true_cfg_scale
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        negative_prompt = list(negative_prompt)
    prep = pipe.prepare(prompts, negative_prompt, height=h, width=w, num_inference_steps=steps,
                        guidance_scale=guidance_scale, seed=seed, **extra)
    cands = parse_candidates(candidates, cfg=prep.do_cfg)
    tr = pipe.transformer
    layer_names = tr.attention_layer_names()
    heads = tr.config.num_attention_heads
    text_first = tr.config.family == "flux"
    if isinstance(savings, str) and savings.endswith(".json"):
        savings = load_latency_table(savings)
    sav = savings_table(cands, layer_names, prep.n_img, prep.text_len, text_first, savings=savings, blocks=blocks)
    methods = ["full"] + [m.name for m in cands]
    key = _settings_key(model=tr.config.to_diffusers(), dtype=str(tr.dtype), prompts=prompts, size=(h, w),
                        steps=steps, delta=delta, c=c if strategy == "headwise" else None, candidates=methods,
                        seed=seed, g=guidance_scale,
                        savings=savings if isinstance(savings, (str, dict)) else str(savings), blocks=blocks,
                        text=prep.text_len,
                        # only when used, so that checkpoints of runs without them keep their key
                        **({"negative": negative_prompt} if negative_prompt is not None else {}),
                        **({"strategy": strategy} if strategy != "headwise" else {}),
                        **({"true_cfg": _true_cfg(prep)} if _true_cfg(prep) is not None else {}))
    assignment = np.zeros((steps, len(layer_names), heads), np.int32)
    rse_log = np.full((steps, len(layer_names), heads, len(cands)), np.nan, np.float32)
    solver_time = [0.0]
    start = 0
    x = prep.latents
    if resume:
        if not checkpoint or not os.path.isfile(checkpoint):
            raise CalibrationError(f"--resume: no checkpoint at {checkpoint!r}")
        x, state, meta = _load_ckpt(checkpoint, key)
        start = meta["next_step"]
        assignment = np.asarray(meta["assignment"], np.int32)
        saved = np.asarray(meta["rse"], np.float32)[:start]
        rse_log[:start] = np.where(saved < 0, np.nan, saved)
        solver_time[0] = meta["solver_time"]
    else:
        state = initial_state(tr.graphdef, tr.state, x, prep.cond, cands, family=tr.family, do_cfg=prep.do_cfg)

    params, cond = tr.state, prep.cond
    if mesh is not None:
        from dfa2_jax.parallel.sharded import place_carry, place_inputs, resolve_mesh

        try:
            mesh = resolve_mesh(mesh, batch=int(x.shape[0]), heads=heads, family=tr.family, do_cfg=prep.do_cfg)
        except ValueError as e:
            raise CalibrationError(f"mesh: {e}") from None
    if mesh is not None:
        placed = place_inputs(mesh, tr.state, x, prep.cond, family=tr.family, do_cfg=prep.do_cfg, fsdp=fsdp,
                              num_heads=heads)
        params, x, cond = placed.state, placed.latents, placed.cond
        state = place_carry(state, mesh, placed.carry_axes)
    elif fsdp:
        raise CalibrationError("fsdp needs a mesh with a data axis")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(layer_names), initial=start * len(layer_names), desc="calibrating",
                   unit="layer")

    def choose(step: int, layer: int, rse: np.ndarray) -> np.ndarray:
        rse_log[step, layer] = rse
        if step == 0:  # the plan format: step 0 is full for every head
            if bar is not None:
                bar.update(1)
            return np.full(heads, -1, np.int32)
        if strategy == "layerwise":
            choice = layerwise_choice(rse, sav[layer], delta)
        else:
            res = solve(rse, sav[layer], delta, c, num_heads=heads, time_limit_s=time_limit_s)
            solver_time[0] += res.solver_time_s
            choice = res.choice
        assignment[step, layer] = choice + 1
        if bar is not None:
            bar.update(1)
        return choice

    end = steps if stop_after is None else min(steps, start + stop_after)
    # under the mesh, attention runs per device (dfa2_jax.models.attention.per_device)
    try:
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            for t in range(start, end):
                x, state = run_step(choose, tr.graphdef, params, x, cond, jnp.asarray(prep.timesteps[t]),
                                    jnp.asarray(prep.sigmas[t]), jnp.asarray(prep.sigmas[t + 1]), state,
                                    jnp.int32(t), family=tr.family, do_cfg=prep.do_cfg, candidates=cands,
                                    n_img=prep.n_img, impl=attention_impl)
                if checkpoint:
                    _save_ckpt(checkpoint, x, state, {"version": CKPT_VERSION, "key": key, "next_step": t + 1,
                                                      "assignment": assignment.tolist(),
                                                      "rse": np.nan_to_num(rse_log, nan=-1.0).tolist(),
                                                      "solver_time": solver_time[0]})
    finally:
        if bar is not None:
            bar.close()
    if end < steps:
        return CalibrationResult(None, {"stopped_after_step": end}, rse_log)
    info = model_info_for(tr.config, prep.text_len)
    headwise = strategy == "headwise"
    calibration = {"delta": delta, "c": c if headwise and math.isfinite(c) else None, "prompts": len(prompts),
                   "resolution": [h, w], "seed": seed,
                   "solver": "cp-sat" if headwise else "layerwise-greedy", "metric": "rse",
                   "candidates": methods[1:],
                   "savings": savings if isinstance(savings, str) else "latency-table",
                   "blocks": list(blocks) if savings == "tiles" else None, "image_tokens": prep.n_img,
                   "guidance_scale": _effective_guidance(prep)}
    if _true_cfg(prep) is not None:
        calibration["true_cfg_scale"] = _true_cfg(prep)
    plan = Plan(info, steps, methods, assignment, calibration)
    plan.validate(info, n_img=prep.n_img, cfg=prep.do_cfg)
    stats = flops.plan_stats(plan, prep.n_img, blocks=tuple(blocks))
    exact = flops.plan_stats(plan, prep.n_img)
    plan.stats = {"attention_flops_kept": exact["attention_flops_kept"],
                  "attention_tiles_kept": stats["attention_flops_kept"], "method_counts": exact["method_counts"]}
    wall = time.perf_counter() - t_start
    summary = {**plan.stats, "wall_time_s": wall, "solver_time_s": solver_time[0],
               "solves": int((steps - 1) * len(layer_names))}
    return CalibrationResult(plan, summary, rse_log)
