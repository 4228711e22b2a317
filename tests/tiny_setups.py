"""Tiny random SD3 / FLUX transformers with conditioning, latents and a schedule, for the sampler-level tests
(tests/test_runtime.py, and tests/_sharding_check.py in its 4-device subprocess)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import dfa2_jax
from dfa2_jax.pipeline import flux_image_ids
from dfa2_jax.scheduler import FlowMatchEulerConfig, set_timesteps
from dfa2_jax.transformer import flux_rope


def sd3_setup(batch: int, steps: int):
    """3-layer SD3 (layer 0 dual attention, RMS qk-norm, 4 heads) with CFG -> (transformer, cond, latents,
    timesteps, sigmas, sampler kwargs, (image tokens, text tokens))."""
    cfg = dfa2_jax.SD3Config(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                             num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                             pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                             dual_attention_layers=(0,), qk_norm="rms_norm")
    tr = dfa2_jax.random_transformer(cfg, dtype="float32", seed=1)
    rng = np.random.default_rng(0)
    cond = {"prompt_embeds": jnp.asarray(rng.standard_normal((2 * batch, 5, 32)), jnp.float32),
            "pooled_projections": jnp.asarray(rng.standard_normal((2 * batch, 16)), jnp.float32),
            "guidance_scale": jnp.asarray(4.0)}
    latents = jnp.asarray(rng.standard_normal((batch, 4, 8, 6)), jnp.float32)
    t, s = set_timesteps(FlowMatchEulerConfig.sd3(), steps)
    return tr, cond, latents, t, s, dict(family="sd3", do_cfg=True), (4 * 3, 5)


def flux_setup(batch: int, steps: int, heads: int):
    """2 + 2-layer FLUX with the guidance embedding -> the same tuple as :func:`sd3_setup`."""
    cfg = dfa2_jax.FluxConfig(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                              num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16,
                              guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    tr = dfa2_jax.random_transformer(cfg, dtype="float32", seed=2)
    rng = np.random.default_rng(1)
    cond = {"prompt_embeds": jnp.asarray(rng.standard_normal((batch, 7, 32)), jnp.float32),
            "pooled_projections": jnp.asarray(rng.standard_normal((batch, 16)), jnp.float32),
            "rope": flux_rope(cfg, np.zeros((7, 3)), flux_image_ids(8, 6)), "guidance": jnp.full((batch,), 3.5)}
    latents = jnp.asarray(rng.standard_normal((batch, 12, 8)), jnp.float32)
    t, s = set_timesteps(FlowMatchEulerConfig.flux_schnell(), steps, sigmas=np.linspace(1, 1 / steps, steps))
    return tr, cond, latents, t, s, dict(family="flux", do_cfg=False), (12, 7)
