"""scripts/train_testbed.py --smoke: the trained testbed folders load in diffusers and in our JAX pipelines,
which agree from the same initial latents (the bounds of tests/test_pipelines.py), and every loss went down."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tarfile

import numpy as np
import pytest

from tests.conftest import assert_pipeline_output_matches, diffusers_outputs

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train_testbed.py")


def _script():
    spec = importlib.util.spec_from_file_location("train_testbed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_testbed"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def _check_parity(out_dir, family, cache_dir):
    """diffusers' pipeline and our load_pipeline, 64x64, 4 steps, the same initial latents."""
    from dfa2_jax.pipeline import load_pipeline

    folder = str(out_dir / f"testbed_{family}")
    info = json.loads((out_dir / f"testbed_{family}" / "testbed_info.json").read_text())
    prompts = json.loads((out_dir / "train_log.json").read_text())["data"]["sample_captions"][:2]
    shape = (2, 4, 16, 16) if family == "sd3" else (2, 64, 16)  # FLUX: packed 2x2 patches of 4 channels
    latents = np.random.default_rng(3).standard_normal(shape, np.float32)
    kw = dict(height=64, width=64, num_inference_steps=4, max_sequence_length=info["max_sequence_length"])
    if family == "sd3":
        kw["guidance_scale"] = info["guidance_scale"]
    ref_lat, ref_img = diffusers_outputs(folder, family, prompts, latents, kw)
    out = load_pipeline(folder, cache_dir=cache_dir)(prompts, latents=latents, **kw)
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    assert_pipeline_output_matches(out, ref_lat, ref_img, family)


def test_smoke_training_loads_and_matches_diffusers(tmp_path):
    """One test (not a module fixture + several tests) so that pytest -n never runs the training twice."""
    out = tmp_path / "out"
    assert _script().main(["--out", str(out), "--smoke"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    for phase in ("vae", "sd3", "flux"):
        losses = [e["loss"] for e in log["phases"][phase]["log"]]
        assert len(losses) >= 3 and all(np.isfinite(losses)), (phase, losses)
        late = float(np.mean(losses[len(losses) // 2:]))
        assert late < losses[0], f"{phase}: loss did not decrease (first {losses[0]:.3f}, late mean {late:.3f})"
    vae_cfg = json.loads((out / "testbed_sd3" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(log["phases"]["vae"]["scaling_factor"])
    assert vae_cfg["shift_factor"] == pytest.approx(log["phases"]["vae"]["shift_factor"])
    with tarfile.open(out / "testbed.tar") as tar:
        tops = {m.name.split("/")[0] for m in tar.getmembers()}
    assert tops == {"testbed_sd3", "testbed_flux", "train_log.json", "samples_sd3.png", "samples_flux.png",
                    "samples_flux_truecfg.png"}
    for family in ("sd3", "flux"):
        assert log["models"][f"{family}_folder_mb"] <= 30
        _check_parity(out, family, str(tmp_path / "cache"))
    # --reuse (how the shipped FLUX-style testbed was made): a FLUX-only run on the SD3 folder's VAE, encoders and
    # tokenizers, without VAE training and without bf16 autocast (a no-op on the CPU)
    second = tmp_path / "second"
    assert _script().main(["--out", str(second), "--smoke", "--families", "flux", "--reuse",
                           str(out / "testbed_sd3"), "--precision", "fp32", "--no-samples"]) == 0
    log2 = json.loads((second / "train_log.json").read_text())
    assert log2["phases"]["vae"] == {"reused": str(out / "testbed_sd3"), "shift_factor": vae_cfg["shift_factor"],
                                     "scaling_factor": vae_cfg["scaling_factor"]}  # not retrained
    assert "sd3" not in log2["phases"]
    losses = [e["loss"] for e in log2["phases"]["flux"]["log"]]
    assert float(np.mean(losses[len(losses) // 2:])) < losses[0]
    from safetensors.numpy import load_file

    def weights(folder, sub):
        name = "diffusion_pytorch_model.safetensors" if sub == "vae" else "model.safetensors"
        return load_file(str(folder / sub / name))

    for mine, theirs in (("vae", "vae"), ("text_encoder_2", "text_encoder_3")):  # FLUX's T5 = SD3's T5
        a, b = weights(second / "testbed_flux", mine), weights(out / "testbed_sd3", theirs)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # FLUX's CLIP = the SD3 CLIP-L tower without its projection ("text_model." prefix or not, by transformers version)
    clip, clip_l = ({k.removeprefix("text_model."): v for k, v in weights(folder, "text_encoder").items()}
                    for folder in (second / "testbed_flux", out / "testbed_sd3"))
    assert set(clip) == set(clip_l) - {"text_projection.weight"}
    assert all(np.array_equal(clip[k], clip_l[k]) for k in clip)
