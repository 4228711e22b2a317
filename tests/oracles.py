"""Test-only oracles: slow, obviously-right twins of library code (the mask as loops, masked attention, the
sampler as a Python loop of jitted steps) and a stand-in for a diffusion model's imperfect pictures."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfa2_jax.runtime import PlanRuntime, RuntimeSpec
from dfa2_jax.sample import PlanArrays, initial_attention_state, velocity
from dfa2_jax.scheduler import euler_step


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention with a per-head mask: q, k, v [B, S, H, D], mask [H, S, S] -> [B, S, H, D].

    Softmax in float32; every row keeps at least its text keys (or, without text, its own position), so no
    row is empty.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    logits = jnp.where(mask[None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


def brute_force_mask(seq_len: int, text_len: int, text_first: bool, half_window: int) -> np.ndarray:
    """The official formula written as loops (tests): (|q − kv| ≤ window//2) | q is text | kv is text, indices
    over image tokens, window = 2·half_window (so window//2 = half_window)."""
    n_img = seq_len - text_len
    out = np.zeros((seq_len, seq_len), bool)
    for i in range(seq_len):
        for j in range(seq_len):
            if text_first:
                qi_text, kj_text, qi, kj = i < text_len, j < text_len, i - text_len, j - text_len
            else:
                qi_text, kj_text, qi, kj = i >= n_img, j >= n_img, i, j
            out[i, j] = half_window < 0 or qi_text or kj_text or abs(qi - kj) <= half_window
    return out


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("family", "do_cfg", "spec"))
def _one_step(graphdef, state, x, cond, t, sigma, sigma_next, step_plan, *, family: str, do_cfg: bool,
              spec: RuntimeSpec | None):
    model = nnx.merge(graphdef, state)
    runtime = None
    if spec is not None:
        runtime = PlanRuntime(spec, step_plan["codes"], step_plan["half_windows"], step_plan["resid_windows"],
                              step_plan["state"])
    x = euler_step(x, velocity(model, x, t, cond, family=family, do_cfg=do_cfg, runtime=runtime), sigma, sigma_next)
    return x, (runtime.new_state if runtime is not None else None)


def denoise_loop(graphdef, state, latents, cond, timesteps, sigmas, *, family: str, do_cfg: bool = False,
                 callback=None, plan: PlanArrays | None = None, attention_impl: str = "auto"):
    """The same steps as :func:`dfa2_jax.sample.denoise` in a Python loop (one jitted step per call): the reference the scan
    is tested against (``callback(i, latents)`` after each step)."""
    x = jnp.asarray(latents)
    spec, attn = None, None
    if plan is not None:
        spec = RuntimeSpec.from_codes(plan.codes, cfg=do_cfg, impl=attention_impl)
        attn = initial_attention_state(graphdef, state, x, cond, spec, family=family, do_cfg=do_cfg)
    for i in range(len(timesteps)):
        step_plan = None
        if plan is not None:
            step_plan = {"codes": jnp.asarray(plan.codes[i]), "half_windows": jnp.asarray(plan.half_windows[i]),
                         "resid_windows": jnp.asarray(plan.resid_windows), "state": attn}
        x, attn = _one_step(graphdef, state, x, cond, jnp.asarray(timesteps[i]), jnp.asarray(sigmas[i]),
                            jnp.asarray(sigmas[i + 1]), step_plan, family=family, do_cfg=do_cfg, spec=spec)
        if callback is not None:
            callback(i, x)
    return x


def degrade(images: np.ndarray, seed: int) -> np.ndarray:
    """A 3-tap [1, 2, 1]/4 blur (σ ≈ 0.7 px) plus Gaussian noise of σ = 6: roughly a diffusion model's output."""
    x = images.astype(np.float64)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    x = (x[:, :, :-2] + 2 * x[:, :, 1:-1] + x[:, :, 2:]) / 4
    x = x + np.random.default_rng(seed).normal(0, 6, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
