"""Our Flax transformers equal diffusers' on the same weights and inputs (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

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
