"""The scanned flow-match sampler: the whole denoising loop is one jit-compiled ``lax.scan`` over timesteps.

Params, latents and conditioning go in as arguments (nothing is closed over); the scan carry is a dict,
``{"latents": x}`` now, where the plan runtime adds its per-layer head caches. The per-step inputs
(timestep, σ, σ_next) are scan inputs, so one compiled sampler serves every schedule of the same length.

SD3: classifier-free guidance on the batch [uncond, cond] (diffusers' order), v = u + g·(c − u).
FLUX: guidance embedding (dev) or none (schnell); the transformer receives t / 1000 as diffusers passes it.
"""

from __future__ import annotations

import functools
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


def _scan_denoise(graphdef, state, latents, cond, timesteps, sigmas, *, family: str, do_cfg: bool):
    model = nnx.merge(graphdef, state)

    def step(carry, xs):
        t, sigma, sigma_next = xs
        x = carry["latents"]
        v = _velocity(model, x, t, cond, family=family, do_cfg=do_cfg)
        return {**carry, "latents": euler_step(x, v, sigma, sigma_next)}, None

    carry, _ = jax.lax.scan(step, {"latents": latents}, (timesteps, sigmas[:-1], sigmas[1:]))
    return carry["latents"]


_scan_denoise_jit = jax.jit(_scan_denoise, static_argnums=(0,), static_argnames=("family", "do_cfg"),
                            donate_argnums=(2,))


def denoise(graphdef, state, latents, cond: dict[str, Any], timesteps, sigmas, *, family: str, do_cfg: bool = False):
    """Run every step of the schedule; latents: SD3 [B, C, H, W], FLUX packed [B, N, C·4].

    ``cond``: ``prompt_embeds``, ``pooled_projections`` (SD3 with CFG: [uncond; cond] stacked on the batch,
    plus ``guidance_scale``), FLUX: ``rope`` (cos, sin) and ``guidance`` [B] or None. ``timesteps`` [N] and
    ``sigmas`` [N + 1] from :func:`dfa2_jax.scheduler.set_timesteps`. The latents buffer is donated.
    """
    return _scan_denoise_jit(graphdef, state, latents, cond, jnp.asarray(timesteps), jnp.asarray(sigmas),
                             family=family, do_cfg=do_cfg)


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
