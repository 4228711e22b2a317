"""Our Flax transformers equal diffusers' on the same weights and inputs (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dfa2_jax
from tests.conftest import TINY, diffusers_forward, inputs_for, max_rel_err

# Achieved on CPU/float32 (jax 0.10.2, torch 2.13.0, diffusers 0.42.1): SD3 5.8e-7, SD3.5 8.9e-7, FLUX-dev
# 2.6e-6, FLUX-schnell 9.1e-7 (max |ours - diffusers| / max |diffusers|). Bound: 1e-5.
MAX_REL = 1e-5


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("shape", [(16, 12, 7), (8, 8, 13)], ids=["nonsquare-t7", "square-t13"])
def test_parity_with_diffusers(tiny_folders, tmp_path, name, shape):
    model, folder = tiny_folders[name]
    h, w, t = shape
    inputs = inputs_for(model, name, height=h, width=w, text_len=t)
    ref = diffusers_forward(model, inputs)
    ours = dfa2_jax.load_transformer(folder, cache_dir=str(tmp_path))
    out = np.asarray(ours(**inputs))
    assert out.shape == ref.shape
    err = max_rel_err(out, ref)
    assert err <= MAX_REL, f"{name}: max relative error {err:.2e} > {MAX_REL}"


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seq=st.integers(1, 9), heads=st.integers(1, 3), pairs=st.integers(1, 8), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_rms_norm_with_rope_is_norm_then_rope(seq, heads, pairs, seed, dtype):
    """RMSNorm(x, rope) — the rotation applied to the input, one rounding at the end — equals RMSNorm followed
    by :func:`apply_rope` computed in float32 (float32: 2e-6 relative; bfloat16: one rounding, 1/128)."""
    import jax.numpy as jnp

    from dfa2_jax.models.layers import RMSNorm, apply_rope

    rng = np.random.default_rng(seed)
    d = 2 * pairs
    x = jnp.asarray(rng.standard_normal((2, seq, heads, d)) * 3, dtype)
    norm = RMSNorm(d)
    norm.scale.value = jnp.asarray(rng.uniform(0.5, 1.5, d), jnp.float32)
    angles = rng.uniform(0, 2 * np.pi, (seq, pairs)).repeat(2, axis=1)
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    xf = x.astype(jnp.float32)
    want = np.asarray(apply_rope(norm(xf), cos, sin))
    got = np.asarray(norm(x, (cos, sin)).astype(jnp.float32))
    tol = 2e-6 if dtype == "float32" else 2.0 ** -7
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
