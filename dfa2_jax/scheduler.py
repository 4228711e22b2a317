"""Flow-match Euler schedule, equal to diffusers' ``FlowMatchEulerDiscreteScheduler`` as the SD3 and FLUX
pipelines drive it.

The schedule is host data (numpy, computed in the same float64/float32 order as diffusers, so sigmas match to
the last bit of float32); the step is a pure jnp function used inside the scanned sampler:

- SD3 (static shift s = 3.0): sigmas = linspace(t(σ_max), t(σ_min), N) / 1000 with σ_min already shifted
  once at construction, shifted again here — diffusers' "second shift of sigma_min" — σ' = sσ / (1 + (s−1)σ).
- FLUX.1-dev (dynamic shift): the pipeline passes sigmas = linspace(1, 1/N, N) and
  mu = linear(image_seq_len; 256 → 0.5, 4096 → 1.15); σ' = e^mu / (e^mu + (1/σ − 1)).
- FLUX.1-schnell: shift 1, no dynamic shifting (σ' = σ).
timesteps = σ' · 1000; a terminal σ = 0 is appended.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSUPPORTED_TRUE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling", "use_flow_sigmas")


@dataclasses.dataclass(frozen=True, slots=True)
class FlowMatchEulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    @classmethod
    def sd3(cls) -> FlowMatchEulerConfig:
        return cls(shift=3.0)

    @classmethod
    def flux_dev(cls) -> FlowMatchEulerConfig:
        return cls(shift=3.0, use_dynamic_shifting=True)

    @classmethod
    def flux_schnell(cls) -> FlowMatchEulerConfig:
        return cls(shift=1.0)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "scheduler_config") -> FlowMatchEulerConfig:
        name = d.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{source}: scheduler {name!r} is not supported (FlowMatchEulerDiscreteScheduler only)")
        for key in _UNSUPPORTED_TRUE:
            if d.get(key):
                raise ValueError(f"{source}: {key}=true is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        if kwargs.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise ValueError(f"{source}: time_shift_type must be 'exponential' or 'linear'")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> FlowMatchEulerConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f), str(path))


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """FLUX pipeline's mu: linear in the packed image sequence length."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _time_shift(config: FlowMatchEulerConfig, mu: float, t: np.ndarray) -> np.ndarray:
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def set_timesteps(config: FlowMatchEulerConfig, num_inference_steps: int, *, sigmas=None, mu: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [N], sigmas float32 [N + 1] ending in 0) exactly as diffusers' ``set_timesteps``."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
    if config.use_dynamic_shifting and mu is None:
        raise ValueError("this scheduler uses dynamic shifting: `mu` must be given")
    n = config.num_train_timesteps
    # Construction: sigmas of the training schedule (float32), statically shifted unless dynamic.
    train = (np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)).astype(np.float32)
    if not config.use_dynamic_shifting:
        s = config.shift
        train = (s * train / (1 + (s - 1) * train)).astype(np.float32)
    sigma_min, sigma_max = float(train[-1]), float(train[0])
    if sigmas is None:
        timesteps = np.linspace(sigma_max * n, sigma_min * n, num_inference_steps)
        sig = timesteps / n
    else:
        sig = np.array(sigmas).astype(np.float32)
        if len(sig) != num_inference_steps:
            raise ValueError(f"len(sigmas)={len(sig)} must equal num_inference_steps={num_inference_steps}")
    if config.use_dynamic_shifting:
        sig = _time_shift(config, mu, sig)
    else:
        s = config.shift
        sig = s * sig / (1 + (s - 1) * sig)
    if config.shift_terminal:
        one_minus = 1 - sig
        scale = one_minus[-1] / (1 - config.shift_terminal)
        sig = 1 - (one_minus / scale)
    sig32 = np.asarray(sig).astype(np.float32)
    timesteps32 = (sig32 * np.float32(n)).astype(np.float32)
    return timesteps32, np.concatenate([sig32, np.zeros(1, np.float32)])


def euler_step(sample: jax.Array, model_output: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """x_{t+1} = x_t + (σ_next − σ)·v, in float32, cast back to the model output's dtype (as diffusers)."""
    prev = sample.astype(jnp.float32) + (sigma_next - sigma).astype(jnp.float32) * model_output.astype(jnp.float32)
    return prev.astype(model_output.dtype)
