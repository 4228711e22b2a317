"""scripts/train_testbed.py --smoke (worlds v1 and v2): the trained testbed folders load in diffusers and in our
JAX pipelines, which agree from the same initial latents (the bounds of tests/test_pipelines.py), every loss went
down, and the final evaluation ran; the render pool's shared-memory path returns make_batch's images."""

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


def _check_parity(out_dir, family, cache_dir, prefix="testbed"):
    """diffusers' pipeline and our load_pipeline at the folder's size (v1 64x64: 16x16 latents; v2 128x128 through
    a x2 VAE: 64x64 latents), 4 steps, the same initial latents."""
    from dfa2_jax.pipeline import load_pipeline

    folder = str(out_dir / f"{prefix}_{family}")
    info = json.loads((out_dir / f"{prefix}_{family}" / "testbed_info.json").read_text())
    prompts = json.loads((out_dir / "train_log.json").read_text())["data"]["sample_captions"][:2]
    size = info["height"]
    lat = size // (4 if size == 64 else 2)
    shape = (2, 4, lat, lat) if family == "sd3" else (2, (lat // 2) ** 2, 16)  # FLUX: packed 2x2 patches
    latents = np.random.default_rng(3).standard_normal(shape, np.float32)
    kw = dict(height=size, width=size, num_inference_steps=4, max_sequence_length=info["max_sequence_length"])
    if family == "sd3":
        kw["guidance_scale"] = info["guidance_scale"]
    ref_lat, ref_img = diffusers_outputs(folder, family, prompts, latents, kw)
    out = load_pipeline(folder, cache_dir=cache_dir)(prompts, latents=latents, **kw)
    assert len(out.images) == 2 and out.images[0].size == (size, size)
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


def _losses_fell(log, phases):
    for phase in phases:
        losses = [e["loss"] for e in log["phases"][phase]["log"]]
        assert len(losses) >= 3 and all(np.isfinite(losses)), (phase, losses)
        late = float(np.mean(losses[len(losses) // 2:]))
        assert late < losses[0], f"{phase}: loss did not decrease (first {losses[0]:.3f}, late mean {late:.3f})"


def test_smoke_v2_training(tmp_path, capsys):
    """World v2: 128x128 through a x2 VAE (1024 image tokens), CLIP length of the longest caption, shift 2,
    bfloat16 transformer weights, FLUX trained in fp32 with bf16 attention; evaluated and summarised at the end."""
    import struct

    from dfa2_jax.defaults import read_defaults
    from dfa2_jax.testbed import classifier as tc

    out = tmp_path / "out"
    assert _script().main(["--out", str(out), "--smoke", "--world", "v2"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    _losses_fell(log, ("vae", "sd3", "flux"))
    assert log["precision"] == {"vae": "bf16", "sd3": "bf16", "flux": "fp32-bf16attn"}
    assert log["data"]["clip_max_length"] == log["data"]["clip_tokens_longest"] == 56
    for family in ("sd3", "flux"):
        folder = out / f"testbed2_{family}"
        info = json.loads((folder / "testbed_info.json").read_text())
        assert (info["height"], info["width"], info["num_inference_steps"]) == (128, 128, 28)
        assert info["max_sequence_length"] == 56 and info["clip_max_length"] == 56 and info["world_name"] == "v2"
        assert info["guidance_scale"] == (4.0 if family == "sd3" else None) and info["weights_dtype"] == "bfloat16"
        assert read_defaults(folder) == {"height": 128, "width": 128, "num_inference_steps": 28, "dtype": "float32",
                                         "guidance_scale": info["guidance_scale"], "max_sequence_length": 56}
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 2.0
        assert json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 56
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        with open(weights, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
        assert log["models"][f"{family}_folder_mb"] <= 40
        ev = log["eval"][family]
        assert ev["generated"] == ev["captions"] == 4
        if os.path.isfile(tc.ASSETS["v2"]):  # scored by the shipped v2 classifier (an untrained model: ~0)
            assert 0.0 <= ev["prompt_accuracy"] <= 1.0 and ev["renders_all_right"] == 1.0
        _check_parity(out, family, str(tmp_path / "cache"), prefix="testbed2")
    with tarfile.open(out / "testbed.tar") as tar:
        tops = {m.name.split("/")[0] for m in tar.getmembers()}
    assert tops == {"testbed2_sd3", "testbed2_flux", "train_log.json", "samples_sd3.png", "samples_flux.png",
                    "samples_flux_truecfg.png"}
    printed = capsys.readouterr().out.strip().splitlines()
    table = printed[printed.index(next(line for line in printed if line.startswith("family"))):]
    assert table[1].startswith("sd3") and table[2].startswith("flux") and table[3].startswith("vae:")


def test_render_dataset_shared_memory(tmp_path, monkeypatch):
    """The spawn pool writes each chunk's images into one shared-memory block (or pickles them back when /dev/shm
    is too small): equal to make_batch's chunks either way."""
    from dfa2_jax.testbed.world import make_batch

    monkeypatch.syspath_prepend(os.path.dirname(SCRIPT))  # spawn workers import the script module by name
    mod = _script()
    words = mod.world_words(0, "v2")
    tok_dirs = (str(tmp_path / "clip"), str(tmp_path / "t5"))
    clip_tok = mod.make_world_clip_tokenizer(tok_dirs[0], words, 56)
    t5_tok = mod.make_world_t5_tokenizer(tok_dirs[1], words)
    images, captions, clip_ids, t5_ids = mod.render_dataset(10, 40, "train", 16, 2, tok_dirs, 56, 56, "v2")
    want = [make_batch(10 + k, n, "train", world="v2") for k, n in enumerate((16, 16, 8))]
    assert np.array_equal(images, np.concatenate([w[0] for w in want]))
    assert captions == [c for w in want for c in w[1]]
    ref_clip, ref_t5 = mod.tokenize(clip_tok, t5_tok, captions, 56, 56)
    assert np.array_equal(clip_ids, ref_clip) and np.array_equal(t5_ids, ref_t5)
    monkeypatch.setattr(mod, "_shm_room", lambda nbytes: False)  # no room in /dev/shm: pickled back instead
    again = mod.render_dataset(10, 40, "train", 16, 2, tok_dirs, 56, 56, "v2")
    assert np.array_equal(again[0], images) and again[1] == captions and np.array_equal(again[2], clip_ids)
