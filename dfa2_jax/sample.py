"""The scanned flow-match sampler: the whole denoising loop is one jit-compiled ``lax.scan`` over timesteps.

Params, latents and conditioning go in as arguments (nothing is closed over); the scan carry is a dict,
``{"latents": x}`` now, where the plan runtime adds its per-layer head caches. The per-step inputs
(timestep, σ, σ_next) are scan inputs, so one compiled sampler serves every schedule of the same length.

SD3: classifier-free guidance on the batch [uncond, cond] (diffusers' order), v = u + g·(c − u).
FLUX: guidance embedding (dev) or none (schnell); the transformer receives t / 1000 as diffusers passes it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dfa2_jax.scheduler import euler_step


def _velocity(model, x, t, cond: dict[str, Any], *, family: str, do_cfg: bool):
    """One transformer evaluation at timestep t (diffusers' scale: 0..1000) -> velocity, x's shape."""
    if family == "sd3":
        model_in = jnp.concatenate([x, x], axis=0) if do_cfg else x
        ts = jnp.broadcast_to(t, (model_in.shape[0],))
        v = model(model_in, cond["prompt_embeds"], cond["pooled_projections"], ts)
        if do_cfg:
            uncond, text = jnp.split(v, 2, axis=0)
            v = uncond + cond["guidance_scale"] * (text - uncond)
        return v
    ts = jnp.broadcast_to(t, (x.shape[0],)).astype(x.dtype) / 1000
    return model(x, cond["prompt_embeds"], cond["pooled_projections"], ts, cond["rope"], cond.get("guidance"))


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


def _scan_denoise(graphdef, state, latents, cond, timesteps, sigmas, *, family: str, do_cfg: bool, report: bool):
    model = nnx.merge(graphdef, state)

    def step(carry, xs):
        i, t, sigma, sigma_next = xs
        x = carry["latents"]
        v = _velocity(model, x, t, cond, family=family, do_cfg=do_cfg)
        x = euler_step(x, v, sigma, sigma_next)
        if report:
            jax.debug.callback(_report, i, ordered=True)
        return {**carry, "latents": x}, None

    steps = jnp.arange(timesteps.shape[0])
    carry, _ = jax.lax.scan(step, {"latents": latents}, (steps, timesteps, sigmas[:-1], sigmas[1:]))
    return carry["latents"]


_scan_denoise_jit = jax.jit(_scan_denoise, static_argnums=(0,), static_argnames=("family", "do_cfg", "report"),
                            donate_argnums=(2,))


def denoise(graphdef, state, latents, cond: dict[str, Any], timesteps, sigmas, *, family: str, do_cfg: bool = False,
            report: bool = False):
    """Run every step of the schedule; latents: SD3 [B, C, H, W], FLUX packed [B, N, C·4].

    ``cond``: ``prompt_embeds``, ``pooled_projections`` (SD3 with CFG: [uncond; cond] stacked on the batch,
    plus ``guidance_scale``), FLUX: ``rope`` (cos, sin) and ``guidance`` [B] or None. ``timesteps`` [N] and
    ``sigmas`` [N + 1] from :func:`dfa2_jax.scheduler.set_timesteps`. The latents buffer is donated.
    ``report``: call the :func:`progress_hook` after every step (a host callback; off for benchmarks).
    """
    return _scan_denoise_jit(graphdef, state, latents, cond, jnp.asarray(timesteps), jnp.asarray(sigmas),
                             family=family, do_cfg=do_cfg, report=report)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("family", "do_cfg"))
def _one_step(graphdef, state, x, cond, t, sigma, sigma_next, *, family: str, do_cfg: bool):
    model = nnx.merge(graphdef, state)
    return euler_step(x, _velocity(model, x, t, cond, family=family, do_cfg=do_cfg), sigma, sigma_next)


def denoise_loop(graphdef, state, latents, cond, timesteps, sigmas, *, family: str, do_cfg: bool = False,
                 callback=None):
    """The same steps as :func:`denoise` in a Python loop (one jitted step per call): the reference the scan
    is tested against, and the path that can report progress per step (``callback(i, latents)``)."""
    x = jnp.asarray(latents)
    for i in range(len(timesteps)):
        x = _one_step(graphdef, state, x, cond, jnp.asarray(timesteps[i]), jnp.asarray(sigmas[i]),
                      jnp.asarray(sigmas[i + 1]), family=family, do_cfg=do_cfg)
        if callback is not None:
            callback(i, x)
    return x
