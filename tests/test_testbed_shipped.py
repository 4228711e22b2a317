"""The testbeds shipped in dfa2_jax/assets/testbed_{sd3,flux}: each loads with our loader and with diffusers, our
JAX pipeline equals diffusers' from the same initial latents, its samples follow their captions, a short
calibration compresses it, and ``dfa2 demo`` runs on the SD3-style one end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import assert_flux_shares_sd3_encoders, assert_pipeline_output_matches, diffusers_outputs

# prompt accuracy of a 4-step generation of world.make_batch(0, 4, "heldout") with seed 0, measured on CPU with
# jax 0.10.2: 0.859 (per caption 0.778, 1.0, 0.889, 0.769). Other caption sets / seeds measured 0.77-0.95.
ACC_4_STEPS_MIN = 0.75


@pytest.fixture(scope="module")
def testbed():
    from dfa2_jax.testbed import load_testbed

    return load_testbed()


def test_testbed_path_and_settings():
    from dfa2_jax.testbed import GenerationSettings, testbed_path, testbed_settings

    path = testbed_path()
    assert os.path.isfile(os.path.join(path, "model_index.json"))
    info = json.loads(open(os.path.join(path, "testbed_info.json")).read())
    st = testbed_settings()
    assert st == GenerationSettings("sd3", 64, 64, 28, 4.0, 32)
    assert (st.height, st.max_sequence_length, st.guidance_scale) == (info["height"], info["max_sequence_length"],
                                                                      info["guidance_scale"])
    assert st.generate_kwargs() == {"height": 64, "width": 64, "num_inference_steps": 28, "guidance_scale": 4.0,
                                    "max_sequence_length": 32}
    with pytest.raises(FileNotFoundError, match=r"no shipped 'sdxl' testbed \(shipped: sd3, flux\)"):
        testbed_path("sdxl")
    flux = testbed_settings("flux")
    assert flux == GenerationSettings("flux", 64, 64, 28, None, 32)
    assert flux.generate_kwargs() == {"height": 64, "width": 64, "num_inference_steps": 28, "max_sequence_length": 32}


def test_loads_with_our_loader(testbed):
    pipe, _ = testbed
    cfg = pipe.transformer.config
    assert pipe.family == "sd3" and pipe.vae_scale_factor == 4
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size) == (6, 4, 32, 2)
    # docs/testbed/train_log_sd3.json models.sd3_params = 3_484_688 counts torch parameters; we also hold the fixed
    # sin-cos position table (a diffusers buffer, pos_embed_max_size² x 128) as a leaf
    assert pipe.transformer.num_params() == 3_484_688 + 32 * 32 * 128
    assert str(np.dtype(pipe.dtype)) == "float32"


def test_matches_diffusers_from_the_same_latents(testbed):
    """diffusers' StableDiffusion3Pipeline on the shipped folder vs ours: 2 held-out captions, 4 steps, CFG 4."""
    pipe, st = testbed
    _matches_diffusers(pipe, st, (2, 4, 16, 16))


def _matches_diffusers(pipe, settings, latent_shape) -> None:
    """Our pipeline vs diffusers' on the shipped folder: 2 held-out captions, 4 steps, the same initial latents
    (seeded, ``latent_shape``), the testbed's settings."""
    from dfa2_jax.testbed import testbed_path, world

    _, prompts, _ = world.make_batch(0, 2, "heldout")
    latents = np.random.default_rng(3).standard_normal(latent_shape, np.float32)
    kw = {**settings.generate_kwargs(), "num_inference_steps": 4}
    ref_lat, ref_img = diffusers_outputs(testbed_path(settings.family), settings.family, prompts, latents, kw)
    out = pipe(prompts, latents=latents, **kw)
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    assert_pipeline_output_matches(out, ref_lat, ref_img, f"testbed_{settings.family}")


def test_four_step_samples_follow_their_captions(testbed):
    from dfa2_jax.testbed import world
    from dfa2_jax.testbed.classifier import prompt_accuracy

    pipe, st = testbed
    _, captions, _ = world.make_batch(0, 4, "heldout")
    out = pipe(captions, seed=0, **{**st.generate_kwargs(), "num_inference_steps": 4})
    acc = prompt_accuracy(out.images, captions)
    assert acc.shape == (4,) and np.all((acc >= 0) & (acc <= 1))
    assert acc.mean() >= ACC_4_STEPS_MIN, f"prompt accuracy {acc.round(3)} (mean {acc.mean():.3f})"


def test_short_calibration_compresses_some_heads(testbed):
    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.cli.demo import TESTBED_CANDIDATES
    from dfa2_jax.plan import model_info_for
    from dfa2_jax.testbed import world

    pipe, st = testbed
    _, captions, _ = world.make_batch(0, 2, "heldout")
    res = calibrate(pipe, captions, resolution=64, steps=6, delta=0.1, candidates=TESTBED_CANDIDATES,
                    guidance_scale=st.guidance_scale, savings="exact", progress=False,
                    max_sequence_length=st.max_sequence_length)
    plan = res.plan
    plan.validate(model_info_for(pipe.transformer.config, 77 + st.max_sequence_length), n_img=64, cfg=True)
    a = np.asarray(plan.assignment)
    assert a.shape == (6, 6, 4) and plan.methods == ["full", "arrow:2", "arrow:4", "arrow:8", "cache"]
    assert (a[0] == 0).all()
    compressed = int((a[1:] != 0).sum())
    assert 0 < compressed < a[1:].size, f"{compressed} of {a[1:].size} (step >= 1) head slots compressed"
    kept = res.summary["attention_flops_kept"]
    assert 0.0 < kept < 1.0
    assert plan.calibration["image_tokens"] == 64 and plan.model["text_tokens"] == 109


def test_demo_end_to_end(tmp_path, capsys):
    """``dfa2 demo`` on the testbed, shortened (6 steps, 2 + 2 captions, one call of each kind)."""
    from PIL import Image

    from dfa2_jax.cli import main
    from dfa2_jax.plan import Plan

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "6", "--calibration-prompts", "2", "--eval-prompts", "2",
                 "--repeat", "1"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 2 held-out captions" in printed and "demo done in" in printed
    plan = Plan.load(out / "plan.json")
    assert plan.steps == 6 and plan.calibration["savings"] == "exact"
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 6 and report["resolution"] == [64, 64] and report["guidance_scale"] == 4.0
    assert len(report["per_image"]) == 2 and report["text_tokens"] == 109 and report["image_tokens"] == 64
    pa = report["prompt_accuracy"]
    assert len(pa["dense"]) == 2 and 0 <= pa["mean"]["compressed"] <= 1
    assert report["attention_flops_kept"]["exact"] == pytest.approx(plan.stats["attention_flops_kept"])
    assert report["demo"]["calibration_captions"] == (out / "prompts_calibration.txt").read_text().splitlines()
    evals = (out / "prompts_eval.txt").read_text().splitlines()
    assert evals == report["prompts"] and not set(evals) & set(report["demo"]["calibration_captions"])
    assert np.asarray(Image.open(out / "grid.png")).shape[1] == 128
    world_grid = np.asarray(Image.open(out / "grid_world.png"))
    assert world_grid.shape[1] == 192 and world_grid.std() > 0
    assert (out / "plan.png").is_file()


def test_demo_rejects_bad_options(tmp_path, capsys):
    from dfa2_jax.cli import main

    assert main(["demo", "--out", str(tmp_path), "--size", "32"]) == 2
    assert "trained at 64x64 only" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--model", "tiny-random", "--eval-prompts", "2"]) == 2
    assert "options of --model testbed" in capsys.readouterr().err


def test_cli_generate_passes_max_sequence_length(testbed, tmp_path):
    """``dfa2 generate`` on the testbed folder, T5 length left out = the pipeline called with the testbed's
    settings (32, from the folder's dfa2_defaults.json); ``--max-sequence-length 256`` (SD3's family default)
    gives other text tokens and another image."""
    from dfa2_jax.cli import main
    from dfa2_jax.testbed import testbed_path

    pipe, st = testbed
    prompt = "a large red circle in the centre"
    args = ["generate", "--model", testbed_path(), "--dtype", "float32", "--prompt", prompt, "--height", "64",
            "--width", "64", "--steps", "2", "--guidance", "4", "--seed", "1", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "-o", str(tmp_path / "x.png"), "--save-latents", str(tmp_path / "x.npy")]
    assert main(args) == 0  # the folder's default: 32
    ref = pipe(prompt, seed=1, **{**st.generate_kwargs(), "num_inference_steps": 2}, output_type="latent")
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), ref.latents)
    assert main(args + ["--max-sequence-length", "256"]) == 0
    assert not np.array_equal(np.load(tmp_path / "x.npy"), ref.latents)


# ------------------------------------------------------------------------------------------- FLUX-style testbed
# prompt accuracy of a 4-step generation of world.make_batch(0, 4, "heldout") with seed 0, measured on CPU with
# jax 0.10.2: 1.0 for every caption (28 steps: 1.0 as well).
FLUX_ACC_4_STEPS_MIN = 0.85


@pytest.fixture(scope="module")
def flux_testbed():
    from dfa2_jax.testbed import load_testbed

    return load_testbed("flux")


def test_flux_loads_and_shares_the_sd3_encoders(flux_testbed):
    pipe, _ = flux_testbed
    cfg = pipe.transformer.config
    assert pipe.family == "flux" and pipe.vae_scale_factor == 4
    assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (3, 6, 4, 32)
    assert not cfg.guidance_embeds and cfg.axes_dims_rope == (4, 14, 14)
    assert pipe.transformer.num_params() == 3_392_784  # docs/testbed/train_log_flux.json models.flux_params
    assert_flux_shares_sd3_encoders("v1")  # trained with --reuse dfa2_jax/assets/testbed_sd3


def test_flux_matches_diffusers_from_the_same_latents(flux_testbed):
    """diffusers' FluxPipeline on the shipped folder vs ours: 2 held-out captions, 4 steps, packed latents.
    Achieved (CPU, float32, jax 0.10.2, diffusers 0.42.1): final latents max relative error 6.4e-7, PSNR 64.1 dB."""
    pipe, st = flux_testbed
    _matches_diffusers(pipe, st, (2, 64, 16))  # (16/2)² packed tokens x 4·4 channels


def test_flux_four_step_samples_follow_their_captions(flux_testbed):
    from dfa2_jax.testbed import world
    from dfa2_jax.testbed.classifier import prompt_accuracy

    pipe, st = flux_testbed
    _, captions, _ = world.make_batch(0, 4, "heldout")
    out = pipe(captions, seed=0, **{**st.generate_kwargs(), "num_inference_steps": 4})
    acc = prompt_accuracy(out.images, captions)
    assert acc.mean() >= FLUX_ACC_4_STEPS_MIN, f"prompt accuracy {acc.round(3)} (mean {acc.mean():.3f})"


def test_flux_short_calibration_compresses_some_heads(flux_testbed):
    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.cli.demo import TESTBED_CANDIDATES
    from dfa2_jax.testbed import world

    pipe, st = flux_testbed
    _, captions, _ = world.make_batch(0, 2, "heldout")
    res = calibrate(pipe, captions, resolution=64, steps=6, delta=0.1, candidates=TESTBED_CANDIDATES,
                    savings="exact", progress=False, max_sequence_length=st.max_sequence_length)
    a = np.asarray(res.plan.assignment)
    assert a.shape == (6, 9, 4) and (a[0] == 0).all()
    compressed = int((a[1:] != 0).sum())
    assert 0 < compressed < a[1:].size, f"{compressed} of {a[1:].size} (step >= 1) head slots compressed"
    assert 0.0 < res.summary["attention_flops_kept"] < 1.0
    assert res.plan.calibration["image_tokens"] == 64 and res.plan.model["text_tokens"] == 32
    assert res.plan.model["family"] == "flux"
