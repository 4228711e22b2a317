"""The progressive calibration pass of DiTFastAttnV2 (paper §3.3; the official ``calibration`` loop).

One pass over the calibration prompts, step by step, layer by layer, all prompts in one batch:

1. at layer ℓ of step t the full output y_o and every candidate's output y_m are computed per head (one jitted
   step function, candidates batched per layer); RSE(h, m) = mean((y_m − y_o)²) / mean((y_o − mean y_o)²)
   over batch, tokens and head_dim;
2. the RSE table goes to the host (``io_callback``, ordered) where CP-SAT chooses per head
   (:mod:`dfa2_jax.calibrate.solver`, pre-filter RSE < c·δ/H, Σ RSE ≤ δ, maximise Σ saving);
3. the chosen compressed output is what layer ℓ passes on, so later layers and later steps see the
   compressed model; the ``cache`` candidate of step t is the head's (compressed) output of step t − 1, and the
   ``wars`` residual is refreshed at the head's ``full`` steps.

Step 0 is full for every head (the plan format requires it); it fills the caches and residuals.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfa2_jax.plan import methods as M
from dfa2_jax.models.attention import TokenLayout, arrow_attention_banded, dense_attention
from dfa2_jax.runtime import arrow_heads, check_attention_impl, uses_kernel
from dfa2_jax.sample import velocity, zero_state
from dfa2_jax.scheduler import euler_step

# The host side of the in-jit solver call: the active calibration run (set by ``run_step``).
_run_lock = threading.Lock()
_active: list[Callable[[int, int, np.ndarray], np.ndarray]] = []


def _host_choose(step, layer, rse):
    return _active[-1](int(step), int(layer), np.asarray(rse)).astype(np.int32)


def rse_table(y_o: jax.Array, cands: list[jax.Array]) -> jax.Array:
    """RSE [H, M] of candidate outputs vs the full output; all [B, S, H, D]; statistics in float32."""
    yo = y_o.astype(jnp.float32)
    var = jnp.mean(jnp.square(yo - jnp.mean(yo, axis=(0, 1, 3), keepdims=True)), axis=(0, 1, 3))  # [H]
    errs = [jnp.mean(jnp.square(c.astype(jnp.float32) - yo), axis=(0, 1, 3)) for c in cands]
    return jnp.stack(errs, axis=1) / jnp.maximum(var, 1e-30)[:, None]


class CalibrationRuntime:
    """Runtime for one calibration step: computes candidates, asks the host for the choice, passes the chosen
    output on and updates the per-layer state (head caches, wars residuals per k)."""

    def __init__(self, candidates: tuple[M.Method, ...], n_img: int, cfg: bool, state, step, impl: str):
        self.candidates, self.n_img, self.cfg, self.impl = candidates, n_img, cfg, impl
        self.state, self.step = state, step
        self.new_state: dict[str, dict[str, jax.Array]] = {}
        self.wars_ks = sorted({m.k for m in candidates if m.code == M.WARS})

    def _band(self, q, k, v, layout: TokenLayout, kk: int) -> jax.Array:
        # One band for every head: the Pallas kernel (one launch, out-of-band key blocks never loaded), or off
        # the kernel the banded jnp form (O(S·(T + block + 2w)) memory, no S² mask).
        n_img = q.shape[1] - layout.text_len
        w = M.Method(M.ARROW, kk).half_window(n_img)
        if uses_kernel(self.impl, q):
            return arrow_heads(q, k, v, jnp.full((q.shape[2],), w, jnp.int32), layout, None, self.impl)
        return arrow_attention_banded(q, k, v, w, text_len=layout.text_len, text_first=layout.text_first)

    def _shared(self, o):
        half = o.shape[0] // 2
        return jnp.concatenate([o[half:], o[half:]], axis=0)

    def __call__(self, q, k, v, *, layer: int, layout: TokenLayout) -> jax.Array:
        y_o = dense_attention(q, k, v)
        old = self.state[str(layer)]
        bands: dict[int, jax.Array] = {}

        def band(kk):
            if kk not in bands:
                bands[kk] = self._band(q, k, v, layout, kk)
            return bands[kk]

        new = {}
        # Step 0 runs this same compiled step; the host answers "full" for every head there.
        cands = []
        for m in self.candidates:
            if m.code == M.ARROW:
                cands.append(band(m.k))
            elif m.code == M.CACHE:
                cands.append(old["heads"].astype(y_o.dtype))
            elif m.code == M.WARS:
                cands.append(band(m.k) + old[f"resid{m.k}"].astype(y_o.dtype))
            elif m.code == M.CFG_SHARE:
                cands.append(self._shared(y_o))
            elif m.code == M.CFG_SHARE_ARROW:
                cands.append(self._shared(band(m.k)))
            else:  # pragma: no cover - parse_candidates admits no other code
                raise ValueError(f"candidate {m.name} cannot be calibrated")
        rse = rse_table(y_o, cands)
        choice = jax.experimental.io_callback(
            _host_choose, jax.ShapeDtypeStruct((q.shape[2],), jnp.int32), self.step, jnp.int32(layer), rse,
            ordered=True)
        o = y_o
        for i, c in enumerate(cands):
            o = jnp.where((choice == i)[None, None, :, None], c, o)
        new["heads"] = o
        for kk in self.wars_ks:  # residual full − window, refreshed where the head ran full
            resid = y_o - band(kk)
            new[f"resid{kk}"] = jnp.where((choice == -1)[None, None, :, None], resid, old[f"resid{kk}"])
        self.new_state[str(layer)] = new
        return o

    def run_layer(self, layer: int, compute):
        return compute()


class _StateProbe:
    """Dense runtime recording every layer's state shapes (for the initial zeros)."""

    def __init__(self, wars_ks):
        self.wars_ks, self.shapes = wars_ks, {}

    def __call__(self, q, k, v, *, layer, layout):
        o = dense_attention(q, k, v)
        self.shapes[str(layer)] = {"heads": o, **{f"resid{kk}": o for kk in self.wars_ks}}
        return o

    def run_layer(self, layer, compute):
        return compute()


def initial_state(graphdef, params, latents, cond, candidates, *, family: str, do_cfg: bool):
    wars_ks = sorted({m.k for m in candidates if m.code == M.WARS})
    return zero_state(graphdef, params, latents, cond, lambda: _StateProbe(wars_ks), family=family, do_cfg=do_cfg)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("family", "do_cfg", "candidates", "n_img", "impl"))
def calibration_step(graphdef, params, x, cond, t, sigma, sigma_next, state, step, *, family: str, do_cfg: bool,
                     candidates: tuple[M.Method, ...], n_img: int, impl: str = "auto"):
    """One denoising step of the calibration pass -> (latents, new state). One compile serves every step:
    step 0 differs only in the host's answers (every head full). ``impl``: how the arrow candidates are
    computed (:func:`dfa2_jax.runtime.check_attention_impl`)."""
    rt = CalibrationRuntime(candidates, n_img, do_cfg, state, step, impl)
    v = velocity(nnx.merge(graphdef, params), x, t, cond, family=family, do_cfg=do_cfg, runtime=rt)
    return euler_step(x, v, sigma, sigma_next), rt.new_state


def run_step(choose: Callable[[int, int, np.ndarray], np.ndarray], *args, **kwargs):
    """``calibration_step`` with ``choose(step, layer, rse [H, M]) -> choice [H]`` answering the solver calls."""
    kwargs["impl"] = check_attention_impl(kwargs.get("impl"))
    with _run_lock:
        _active.append(choose)
        try:
            out = calibration_step(*args, **kwargs)
            return jax.block_until_ready(out)
        finally:
            _active.remove(choose)


__all__ = ["CalibrationRuntime", "calibration_step", "initial_state", "rse_table", "run_step"]
