"""The second-generation testbeds shipped in dfa2_jax/assets/testbed2_{sd3,flux} (world v2, 1024 image tokens): each
loads with our loader and with diffusers, our pipeline equals diffusers' from the same initial latents, and its
samples follow held-out captions; the FLUX-style one shares the SD3-style one's VAE and text encoders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import assert_flux_shares_sd3_encoders, assert_pipeline_output_matches, diffusers_outputs

FAMILIES = ("sd3", "flux")
# docs/testbed2/train_log_{family}.json: models.{family}_params (torch parameters); for SD3 we also hold the fixed
# sin-cos position table (pos_embed_max_size² x width) as a leaf
PARAMS = {"sd3": 13_752_336, "flux": 13_404_688}
SETTINGS = {"sd3": ("sd3", 128, 128, 28, 4.0, 56, "v2"), "flux": ("flux", 128, 128, 28, None, 56, "v2")}
# initial noise in diffusers' layout: SD3 [B, C, H/2, W/2]; FLUX packed [B, (H/4)·(W/4), C·4]
LATENTS = {"sd3": (1, 4, 64, 64), "flux": (1, 1024, 16)}
# Sampling steps of the caption check (both trained for 28). On world.make_batch(1, 4, "heldout", world="v2"),
# seed 0: SD3 0.985 at 8, 12 and 28 steps, and on 6 such captions 0.99 at 6 and 8 steps (per caption of the
# first 2: 1.0, 0.941 at both; 4 steps falls to 0.87); FLUX 0.985 (per caption 1.0, 0.941, 1.0, 1.0) at 4, 6, 8,
# 12 and 28 steps. The test takes the first 2 of these captions.
CAPTION_STEPS = {"sd3": 6, "flux": 4}


@pytest.fixture(scope="module", params=FAMILIES)
def testbed2(request):
    from dfa2_jax.testbed import load_testbed

    return load_testbed(request.param, world="v2")


@pytest.mark.parametrize("family", FAMILIES)
def test_settings_and_short_name(family):
    from dfa2_jax.testbed import GenerationSettings, testbed_path, testbed_settings
    from dfa2_jax.testbed.shipped import MODEL_NAMES, model_path

    assert testbed_settings(family, world="v2") == GenerationSettings(*SETTINGS[family])
    path = testbed_path(family, "v2")
    assert model_path(f"testbed2-{family}") == path and MODEL_NAMES[f"testbed2-{family}"] == (family, "v2")
    info = json.loads(open(os.path.join(path, "testbed_info.json")).read())
    assert info["world_name"] == "v2" and info["weights_dtype"] == "bfloat16"
    with pytest.raises(FileNotFoundError, match=r"no shipped 'sdxl' testbed \(shipped: sd3, flux\) for world v2"):
        testbed_path("sdxl", "v2")


def test_loads_with_1024_image_tokens(testbed2):
    from dfa2_jax.evaluate import image_token_count

    pipe, st = testbed2
    cfg = pipe.transformer.config
    assert pipe.vae_scale_factor == 2 and image_token_count(pipe, st.height, st.width) == 1024
    if pipe.family == "sd3":
        assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size) == (6, 4, 64, 2)
        extra = cfg.pos_embed_max_size ** 2 * cfg.num_attention_heads * cfg.attention_head_dim
    else:
        assert pipe.family == "flux" and not cfg.guidance_embeds and cfg.axes_dims_rope == (8, 28, 28)
        assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.attention_head_dim,
                cfg.patch_size) == (3, 6, 4, 64, 1)
        extra = 0
    assert pipe.transformer.num_params() == PARAMS[pipe.family] + extra
    assert str(np.dtype(pipe.dtype)) == "float32"  # bfloat16 on disk, upcast on load


def test_flux_shares_the_sd3_encoders():
    assert_flux_shares_sd3_encoders("v2")  # trained with --reuse dfa2_jax/assets/testbed2_sd3


def test_matches_diffusers_from_the_same_latents(testbed2):
    """diffusers' pipeline (StableDiffusion3Pipeline, FluxPipeline) on the shipped folder vs ours: 1 held-out
    caption, 2 steps, the folder's settings (SD3: CFG 4; FLUX: no guidance), float32 on the CPU; the tolerance is
    the one every pipeline parity test uses (``assert_pipeline_output_matches``). Achieved (jax 0.10.2, diffusers
    0.42.1): final latents max relative error SD3 1.3e-6, FLUX 1.6e-6; decoded images 60.6 and 60.1 dB."""
    from dfa2_jax.testbed import testbed_path, world

    pipe, st = testbed2
    _, prompts, _ = world.make_batch(0, 1, "heldout", world="v2")
    latents = np.random.default_rng(3).standard_normal(LATENTS[pipe.family], np.float32)
    kw = {**st.generate_kwargs(), "num_inference_steps": 2}
    ref_lat, ref_img = diffusers_outputs(testbed_path(pipe.family, "v2"), pipe.family, prompts, latents, kw)
    out = pipe(prompts, latents=latents, **kw)
    assert out.images[0].size == (128, 128)
    assert_pipeline_output_matches(out, ref_lat, ref_img, f"testbed2_{pipe.family}")


def test_samples_follow_their_captions(testbed2):
    """Two held-out captions at CAPTION_STEPS[family] steps."""
    from dfa2_jax.testbed import world
    from dfa2_jax.testbed.classifier import load_classifier, prompt_accuracy

    pipe, st = testbed2
    _, captions, _ = world.make_batch(1, 2, "heldout", world="v2")
    out = pipe(captions, seed=0, **{**st.generate_kwargs(), "num_inference_steps": CAPTION_STEPS[pipe.family]})
    acc = prompt_accuracy(out.images, captions, classifier=load_classifier(world="v2"))
    assert acc.mean() >= 0.9, f"prompt accuracy {acc.round(3)} (mean {acc.mean():.3f})"
