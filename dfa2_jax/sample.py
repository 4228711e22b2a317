"""The scanned flow-match sampler: the whole denoising loop is one jit-compiled ``lax.scan`` over timesteps.

Params, latents and conditioning go in as arguments (nothing is closed over); the scan carry is a dict,
``{"latents": x}`` now, where the plan runtime adds its per-layer head caches. The per-step inputs
(timestep, σ, σ_next) are scan inputs, so one compiled sampler serves every schedule of the same length.

SD3: classifier-free guidance on the batch [uncond, cond] (diffusers' order), v = u + g·(c − u).
FLUX: guidance embedding (dev) or none (schnell); the transformer receives t / 1000 as diffusers passes it.
With true CFG (a negative prompt and true_cfg_scale > 1, diffusers' FluxPipeline) the batch is [negative,
positive] as SD3's and v = n + s·(p − n); the guidance embedding still applies to both halves.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfa2_jax.runtime import PlanRuntime, RuntimeSpec, ShapeProbe, plan_schedules
from dfa2_jax.scheduler import euler_step


def velocity(model, x, t, cond: dict[str, Any], *, family: str, do_cfg: bool, runtime=None, batch_sharding=None):
    """One transformer evaluation at timestep t (diffusers' scale: 0..1000) -> velocity, x's shape.

    ``do_cfg``: the conditioning holds [uncond; cond] on the batch (SD3's CFG with ``guidance_scale``, FLUX's true
    CFG with ``true_cfg_scale``); the latents are doubled to match and the two halves combined.
    ``batch_sharding``: a ``jax.sharding.Sharding`` for the model batch (with CFG: the doubled batch
    [uncond; cond], so a mesh axis can split the two halves: CFG parallel); None leaves it to GSPMD."""
    model_in = jnp.concatenate([x, x], axis=0) if do_cfg else x
    if batch_sharding is not None:
        model_in = jax.lax.with_sharding_constraint(model_in, batch_sharding)
    if family == "sd3":
        ts = jnp.broadcast_to(t, (model_in.shape[0],))
        v = model(model_in, cond["prompt_embeds"], cond["pooled_projections"], ts, runtime=runtime)
        scale = cond.get("guidance_scale")
    else:
        ts = jnp.broadcast_to(t, (model_in.shape[0],)).astype(x.dtype) / 1000
        v = model(model_in, cond["prompt_embeds"], cond["pooled_projections"], ts, cond["rope"], cond.get("guidance"),
                  runtime=runtime)
        scale = cond.get("true_cfg_scale")
    if do_cfg:
        uncond, text = jnp.split(v, 2, axis=0)
        # In the model's dtype, as diffusers does (a float32 guidance scale would promote bf16 latents).
        v = uncond + jnp.asarray(scale, v.dtype) * (text - uncond)
    return v


# Progress reporting from inside the compiled scan: the step calls back to the host with its index; the
# receiving function is looked up here at call time, so the compiled sampler never changes with it. (A module
# slot, not a ContextVar: XLA runs host callbacks on its own threads, where a ContextVar is not set.)
_progress_hooks: list[Callable[[int], None]] = []


def _report(i) -> None:
    for hook in list(_progress_hooks):
        hook(int(i))


@contextlib.contextmanager
def progress_hook(fn: Callable[[int], None]) -> Iterator[None]:
    """Within this context, a sampler compiled with ``report=True`` calls ``fn(step_index)`` after each step."""
    _progress_hooks.append(fn)
    try:
        yield
    finally:
        _progress_hooks.remove(fn)


def _sampler(graphdef, state, latents, cond, timesteps, sigmas, plan, attn_state, *, family: str, do_cfg: bool,
             report: bool, spec: RuntimeSpec | None, batch_sharding=None):
    """The whole denoising loop, jit-compiled: ``scan_sampler(graphdef, state, latents, cond, timesteps, sigmas,
    plan_arrays, plan_state, *, family, do_cfg, report, spec, batch_sharding=None) -> (final latents, final plan state)``.

    The arguments are what :func:`plan_inputs` and :func:`split_plan_inputs` prepare (``plan_arrays`` / ``plan_state`` /
    ``spec`` None for dense attention); ``spec`` (a :class:`~dfa2_jax.runtime.RuntimeSpec`, holding the attention
    implementation) and the model's graphdef are static, so one compile serves every plan of the same structure.
    ``latents`` and ``plan_state`` are donated. Before the scan, the kernel's launch schedules of every step and
    layer are computed at once (:func:`dfa2_jax.runtime.plan_schedules`; the layers' kinds of call come from
    :func:`plan_probe`) and fed to the steps as scan inputs. Use ``scan_sampler.lower(...)`` / ``.trace(...)`` to
    compile ahead of time (benchmarks, memory analysis); :func:`run_sampler` calls it on :func:`plan_inputs`'
    output, :func:`denoise` does everything."""
    model = nnx.merge(graphdef, state)
    kinds = []
    if spec is not None:  # the kernel's launch schedules of every step, computed once here (scan inputs)
        tables = plan_schedules(spec, plan_probe(graphdef, state, latents, cond, spec, family=family,
                                                 do_cfg=do_cfg)[1], plan["codes"], plan["half_windows"])
        kinds = list(tables)

    def step(carry, xs):
        x = carry["latents"]
        runtime = None
        if spec is not None:
            runtime = PlanRuntime(spec, xs["codes"], xs["half_windows"], plan["resid_windows"], carry["attn"],
                                  schedules=dict(zip(kinds, xs["schedules"])))
        v = velocity(model, x, xs["t"], cond, family=family, do_cfg=do_cfg, runtime=runtime,
                      batch_sharding=batch_sharding)
        x = euler_step(x, v, xs["sigma"], xs["sigma_next"])
        if report:
            jax.debug.callback(_report, xs["i"], ordered=True)
        new = {"latents": x}
        if spec is not None:
            new["attn"] = runtime.new_state
        return new, None

    xs = {"i": jnp.arange(timesteps.shape[0]), "t": timesteps, "sigma": sigmas[:-1], "sigma_next": sigmas[1:]}
    carry = {"latents": latents}
    if spec is not None:
        xs.update(codes=plan["codes"], half_windows=plan["half_windows"], schedules=[tables[k] for k in kinds])
        carry["attn"] = attn_state
    carry, _ = jax.lax.scan(step, carry, xs)
    # The final carried state is returned (and dropped by the caller) so that the donated initial state can
    # alias it: the scan then updates the caches in place instead of in a second copy.
    return carry["latents"], carry.get("attn")


# The latents and the plan's initial carried state (head caches: tens of GiB at 2048²) are donated, so the scan
# carry reuses their buffers instead of holding a second copy.
scan_sampler = jax.jit(_sampler, static_argnums=(0,),
                       static_argnames=("family", "do_cfg", "report", "spec", "batch_sharding"), donate_argnums=(2, 7))



def split_plan_inputs(plan: dict | None) -> tuple[dict | None, dict | None]:
    """:func:`plan_inputs`' plan (arrays + initial ``state``, or None) as the compiled sampler's two arguments:
    (the plan arrays, the initial carried state)."""
    if plan is None:
        return None, None
    return {k: v for k, v in plan.items() if k != "state"}, plan["state"]


def run_sampler(graphdef, state, latents, cond, timesteps, sigmas, plan=None, **kw):
    """:func:`scan_sampler` on :func:`plan_inputs`' output (``plan``: arrays + initial ``state``, or None) -> the
    final latents. Donates ``latents`` and ``plan["state"]``: build a fresh plan state for every call. ``kw``:
    ``family``, ``do_cfg``, ``report``, ``spec`` (and ``batch_sharding``)."""
    return scan_sampler(graphdef, state, latents, cond, timesteps, sigmas, *split_plan_inputs(plan), **kw)[0]


@dataclasses.dataclass(frozen=True)
class PlanArrays:
    """A plan for one resolution as the sampler takes it: codes / half-windows [steps, layers, heads] (method
    codes of ``dfa2_jax.plan.methods``, half-widths in tokens) and the wars residual half-windows [layers, heads]."""

    codes: np.ndarray
    half_windows: np.ndarray
    resid_windows: np.ndarray

    def __post_init__(self):
        if self.codes.shape != self.half_windows.shape or self.codes.ndim != 3:
            raise ValueError(f"codes {self.codes.shape} and half_windows {self.half_windows.shape} must be one "
                             "[steps, layers, heads] shape")
        if self.resid_windows.shape != self.codes.shape[1:]:
            raise ValueError(f"resid_windows {self.resid_windows.shape} must be [layers, heads] "
                             f"{self.codes.shape[1:]}")


def trace_probe(graphdef, state, latents, cond, probe, *, family: str, do_cfg: bool):
    """One step traced with ``probe`` as the runtime (``jax.eval_shape``: nothing runs) -> the ShapeDtypeStructs
    of the probe's ``shapes``; what else the probe records stays on it. A probe runs dense attention and records
    the per-layer state it needs."""

    def probe_step(state, latents, cond):
        velocity(nnx.merge(graphdef, state), latents, jnp.zeros(()), cond, family=family, do_cfg=do_cfg,
                  runtime=probe)
        return probe.shapes

    return jax.eval_shape(probe_step, state, latents, cond)


def zero_state(graphdef, state, latents, cond, make_probe, *, family: str, do_cfg: bool):
    """Zeros shaped like a probe runtime's ``shapes`` after one traced step (:func:`trace_probe`).
    ``make_probe()`` builds the probe."""
    shapes = trace_probe(graphdef, state, latents, cond, make_probe(), family=family, do_cfg=do_cfg)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


_PROBES: dict = {}  # (graphdef, spec, family, do_cfg, input avals) -> (state ShapeDtypeStructs, call kinds)


def _avals(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


def plan_probe(graphdef, state, latents, cond, spec: RuntimeSpec, *, family: str, do_cfg: bool):
    """What a plan structure needs on these inputs, from one traced step with a :class:`ShapeProbe`: (the
    ShapeDtypeStructs of every per-layer state the plan reads, each compressed layer's kind of kernel call
    ``{layer: CallKind}``). Remembered per model, plan structure and input shapes: the sampler's compile and a
    sampler called again on the same shapes do not trace the model again (about 1 s at FLUX 2048²)."""
    key = (graphdef, spec, family, do_cfg, _avals((state, latents, cond)))
    hit = _PROBES.get(key)
    if hit is None:
        probe = ShapeProbe(spec)
        shapes = trace_probe(graphdef, state, latents, cond, probe, family=family, do_cfg=do_cfg)
        if len(_PROBES) >= 32:
            _PROBES.clear()
        hit = _PROBES[key] = (shapes, dict(probe.kinds))
    return hit


def initial_attention_state(graphdef, state, latents, cond, spec: RuntimeSpec, *, family: str, do_cfg: bool):
    """Zeros for every per-layer state the plan reads (shapes from :func:`plan_probe`)."""
    shapes = plan_probe(graphdef, state, latents, cond, spec, family=family, do_cfg=do_cfg)[0]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def denoise(graphdef, state, latents, cond: dict[str, Any], timesteps, sigmas, *, family: str, do_cfg: bool = False,
            report: bool = False, plan: PlanArrays | None = None, attention_impl: str = "auto"):
    """Run every step of the schedule; latents: SD3 [B, C, H, W], FLUX packed [B, N, C·4].

    ``cond``: ``prompt_embeds``, ``pooled_projections`` (with CFG: [uncond; cond] stacked on the batch, plus
    SD3's ``guidance_scale`` or FLUX's ``true_cfg_scale``), FLUX: ``rope`` (cos, sin) and ``guidance`` [model
    batch] or None. ``timesteps`` [N] and
    ``sigmas`` [N + 1] from :func:`dfa2_jax.scheduler.set_timesteps`. The latents buffer is donated.
    ``report``: call the :func:`progress_hook` after every step (a host callback; off for benchmarks).
    ``plan``: head-wise compression (:class:`PlanArrays` for this resolution); None is dense attention.
    ``attention_impl``: how a plan's compressed heads run (:data:`dfa2_jax.runtime.ATTENTION_IMPLS`: "auto" is the
    Pallas kernel on a GPU and the jnp reference elsewhere); part of the compiled sampler's key.
    """
    spec, plan_in = plan_inputs(graphdef, state, latents, cond, timesteps, plan, family=family, do_cfg=do_cfg,
                                attention_impl=attention_impl)
    return run_sampler(graphdef, state, latents, cond, jnp.asarray(timesteps), jnp.asarray(sigmas), plan_in,
                             family=family, do_cfg=do_cfg, report=report, spec=spec)


def plan_inputs(graphdef, state, latents, cond, timesteps, plan: PlanArrays | None, *, family: str, do_cfg: bool,
                attention_impl: str = "auto"):
    """(static :class:`RuntimeSpec`, the sampler's plan arrays and initial carried state) or (None, None).
    ``attention_impl``: see :func:`denoise`."""
    if plan is None:
        return None, None
    if plan.codes.shape[0] != len(timesteps):
        raise ValueError(f"the plan has {plan.codes.shape[0]} steps; the schedule has {len(timesteps)}")
    spec = RuntimeSpec.from_codes(plan.codes, cfg=do_cfg, impl=attention_impl)
    plan_in = {"codes": jnp.asarray(plan.codes, jnp.int32), "half_windows": jnp.asarray(plan.half_windows, jnp.int32),
               "resid_windows": jnp.asarray(plan.resid_windows, jnp.int32),
               "state": initial_attention_state(graphdef, state, latents, cond, spec, family=family, do_cfg=do_cfg)}
    return spec, plan_in
