"""What the benchmark scripts (``scripts/``) share: the benchmark cases and attention shapes, random inputs of a
model's shape, synthetic plans at a target attention kept fraction, byte counts, timing and the attention stand-in.

Nothing here loads a checkpoint: the scripts time random-weight models (:func:`dfa2_jax.random_transformer`) on
random conditioning. The inputs are drawn as float32 NumPy from one seed, so a JAX run and a PyTorch run of the
same case see the same numbers; row ``i`` of a batch has its own seed, so batch ``b`` is the first ``b`` rows of
any larger batch (the scaling benchmark compares a batch-1 run with image 0 of a data-parallel batch).

Synthetic plans (:func:`synthetic_plan`; no calibration: the weights are random). Methods ordered by kept work,
full > arrow:8 > arrow:16 > arrow:32 > cache (:data:`PLAN_METHODS`). Every (step ≥ 1, layer, head) draws
u ~ U[0, 1) once (``seed``). For a strength λ, step t with r = t / (T − 1) gets the shares full
F = clip(1 − λ(0.5 + r), 0, 1), cache C = clip(0.6 λ r, 0, 0.6) and arrow A = 1 − F − C split equally over
arrow:8 / :16 / :32; the head takes the method whose cumulative share interval holds u. Step 0 is full everywhere.
So full heads thin out and cached heads grow along the steps, as in the paper's plans. Each threshold only moves
down as λ grows, so every entry's cost is non-increasing in λ and the kept fraction (:func:`plan_stats` in the
kernel's tiles) is monotone: bisection on λ ∈ [0, 2] hits the target to ~1e-5 on the full shapes (±0.01 checked
in ``tests/test_bench_e2e.py``). At these shares no (step, layer) has all 24 heads cached, so the three benchmark
plans (:data:`PLAN_REMOVED`) of a case share one ``RuntimeSpec`` and one compiled sampler.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dfa2_jax.models.configs import FluxConfig, SD3Config, TransformerConfig
from dfa2_jax.pipeline import flux_image_ids
from dfa2_jax.plan import Plan, model_info_for
from dfa2_jax.plan.methods import ARROW, Method
from dfa2_jax.plan.flops import (DEFAULT_BLOCKS, arrow_tiles, kept_fraction, layer_text_len, layer_weights, plan_stats,
                                 total_tiles)
from dfa2_jax.runtime import kernel_call
from dfa2_jax.sample import PlanArrays
from dfa2_jax.scheduler import FlowMatchEulerConfig, calculate_shift, set_timesteps
from dfa2_jax.transformer import flux_rope

FAMILIES = ("flux", "sd3")
GUIDANCE = {"flux": 3.5, "sd3": 7.0}  # FLUX.1-dev's guidance embedding; SD3's classifier-free guidance scale
TEXT_TOKENS = {"flux": 512, "sd3": 333}  # FLUX: 512 T5; SD3: 77 CLIP + 256 T5
TINY_TEXT_TOKENS = {"flux": 16, "sd3": 12}
TINY_RES = 128  # smoke runs: 64 image tokens
TINY_STEPS = 3
TINY_BLOCKS = (16, 16)  # tiles in which smoke plans are counted: 64 image tokens have no band in 128×64 tiles

PLAN_METHODS = ("full", "arrow:8", "arrow:16", "arrow:32", "cache")  # in order of decreasing kept work
PLAN_REMOVED = (0.43, 0.56, 0.68)  # attention FLOPs removed by the three benchmark plans
CACHE_PEAK = 0.6  # the largest share of cached heads at one step (the last steps, λ ≥ 1)
LAMBDA_MAX = 2.0


# An H100 SXM5 80 GB (XLA's GpuTargetConfigProto, text format): 132 SMs, 228 KiB shared memory per SM (227 KiB
# per block opt-in), 50 MiB L2, 3.35 TB/s HBM3, 1.98 GHz boost clock, compute capability 9.0.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def deviceless_h100s(n: int = 1):
    """``n`` H100s for XLA's deviceless (ahead-of-time) GPU compile: (their abstract devices, a context that makes
    them the target of traced calls). The topology is built from :data:`H100_TARGET` through the jax CUDA plugin,
    which must match jax's exact version (``pip install jax-cuda13-plugin==$V jax-cuda13-pjrt==$V``); run with
    JAX_PLATFORMS=cpu. Raises RuntimeError saying so when the plugin is missing."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc("", platform="cuda", target_config=H100_TARGET, topology=f"1x1x{n}")
    except Exception as e:  # noqa: BLE001 - the plugin's own message says what is missing
        raise RuntimeError(f"no deviceless CUDA topology ({e}); install the jax CUDA plugin of jax {jax.__version__} "
                           "(jax-cuda13-plugin and jax-cuda13-pjrt) and run with JAX_PLATFORMS=cpu") from None
    kind = topo.devices[0].device_kind
    # The Triton lowering of jax >= 0.11 reads its target GPU from the abstract mesh when none is attached.
    target = jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
        (1,), ("target",), abstract_device=jax.sharding.AbstractDevice(device_kind=kind, num_cores=None,
                                                                       platform="cuda")))
    return topo.devices, target


# ------------------------------------------------------------------------------------------------- shapes
def model_config(family: str, *, tiny: bool = False) -> TransformerConfig:
    """FLUX.1-dev or SD3-medium at full size; ``tiny``: 2 (+2 single) blocks, 4 heads × 16, narrow text
    projections (CPU smoke runs; every code path of the full model)."""
    if family == "flux":
        if tiny:
            return FluxConfig.dev(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=16,
                                  axes_dims_rope=(4, 4, 8), joint_attention_dim=64, pooled_projection_dim=32)
        return FluxConfig.dev()
    if family == "sd3":
        if tiny:
            return SD3Config.medium(num_layers=2, num_attention_heads=4, attention_head_dim=16,
                                    caption_projection_dim=64, joint_attention_dim=64, pooled_projection_dim=32,
                                    pos_embed_max_size=32, sample_size=16)
        return SD3Config.medium()
    raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")


def text_tokens(family: str, *, tiny: bool = False) -> int:
    """Text tokens of the joint sequence: the pipelines' defaults (FLUX 512, SD3 333), or the tiny runs'."""
    return (TINY_TEXT_TOKENS if tiny else TEXT_TOKENS)[family]


def image_tokens(res: int) -> int:
    """Image tokens at ``res``² pixels: VAE /8, then 2×2 patches (SD3) or 2×2 packing (FLUX)."""
    return (res // 16) ** 2


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark generation: a model family at ``res``² for ``steps`` steps, one image (SD3 with
    classifier-free guidance: a model batch of 2). ``tiny``: the smoke model (:func:`model_config`)."""

    family: str
    res: int
    steps: int
    tiny: bool = False

    @property
    def config(self) -> TransformerConfig:
        return model_config(self.family, tiny=self.tiny)

    @property
    def text_tokens(self) -> int:
        return text_tokens(self.family, tiny=self.tiny)

    @property
    def image_tokens(self) -> int:
        return image_tokens(self.res)

    @property
    def do_cfg(self) -> bool:
        return self.family == "sd3"

    @property
    def guidance(self) -> float:
        return GUIDANCE[self.family]

    def smoke(self) -> Case:
        """The same family on the tiny model, 128², 3 steps."""
        return dataclasses.replace(self, res=TINY_RES, steps=TINY_STEPS, tiny=True)


CASES = {
    "flux-1024": Case("flux", 1024, 28),
    "flux-2048": Case("flux", 2048, 28),
    "sd3-1024": Case("sd3", 1024, 28),
    "flux-2048-50": Case("flux", 2048, 50),
}


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """One attention call [B, S, H, D] of a benchmark model, S = text + image tokens."""

    name: str
    batch: int
    text_len: int
    n_img: int
    heads: int
    head_dim: int
    text_first: bool

    @property
    def seq_len(self) -> int:
        return self.text_len + self.n_img

    @property
    def dense_flops(self) -> int:
        """4·B·H·S²·D: the two matmuls of dense attention."""
        return 4 * self.batch * self.heads * self.seq_len ** 2 * self.head_dim


ATTENTION_SHAPES = (AttentionShape("FLUX-2048", 1, 512, 16384, 24, 128, True),
                    AttentionShape("SD3-1024", 1, 333, 4096, 24, 64, False))
SMALL_ATTENTION_SHAPES = (AttentionShape("FLUX-small", 1, 24, 200, 4, 32, True),
                          AttentionShape("SD3-small", 1, 21, 160, 4, 32, False))


# ------------------------------------------------------------------------------------------------- inputs
def _rows(seed: int, tag: int, rows: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 [rows, *shape], row i from the generator (seed, tag, i)."""
    return np.stack([np.random.default_rng((seed, tag, i)).standard_normal(shape, np.float32) for i in range(rows)])


def random_inputs(config: TransformerConfig, *, res: int, batch: int = 1, text_len: int | None = None,
                  do_cfg: bool | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random latents and text-encoder stand-ins of ``config``'s shape as float32 NumPy.

    ``latents``: FLUX packed [B, N, C]; SD3 [B, C, res/8, res/8]. ``prompt_embeds`` [B', T, joint_attention_dim],
    ``pooled_projections`` [B', pooled_projection_dim]; B' = 2B for SD3 with classifier-free guidance
    (``do_cfg``, default on for SD3): [uncond; cond] as the pipelines stack them. T = ``text_len`` (default the
    pipelines' text length)."""
    family = config.family
    t = TEXT_TOKENS[family] if text_len is None else text_len
    cfg_double = family == "sd3" and (True if do_cfg is None else do_cfg)
    lat = res // 8
    if family == "flux":
        latents = _rows(seed, 0, batch, ((lat // 2) ** 2, config.in_channels))
    else:
        latents = _rows(seed, 0, batch, (config.in_channels, lat, lat))
    embeds = [_rows(seed, 1, batch, (t, config.joint_attention_dim))]
    pooled = [_rows(seed, 2, batch, (config.pooled_projection_dim,))]
    if cfg_double:  # the unconditional rows first
        embeds.insert(0, _rows(seed, 3, batch, (t, config.joint_attention_dim)))
        pooled.insert(0, _rows(seed, 4, batch, (config.pooled_projection_dim,)))
    return {"latents": latents, "prompt_embeds": np.concatenate(embeds), "pooled_projections": np.concatenate(pooled)}


def flux_ids(res: int, text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' FLUX position ids at ``res``²: (txt_ids [T, 3] zeros, img_ids [N, 3] (0, row, col))."""
    return np.zeros((text_len, 3), np.float32), flux_image_ids(res // 8, res // 8)


def sampler_inputs(config: TransformerConfig, *, res: int, batch: int = 1, text_len: int | None = None,
                   dtype: Any = "bfloat16", seed: int = 0, guidance: float | None = None
                   ) -> tuple[jax.Array, dict[str, Any]]:
    """(latents, cond) for :func:`dfa2_jax.sample.denoise`: :func:`random_inputs` cast to ``dtype``, plus FLUX's
    RoPE tables (:func:`dfa2_jax.transformer.flux_rope`) and guidance [B] (a guidance-embedding model only), or
    SD3's ``guidance_scale`` (classifier-free guidance when it is > 1). ``guidance`` defaults to
    :data:`GUIDANCE`."""
    family = config.family
    g = GUIDANCE[family] if guidance is None else float(guidance)
    do_cfg = family == "sd3" and g > 1.0
    t = TEXT_TOKENS[family] if text_len is None else text_len
    x = random_inputs(config, res=res, batch=batch, text_len=t, do_cfg=do_cfg, seed=seed)
    dtype = jnp.dtype(dtype)
    cond: dict[str, Any] = {"prompt_embeds": jnp.asarray(x["prompt_embeds"], dtype),
                            "pooled_projections": jnp.asarray(x["pooled_projections"], dtype)}
    if family == "flux":
        cond["rope"] = flux_rope(config, *flux_ids(res, t))
        cond["guidance"] = jnp.full((batch,), g, jnp.float32) if config.guidance_embeds else None
    elif do_cfg:
        cond["guidance_scale"] = jnp.asarray(g, jnp.float32)
    return jnp.asarray(x["latents"], dtype), cond


def step_inputs(config: TransformerConfig, *, res: int, batch: int = 1, text_len: int | None = None, seed: int = 0,
                t: float = 0.7) -> dict[str, np.ndarray]:
    """One transformer forward's arguments as diffusers names them (float32 NumPy): ``hidden_states``,
    ``encoder_hidden_states``, ``pooled_projections``, ``timestep`` [B] (FLUX ``t`` as its pipeline passes it,
    SD3 1000·t), and for FLUX ``img_ids`` / ``txt_ids`` and ``guidance`` [B] (a guidance-embedding model)."""
    family = config.family
    tl = TEXT_TOKENS[family] if text_len is None else text_len
    x = random_inputs(config, res=res, batch=batch, text_len=tl, do_cfg=False, seed=seed)
    out = {"hidden_states": x["latents"], "encoder_hidden_states": x["prompt_embeds"],
           "pooled_projections": x["pooled_projections"],
           "timestep": np.full((batch,), t if family == "flux" else 1000.0 * t, np.float32)}
    if family == "flux":
        out["txt_ids"], out["img_ids"] = flux_ids(res, tl)
        if config.guidance_embeds:
            out["guidance"] = np.full((batch,), GUIDANCE["flux"], np.float32)
    return out


def schedule(family: str, steps: int, n_img: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [steps], sigmas [steps + 1]) of the pipelines: FLUX.1-dev's dynamic shift at ``n_img`` image
    tokens (diffusers' FluxPipeline sigmas), SD3's static shift 3."""
    if family == "flux":
        return set_timesteps(FlowMatchEulerConfig.flux_dev(), steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                             mu=calculate_shift(n_img))
    return set_timesteps(FlowMatchEulerConfig.sd3(), steps)


# -------------------------------------------------------------------------------------------------- plans
def plan_assignment(u: np.ndarray, lam: float, *, cache_peak: float = CACHE_PEAK) -> np.ndarray:
    """Method indices into :data:`PLAN_METHODS`, int32 [T, L, H], for per-entry uniforms ``u`` [T, L, H] at
    strength ``lam`` (the shares are in the module docstring). Step 0 is full."""
    steps = u.shape[0]
    r = np.arange(steps) / max(steps - 1, 1)
    full = np.clip(1 - lam * (0.5 + r), 0, 1)
    cache = np.clip(lam * cache_peak * r, 0, cache_peak)
    arrow = 1 - full - cache
    thresholds = np.stack([full, full + arrow / 3, full + 2 * arrow / 3, 1 - cache], axis=-1)  # [T, 4]
    idx = (u[..., None] >= thresholds[:, None, None, :]).sum(axis=-1).astype(np.int32)
    idx[0] = 0
    return idx


def synthetic_plan(model_info: dict, steps: int, n_img: int, removed: float, *, seed: int = 0,
                   blocks: tuple[int, int] = DEFAULT_BLOCKS, iters: int = 50, strict: bool = True
                   ) -> tuple[Plan, dict]:
    """(Plan, :func:`~dfa2_jax.plan.flops.plan_stats`) whose attention FLOPs kept (in ``blocks`` tiles) is the
    closest reachable to 1 − ``removed``; deterministic for a ``seed`` (the construction is in the module
    docstring).

    Bisection on λ with a vectorised kept fraction (per layer and method, weighted by each layer's S² as
    ``plan_stats`` does); the result is re-checked with ``plan_stats`` itself. A target out of reach (tiny smoke
    shapes: 3 steps, a handful of tiles) raises ValueError, or with ``strict=False`` gives the plan at
    λ = :data:`LAMBDA_MAX`."""
    target = 1.0 - removed
    text_first = model_info["text_position"] == "first"
    layers, heads = model_info["layers"], model_info["num_heads"]
    per = np.array([[kept_fraction(m, n_img, layer_text_len(name, model_info["text_tokens"]), text_first,
                                   blocks=blocks) for m in PLAN_METHODS] for name in layers])  # [L, M]
    probe = Plan(model_info, steps, list(PLAN_METHODS), np.zeros((steps, len(layers), heads), np.int32))
    wl = layer_weights(probe, n_img)  # [L]
    u = np.random.default_rng(seed).random((steps, len(layers), heads))
    layer_index = np.arange(len(wl))[None, :, None]

    def kept(lam):
        k = per[layer_index, plan_assignment(u, lam)].mean(axis=(0, 2))  # [L]
        return float((k * wl).sum() / wl.sum())

    lo, hi = 0.0, LAMBDA_MAX
    if kept(hi) > target and strict:
        raise ValueError(f"a kept fraction of {target:.3f} is out of reach for {model_info['family']} at {n_img} "
                         f"image tokens (at most {1 - kept(hi):.3f} can be removed with these shares)")
    for _ in range(iters):
        mid = (lo + hi) / 2
        if kept(mid) > target:
            lo = mid
        else:
            hi = mid
    lam = min((lo, hi), key=lambda x: abs(kept(x) - target))
    plan = Plan(model_info, steps, list(PLAN_METHODS), plan_assignment(u, lam),
                calibration={"solver": "dfa2_jax.benchmarking.synthetic_plan", "seed": seed, "lambda": lam,
                             "target_removed": removed})
    stats = plan_stats(plan, n_img, blocks=blocks)
    plan.stats = {"attention_flops_kept": stats["attention_flops_kept"], "blocks": list(blocks), "n_img": n_img}
    return plan, stats


def benchmark_plan(config: TransformerConfig, *, text_len: int, steps: int, n_img: int, removed: float = 0.68,
                   seed: int = 0, tiny: bool = False) -> tuple[PlanArrays, float]:
    """The :func:`synthetic_plan` of ``config`` removing ``removed`` of the attention FLOPs as the sampler takes
    it -> (PlanArrays, attention FLOPs kept). ``tiny``: counted in :data:`TINY_BLOCKS`, best effort (smoke
    shapes cannot reach the target)."""
    plan, stats = synthetic_plan(model_info_for(config, text_len), steps, n_img, removed, seed=seed,
                                 blocks=TINY_BLOCKS if tiny else DEFAULT_BLOCKS, strict=not tiny)
    return PlanArrays(*plan.to_arrays(n_img)), stats["attention_flops_kept"]


def amdahl_bound(attn_share: float, kept: float) -> float:
    """Speedup over dense when only the attention (share ``attn_share`` of the time) shrinks to ``kept``."""
    return 1.0 / ((1.0 - attn_share) + attn_share * kept)


# ------------------------------------------------------------------------------- attention head mixes
MIX_KEPT = 0.32  # the kernel benchmark's mixed plan: 68% of the attention FLOPs removed
MIX_TOL = 0.01  # a random mix's kept fraction is within ±1% of MIX_KEPT
ARROW_KS = (8, 16, 32)  # the arrow:k methods of the benchmarks' head mixes


def _mix_windows(n_img: int) -> list[int]:
    """The half-windows a head mix draws from: full (−1), then arrow:k for each of :data:`ARROW_KS`."""
    return [-1] + [Method(ARROW, k).half_window(n_img) for k in ARROW_KS]


def head_windows_kept(windows, n_img, text_len, text_first, blocks) -> float:
    """Kept fraction of (block_q × block_k) tiles of one attention call whose heads have these half-windows (−1
    full, 0 cached)."""
    tot = total_tiles(n_img, text_len, blocks)
    return float(np.mean([0.0 if w == 0 else arrow_tiles(n_img, text_len, text_first, int(w), blocks) / tot
                          for w in windows]))


def mixed_head_windows(h, n_img, text_len, text_first, blocks, target_kept=MIX_KEPT, seed=0):
    """25% cached heads, the rest drawn from full / arrow:8 / :16 / :32; among 64 draws of a fixed seed the one
    whose kept tile fraction is closest to ``target_kept`` (68% of the FLOPs removed)."""
    rng = np.random.default_rng(seed)
    choices = _mix_windows(n_img)
    best = None
    for _ in range(64):
        w = rng.choice(choices, size=h)
        w[rng.permutation(h)[: h // 4]] = 0
        err = abs(head_windows_kept(w, n_img, text_len, text_first, blocks) - target_kept)
        if best is None or err < best[0]:
            best = (err, w)
    return best[1].astype(np.int32)


def attention_inputs(seed: int, shape: tuple[int, int, int, int], dtype) -> tuple[jax.Array, ...]:
    """Random q, k, v and head cache [B, S, H, D] of ``dtype`` for one attention call (standard normal)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def random_head_windows(h, n_img, text_len, text_first, blocks, target_kept=MIX_KEPT, *, seed, tol=MIX_TOL,
                        max_draws=200_000):
    """Per head one of full / arrow:8 / :16 / :32 (half-widths n/16, n/32, n/64) / cached, uniformly at random
    (``seed``), redrawn until the kept tile fraction is within ±``tol`` of ``target_kept`` -> (half-windows int32
    [H], kept). Few heads may not reach that: then the closest of ``max_draws`` draws."""
    choices = np.array(_mix_windows(n_img) + [0], np.int32)
    per = np.array([head_windows_kept([w], n_img, text_len, text_first, blocks) for w in choices])
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max_draws // 1000):
        idx = rng.integers(0, len(choices), size=(1000, h))
        kept = per[idx].mean(axis=1)
        err = np.abs(kept - target_kept)
        k = int(np.argmin(err)) if not (err <= tol).any() else int(np.flatnonzero(err <= tol)[0])
        if best is None or err[k] < best[0]:
            best = (float(err[k]), choices[idx[k]], float(kept[k]))
        if best[0] <= tol:
            break
    return best[1], best[2]


def check_head_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` names a head mix of :func:`mode_head_windows`."""
    if not (mode in ("full", "mixed") or (mode.startswith("arrow:") and mode[6:].isdigit())
            or (mode.startswith("mix") and mode[3:].isdigit())):
        raise ValueError(f"unknown head mode {mode!r} (full, arrow:K, mixed, mixN)")


def mode_head_windows(mode: str, h, n_img, text_len, text_first, blocks) -> np.ndarray:
    """Half-windows int32 [H] of a benchmark head mix: ``full`` (every head), ``arrow:K`` (every head),
    ``mixed`` (:func:`mixed_head_windows`) or ``mixN`` (:func:`random_head_windows` of seed N)."""
    check_head_mode(mode)
    if mode == "full":
        return np.full(h, -1, np.int32)
    if mode.startswith("arrow:"):
        return np.full(h, Method(ARROW, int(mode[6:])).half_window(n_img), np.int32)
    if mode == "mixed":
        return mixed_head_windows(h, n_img, text_len, text_first, blocks)
    return random_head_windows(h, n_img, text_len, text_first, blocks, seed=int(mode[3:]))[0]


# ------------------------------------------------------------------------------------------ measurement
def tree_bytes(tree) -> int:
    """Bytes of every array (or ``jax.ShapeDtypeStruct``) in ``tree``; 0 for None."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def timed(fn: Callable[..., Any], *args) -> tuple[Any, float]:
    """(``fn(*args)``, its wall seconds until the result is ready on the device)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def time_calls(fn: Callable[..., Any], make_args: Callable[[int], Sequence[Any]], *, iters: int,
               warmup: int = 1) -> list[float]:
    """Seconds of ``iters`` calls ``fn(*make_args(i))`` after ``warmup`` untimed ones; each call's arguments are
    made (and made ready) outside the timed region, so no call sees its predecessor's buffers."""
    for i in range(warmup):
        jax.block_until_ready(fn(*make_args(10_000 + i)))
    times = []
    for i in range(iters):
        args = jax.block_until_ready(make_args(i))
        times.append(timed(fn, *args)[1])
    return times


def kernel_table(events) -> tuple[list[dict], float | None]:
    """(name, start, end) of each GPU kernel, times in ms -> [{name, count, ms}] largest first, and their span in
    ms (first start to last end; None without kernels)."""
    found: dict[str, list] = {}
    lo = hi = None
    for name, start, end in events:
        f = found.setdefault(name, [0, 0.0])
        f[0] += 1
        f[1] += end - start
        lo, hi = (start, end) if lo is None else (min(lo, start), max(hi, end))
    table = [dict(name=n, count=c, ms=ms) for n, (c, ms) in sorted(found.items(), key=lambda kv: -kv[1][1])]
    return table, (None if lo is None else hi - lo)


def jax_kernel_times(fn: Callable[..., Any], arg_sets: Sequence[Sequence[Any]],
                     workdir: str) -> tuple[list[dict], float | None]:
    """``fn(*args)`` for each of ``arg_sets`` (one after another, each synchronised) under jax.profiler: [{name, count,
    ms}] of their GPU kernels and copies, and the span in ms from the first kernel's start to the last one's end.
    No GPU: ([], None)."""
    import glob
    import os

    from jax.profiler import ProfileData

    with jax.profiler.trace(workdir):
        for args in arg_sets:
            jax.block_until_ready(fn(*args))
    lines = [line for path in glob.glob(os.path.join(workdir, "**", "*.xplane.pb"), recursive=True)
             for plane in ProfileData.from_file(path).planes if plane.name.startswith("/device:GPU")
             for line in plane.lines]
    # the per-op and per-module lines repeat the streams' kernels
    streams = [line for line in lines if line.name.lower().startswith("stream")]
    return kernel_table((ev.name, ev.start_ns / 1e6, ev.end_ns / 1e6) for line in streams for ev in line.events)


def kernel_family(name: str) -> str:
    """A GPU kernel's (or compiled HLO instruction's) name without its instance numbers: XLA's
    ``loop_add_fusion.12`` and ``loop_add_fusion_3`` are one family, so are Inductor's ``triton_poi_fused_add_0``
    and ``..._add_7``; a profiler's argument list in brackets is dropped."""
    return re.sub(r"([._]\d+)+$", "", name.split("(")[0].strip())


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


class NoAttention:
    """An attention runtime (``joint_attention``'s ``runtime=``) whose attention is q + k + v, element-wise: the
    model without its attention, with every projection, norm and RoPE still live (returning v alone would let XLA
    drop the q/k projections as dead code and undercount the rest)."""

    def __call__(self, q, k, v, *, layer, layout):
        return q + k + v

    def run_layer(self, layer, compute):
        return compute()


def arrow_implementation(attention_impl: str, q) -> str:
    """What a plan's compressed heads run for ``attention_impl`` (:data:`dfa2_jax.runtime.ATTENTION_IMPLS`) on
    operands like ``q`` (an array or ``jax.ShapeDtypeStruct`` [B, S, H, D]): "mosaic_gpu", "triton",
    "triton (interpret)" or "xla" (the jnp reference)."""
    from pallas_kernels import resolve_implementation

    implementation, interpret = kernel_call(attention_impl, q)
    if implementation == "xla":
        return "xla"
    name = resolve_implementation(q, implementation, interpret=interpret)
    return f"{name} (interpret)" if interpret and name != "xla" else name


__all__ = ["ARROW_KS", "ATTENTION_SHAPES", "AttentionShape", "CACHE_PEAK", "CASES", "Case", "FAMILIES", "GUIDANCE",
           "H100_TARGET", "LAMBDA_MAX", "MIX_KEPT", "MIX_TOL", "NoAttention", "PLAN_METHODS", "PLAN_REMOVED",
           "SMALL_ATTENTION_SHAPES", "TEXT_TOKENS", "TINY_BLOCKS", "TINY_RES", "TINY_STEPS", "TINY_TEXT_TOKENS",
           "amdahl_bound", "arrow_implementation", "attention_inputs", "benchmark_plan",
           "check_head_mode", "deviceless_h100s", "flux_ids", "head_windows_kept", "image_tokens", "jax_kernel_times",
           "kernel_family", "kernel_table", "median", "mixed_head_windows", "mode_head_windows", "model_config",
           "plan_assignment", "random_head_windows", "random_inputs", "sampler_inputs", "schedule", "step_inputs",
           "synthetic_plan", "text_tokens", "time_calls", "timed", "tree_bytes"]
