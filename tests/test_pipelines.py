"""Our JAX pipelines equal diffusers' StableDiffusion3Pipeline / FluxPipeline on tiny models built offline,
from the same initial latents (float32, CPU)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from tests.conftest import assert_pipeline_output_matches, max_rel_err
from tests.pipeline_fixtures import build_flux_pipeline, build_sd3_pipeline

# Bounds. Achieved (CPU, float32, 4 steps): final latents max relative error SD3 7.7e-7, SD3 without T5
# 6.9e-7, FLUX-dev 1.5e-6, FLUX-schnell 1.7e-7; decoded images 59 dB PSNR (our uint8 PNG vs diffusers' float
# image: the 8-bit rounding alone).
PROMPTS = ["a photo of the cat and the dog", "a red square on the left"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    out = {}
    for name, build, kw in [("sd3", build_sd3_pipeline, {}), ("sd3_no_t5", build_sd3_pipeline, {"with_t5": False}),
                            ("flux_dev", build_flux_pipeline, {}),
                            ("flux_schnell", build_flux_pipeline, {"guidance": False})]:
        folder = str(tmp_path_factory.mktemp(name))
        out[name] = (build(folder, **kw), folder)
    return out


@pytest.fixture(scope="module")
def ours(pipes, tmp_path_factory):
    import dfa2_jax.pipeline as P

    cache = str(tmp_path_factory.mktemp("cache"))
    return {name: P.load_pipeline(folder, cache_dir=cache) for name, (_, folder) in pipes.items()}


def _diffusers_run(pipe, name, latents, **kw):
    import torch

    common = dict(num_inference_steps=4, latents=torch.from_numpy(latents), height=32, width=24)
    if name.startswith("sd3"):
        common.update(guidance_scale=5.0, max_sequence_length=24)
    else:
        common.update(max_sequence_length=20)
        if name == "flux_dev":
            common.update(guidance_scale=3.5)
    lat = pipe(PROMPTS, output_type="latent", **common, **kw).images
    img = pipe(PROMPTS, output_type="np", **common, **kw).images
    return lat.numpy(), img


def _initial_latents(name):
    rng = np.random.default_rng(7)
    if name.startswith("sd3"):
        return rng.standard_normal((2, 4, 16, 12), np.float32)
    return rng.standard_normal((2, 8 * 6, 16), np.float32)


@pytest.mark.parametrize("name", ["sd3", "sd3_no_t5", "flux_dev", "flux_schnell"])
def test_pipeline_equals_diffusers(pipes, ours, name):
    pipe, _ = pipes[name]
    latents = _initial_latents(name)
    ref_lat, ref_img = _diffusers_run(pipe, name, latents)
    kw = dict(num_inference_steps=4, latents=latents, height=32, width=24)
    if name.startswith("sd3"):
        kw.update(guidance_scale=5.0, max_sequence_length=24)
    else:
        kw.update(max_sequence_length=20, guidance_scale=3.5 if name == "flux_dev" else None)
    out = ours[name](PROMPTS, **kw)
    assert_pipeline_output_matches(out, ref_lat, ref_img, name)


NEGATIVE = ["blurry, low quality", "a green circle"]
TRUE_CFG = 4.0


@pytest.mark.parametrize("name", ["flux_dev", "flux_schnell"])
def test_flux_true_cfg_equals_diffusers(pipes, ours, name):
    """diffusers' FluxPipeline true CFG (negative_prompt + true_cfg_scale > 1: a second transformer pass) against
    ours (the doubled batch [negative; positive] in one pass), the guidance embedding on for dev. Achieved (CPU,
    float32, 4 steps): final latents max relative error dev 1.9e-6, schnell 3.7e-7; images 59 dB."""
    pipe, _ = pipes[name]
    latents = _initial_latents(name)
    ref_lat, ref_img = _diffusers_run(pipe, name, latents, negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG)
    kw = dict(num_inference_steps=4, latents=latents, height=32, width=24, max_sequence_length=20,
              guidance_scale=3.5 if name == "flux_dev" else None)
    out = ours[name](PROMPTS, NEGATIVE, true_cfg_scale=TRUE_CFG, **kw)
    assert_pipeline_output_matches(out, ref_lat, ref_img, f"{name} true CFG")
    plain = ours[name](PROMPTS, **{**kw, "output_type": "latent"}).latents
    assert max_rel_err(plain, ref_lat) > 1e-2  # true CFG changed the result
    # diffusers' activation rule: a negative prompt with true_cfg_scale <= 1, or a scale without a negative
    # prompt, is plain FLUX
    for args, extra in (((PROMPTS, NEGATIVE), {}), ((PROMPTS,), {"true_cfg_scale": TRUE_CFG})):
        prep = ours[name].prepare(*args, **extra, num_inference_steps=4, height=32, width=24, max_sequence_length=20)
        assert not prep.do_cfg and prep.cond["prompt_embeds"].shape[0] == 2
    prep = ours[name].prepare(PROMPTS, "", true_cfg_scale=TRUE_CFG, num_inference_steps=4, height=32, width=24,
                              max_sequence_length=20)
    assert prep.do_cfg and prep.cond["prompt_embeds"].shape[0] == 4  # one negative string for every prompt
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        ours[name].prepare(PROMPTS, NEGATIVE[:1], true_cfg_scale=TRUE_CFG, num_inference_steps=4, height=32,
                           width=24, max_sequence_length=20)


@pytest.mark.parametrize("name", ["sd3", "sd3_no_t5", "flux_dev"])
def test_prompt_embeddings_equal_diffusers(pipes, ours, name):
    import torch

    pipe, _ = pipes[name]
    with torch.no_grad():
        if name.startswith("sd3"):
            ref = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                     max_sequence_length=24)
            ref_embeds, ref_pooled = ref[0].numpy(), ref[2].numpy()
            embeds, pooled = ours[name].encode_prompt(PROMPTS, max_sequence_length=24)
        else:
            ref = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=20)
            ref_embeds, ref_pooled = ref[0].numpy(), ref[1].numpy()
            embeds, pooled = ours[name].encode_prompt(PROMPTS, max_sequence_length=20)
    assert embeds.shape == ref_embeds.shape and pooled.shape == ref_pooled.shape
    assert max_rel_err(embeds, ref_embeds) <= 1e-5
    assert max_rel_err(pooled, ref_pooled) <= 1e-5


@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_scan_equals_python_loop(ours, name):
    import jax.numpy as jnp

    from dfa2_jax.sample import denoise
    from tests.oracles import denoise_loop

    p = ours[name]
    captured = {}
    import dfa2_jax.pipeline as P

    orig = P.denoise

    def spy(graphdef, state, latents, cond, timesteps, sigmas, **kw):
        captured.update(latents=np.asarray(latents), cond=cond, timesteps=timesteps, sigmas=sigmas, kw=kw)
        return orig(graphdef, state, latents, cond, timesteps, sigmas, **kw)

    P.denoise = spy
    try:
        p(PROMPTS, num_inference_steps=3, height=32, width=24, output_type="latent", seed=1)
    finally:
        P.denoise = orig
    tr = p.transformer
    kw = {k: v for k, v in captured["kw"].items() if k != "report"}
    scanned = denoise(tr.graphdef, tr.state, jnp.asarray(captured["latents"]), captured["cond"],
                      captured["timesteps"], captured["sigmas"], **kw)
    looped = denoise_loop(tr.graphdef, tr.state, captured["latents"], captured["cond"], captured["timesteps"],
                          captured["sigmas"], **kw)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), rtol=1e-6, atol=1e-6)


def test_progress_bar_counts_steps(ours):

    seen = []
    import dfa2_jax.sample as S

    with S.progress_hook(seen.append):
        ours["flux_schnell"](["x"], num_inference_steps=3, height=32, width=24, output_type="latent",
                             progress=False)
    assert seen == []  # report=False: no host callbacks
    out = ours["flux_schnell"](["x"], num_inference_steps=3, height=32, width=24, output_type="latent",
                               progress=True)
    assert out.latents.shape == (1, 48, 16)


def test_bad_inputs(pipes, ours, tmp_path, caplog):
    import shutil

    import dfa2_jax.pipeline as P
    from converters.safetensors_io import CheckpointError

    sd3 = ours["sd3"]
    with pytest.raises(ValueError, match="divisible by 4"):
        sd3(["x"], height=30, width=24, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 16, 16\); expected \(1, 4, 16, 12\)"):
        sd3(["x"], height=32, width=24, num_inference_steps=1, latents=np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(ValueError, match="expected packed"):
        ours["flux_dev"](["x"], height=32, width=24, num_inference_steps=1, latents=np.zeros((1, 4, 16), np.float32))
    with pytest.raises(ValueError, match="no guidance embedding"):
        ours["flux_schnell"](["x"], height=32, width=24, num_inference_steps=1, guidance_scale=3.5)
    for sub in ("transformer", "vae"):
        bad = tmp_path / sub
        shutil.copytree(pipes["sd3"][1], bad)
        shutil.rmtree(bad / sub)
        with pytest.raises(CheckpointError, match=f"missing {sub}/ folder"):
            P.load_pipeline(str(bad))
    long_prompt = " ".join(["photo"] * 120)
    with caplog.at_level(logging.WARNING, logger="dfa2_jax"):
        embeds, _ = sd3.encode_prompt([long_prompt], max_sequence_length=24)
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in caplog.text
    assert "truncated because T5 can only handle sequences up to 24 tokens" in caplog.text
    assert embeds.shape == (1, 77 + 24, 64)


def test_cli_generate_with_latents(pipes, tmp_path, capsys):
    from dfa2_jax.cli import main

    _, folder = pipes["flux_dev"]
    init = _initial_latents("flux_dev")[:1]
    np.save(tmp_path / "init.npy", init)
    args = ["generate", "--model", folder, "--prompt", PROMPTS[0], "--height", "32", "--width", "24", "--steps", "2",
            "--dtype", "float32", "--latents", str(tmp_path / "init.npy"), "--save-latents", str(tmp_path / "out.npy"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-o", str(tmp_path / "out.png")]
    assert main(args) == 0
    from PIL import Image

    im = Image.open(tmp_path / "out.png")
    assert im.size == (24, 32)
    final = np.load(tmp_path / "out.npy")
    assert final.shape == (1, 48, 16) and np.isfinite(final).all() and not np.allclose(final, init)
    bad = args[:]
    bad[bad.index("--latents") + 1] = str(tmp_path / "wrong.npy")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 4, 16, 12), np.float32))
    assert main(bad) == 2
    assert "expected packed (1, 48, 16)" in capsys.readouterr().err
    schnell = ["generate", "--model", pipes["flux_schnell"][1], "--prompt", "x", "--height", "32", "--width", "24",
               "--steps", "1", "--guidance", "3.5", "--dtype", "float32", "--cache-dir", str(tmp_path / "cache"),
               "-o", str(tmp_path / "s.png")]
    assert main(schnell) == 2
    assert "no guidance embedding" in capsys.readouterr().err


def test_tiny_random_demo_calibrates_generates_and_evaluates(tmp_path):
    """dfa2 demo --model tiny-random (the testbed demo, the default, is tested in tests/test_testbed_shipped.py)."""
    import json

    from PIL import Image

    from dfa2_jax.cli.demo import run_demo
    from dfa2_jax.plan import Plan

    paths = run_demo(str(tmp_path), model="tiny-random", steps=3, size=32)
    assert sorted(os.path.basename(p) for p in paths) == sorted(["plan_sd3.json", "plan_flux.json"] +
                                                                ["report.json", "grid.png"] * 2)
    for family in ("sd3", "flux"):
        plan = Plan.load(tmp_path / f"plan_{family}.json")
        assert plan.steps == 3 and plan.calibration["solver"] == "cp-sat"
        report = json.loads((tmp_path / family / "report.json").read_text())
        assert report["steps"] == 3 and len(report["per_image"]) == 2
        grid = np.asarray(Image.open(tmp_path / family / "grid.png"))
        assert grid.shape[1] == 64 and grid.std() > 0


def _plan_for(pipe, steps, methods, seed):
    from dfa2_jax.plan import Plan, model_info_for

    info = model_info_for(pipe.transformer.config)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(methods), size=(steps, len(info["layers"]), info["num_heads"]))
    a[0] = methods.index("full")
    return Plan(info, steps, methods, a)


@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_pipeline_plans(ours, tmp_path, name):
    from dfa2_jax.plan import Plan, PlanError, model_info_for

    p = ours[name]
    kw = dict(num_inference_steps=3, height=32, width=24, output_type="latent", seed=3)
    dense = p(PROMPTS, **kw).latents
    full = p(PROMPTS, plan=Plan.all_full(model_info_for(p.transformer.config), 3), **kw).latents
    np.testing.assert_array_equal(full, dense)  # the all-full plan is the dense sampler, bitwise
    methods = ["full", "arrow:2", "cache"] + (["cfg_share", "cfg_share+arrow:4"] if name == "sd3" else [])
    plan = _plan_for(p, 3, methods, seed=1)
    plan.save(tmp_path / "plan.json")
    compressed = p(PROMPTS, plan=str(tmp_path / "plan.json"), **kw).latents
    assert np.isfinite(compressed).all() and np.abs(compressed - dense).max() > 1e-5
    with pytest.raises(PlanError, match="num_inference_steps = 4"):
        p(PROMPTS, plan=plan, **{**kw, "num_inference_steps": 4})


def test_flux_true_cfg_plans(ours, tmp_path):
    """Plans under FLUX true CFG: the all-full plan is the dense sampler bitwise; cache/arrow and the CFG-sharing
    methods run (the batch is [negative; positive] as SD3's); without true CFG cfg_share is an error."""
    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.plan import Plan, PlanError, model_info_for

    p = ours["flux_dev"]
    kw = dict(num_inference_steps=3, height=32, width=24, output_type="latent", seed=3, max_sequence_length=20)
    cfg_kw = dict(kw, true_cfg_scale=TRUE_CFG)
    dense = p(PROMPTS, NEGATIVE, **cfg_kw).latents
    full = p(PROMPTS, NEGATIVE, plan=Plan.all_full(model_info_for(p.transformer.config), 3), **cfg_kw).latents
    np.testing.assert_array_equal(full, dense)
    plan = _plan_for(p, 3, ["full", "arrow:2", "cache", "cfg_share", "cfg_share+arrow:4"], seed=1)
    plan.save(tmp_path / "plan.json")
    compressed = p(PROMPTS, NEGATIVE, plan=str(tmp_path / "plan.json"), **cfg_kw).latents
    assert np.isfinite(compressed).all() and np.abs(compressed - dense).max() > 1e-5
    with pytest.raises(PlanError, match="CFG-sharing method needs classifier-free guidance, but FLUX has no"):
        p(PROMPTS, plan=plan, **kw)
    res = calibrate(p, PROMPTS, negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG, resolution=(32, 24), steps=3,
                    delta=0.5, candidates="arrow:2,cache,cfg_share", savings="exact", progress=False,
                    max_sequence_length=20)
    assert res.plan.calibration["true_cfg_scale"] == TRUE_CFG
    assert np.isfinite(p(PROMPTS, NEGATIVE, plan=res.plan, **cfg_kw).latents).all()


def test_cli_generate_with_plan(pipes, ours, tmp_path):
    from dfa2_jax.cli import main

    plan = _plan_for(ours["sd3"], 2, ["full", "arrow:2", "cache", "cfg_share"], seed=2)
    plan.save(tmp_path / "plan.json")
    args = ["generate", "--model", pipes["sd3"][1], "--prompt", PROMPTS[0], "--height", "32", "--width", "24",
            "--steps", "2", "--dtype", "float32", "--plan", str(tmp_path / "plan.json"), "--cache-dir",
            str(tmp_path / "cache"), "--no-progress", "-o", str(tmp_path / "out.png")]
    assert main(args) == 0 and (tmp_path / "out.png").exists()
    flux_plan = _plan_for(ours["flux_dev"], 2, ["full", "cache"], seed=0)
    flux_plan.save(tmp_path / "flux_plan.json")
    bad = args[:]
    bad[bad.index("--plan") + 1] = str(tmp_path / "flux_plan.json")
    assert main(bad) == 2  # a FLUX plan on an SD3 model: a clear error, exit 2


def test_cli_generate_with_mesh(pipes, tmp_path, capsys):
    """--mesh on one device gives the plain sampler's latents; a mesh that does not fit is a clear error."""
    from dfa2_jax.cli import main

    args = ["generate", "--model", pipes["flux_dev"][1], "--prompt", PROMPTS[0], "--height", "32", "--width", "24",
            "--steps", "2", "--dtype", "float32", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--save-latents", str(tmp_path / "plain.npy"), "-o", str(tmp_path / "plain.png")]
    assert main(args) == 0
    meshed = args[:-4] + ["--mesh", "data=1,heads=1", "--fsdp", "--save-latents", str(tmp_path / "mesh.npy"),
                          "-o", str(tmp_path / "mesh.png")]
    assert main(meshed) == 0
    np.testing.assert_allclose(np.load(tmp_path / "mesh.npy"), np.load(tmp_path / "plain.npy"), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(args[:-4] + ["--mesh", "heads=3", "-o", str(tmp_path / "bad.png")]) == 2
    assert "not divisible by the heads axis size 3" in capsys.readouterr().err
