"""``dfa2 plan show | import | export`` on a tiny diffusers-format model folder (config files only)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dfa2_jax.plan.official import import_official
from dfa2_jax.plan import Plan, PlanError
from dfa2_jax.cli.plan import add_parser, model_dir_info, parse_resolution
from dfa2_jax.plan.report import heatmap_size, short_layer

SD3_TINY = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
                out_channels=4, pos_embed_max_size=96)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dfa2")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = p.parse_args(argv)
    return args.fn(args)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny-sd3"
    (d / "transformer").mkdir(parents=True)
    (d / "vae").mkdir()
    (d / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel",
                                                                 **SD3_TINY}))
    (d / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                       "block_out_channels": [32, 64]}))  # scale factor 2
    return str(d)


@pytest.fixture
def official_files(tmp_path):
    """SD3 at 64 px with VAE factor 2, patch 2: N_img = 16² = 256; 5 steps."""
    layers = [f"transformer_blocks.{i}.attn" for i in range(3)]
    ho, share = {}, {}
    rng = np.random.default_rng(0)
    for layer in layers:
        ho[layer], share[layer] = {}, {}
        for s in range(1, 5):
            w = rng.choice([-1, 0, 16, 8, 4], size=4).astype(np.int32)  # full, cache, arrow:8/16/32
            ho[layer][s] = torch.from_numpy(w).repeat_interleave(2).view(-1, 2)
            share[layer][s] = [int(h) for h in np.nonzero(w == 0)[0]]
    p_h, p_s = tmp_path / "sd3_64_head_option_0.1.json", tmp_path / "sd3_64_outputshare_option_0.1.json"
    torch.save(ho, p_h)
    torch.save(share, p_s)
    return str(p_h), str(p_s), ho, share


def test_model_dir_info(model_dir, tmp_path):
    info, vae, patch = model_dir_info(model_dir)
    assert (vae, patch) == (2, 2)
    assert info["family"] == "sd3" and info["num_heads"] == 4 and info["head_dim"] == 8 and len(info["layers"]) == 3
    os.remove(os.path.join(model_dir, "vae", "config.json"))
    assert model_dir_info(model_dir, 77)[1:] == (8, 2) and model_dir_info(model_dir, 77)[0]["text_tokens"] == 77
    with pytest.raises(FileNotFoundError):
        model_dir_info(str(tmp_path / "nope"))


def test_import_show_export_round_trip(tmp_path, model_dir, official_files, capsys):
    p_h, p_s, ho, share = official_files
    plan_path = str(tmp_path / "plan.json")
    assert run(["plan", "import", "--head-option", p_h, "--output-share", p_s, "--model", model_dir,
                "--resolution", "64", "-o", plan_path]) == 0
    assert "wrote" in capsys.readouterr().out
    plan = Plan.load(plan_path)
    info, _, _ = model_dir_info(model_dir)
    assert plan == import_official(p_h, p_s, info, 256, resolution=[64, 64])
    assert plan.calibration["resolution"] == [64, 64] and plan.calibration["image_tokens"] == 256
    assert set(plan.methods) <= {"full", "cache", "arrow:8", "arrow:16", "arrow:32"}

    png = str(tmp_path / "heat.png")
    assert run(["plan", "show", plan_path, "--png", png, "--layer", "T1"]) == 0
    out = capsys.readouterr().out
    assert "(256 image tokens): attention FLOPs kept" in out  # the calibration's resolution and token count
    assert "per layer" in out and "per step" in out and "per head of T1" in out
    assert "transformer_blocks.2.attn" in out
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "RGB"
        # 5 steps, 3 layers, 4 heads: width 8 + 48 + max(5·12, 240) + 12 + 128 + 8; height 32 + max(3·12, 100) +
        # 30 + max(4·12, n_methods·14) + 8
        n_m = len(plan.methods)
        assert im.size == heatmap_size(3, 5, 4, n_m) == (444, 32 + 100 + 30 + max(48, 14 * n_m) + 8)
        assert len(set(im.getdata())) > 5  # drawn, not blank

    out_dir = str(tmp_path / "exported")
    assert run(["plan", "export", plan_path, "--resolution", "64", "--out-dir", out_dir, "--model", model_dir,
                "--name", "sd3"]) == 0
    printed = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in printed] == ["sd3_64_head_option_0.1.json",
                                                      "sd3_64_outputshare_option_0.1.json"]
    for ours, theirs in zip((torch.load(printed[0], weights_only=True), torch.load(printed[1], weights_only=True)),
                            (ho, share)):
        assert ours.keys() == theirs.keys()
        for layer in theirs:
            assert ours[layer].keys() == theirs[layer].keys()
            for s in theirs[layer]:
                if isinstance(theirs[layer][s], torch.Tensor):
                    assert torch.equal(ours[layer][s], theirs[layer][s])
                else:
                    assert ours[layer][s] == theirs[layer][s]
    # and back again: identical plan (export without --model uses the plan's recorded token count)
    again = str(tmp_path / "again.json")
    assert run(["plan", "import", "--head-option", printed[0], "--output-share", printed[1], "--model", model_dir,
                "--resolution", "64", "-o", again]) == 0
    assert Plan.load(again) == plan
    out2 = str(tmp_path / "exported2")
    assert run(["plan", "export", plan_path, "--out-dir", out2]) == 0
    assert sorted(os.listdir(out2)) == sorted(os.path.basename(p) for p in printed)


def test_show_default_resolution_and_large_plan(tmp_path, capsys):
    from dfa2_jax.models.configs import FluxConfig
    from dfa2_jax.plan import model_info_for

    info = model_info_for(FluxConfig.dev())
    methods = ["full", "cache", "arrow:8", "arrow:16", "arrow:32"]
    a = np.random.default_rng(1).integers(0, 5, size=(28, 57, 24)).astype(np.int32)
    a[0] = 0
    plan = Plan(info, 28, methods, a)
    path = str(tmp_path / "flux.json")
    plan.save(path)
    png = str(tmp_path / "flux.png")
    assert run(["plan", "show", path, "--png", png]) == 0
    out = capsys.readouterr().out
    assert "at 1024x1024 (4096 image tokens)" in out
    with Image.open(png) as im:
        assert im.size == heatmap_size(57, 28, 24, 5) == (8 + 48 + 336 + 12 + 128 + 8, 32 + 684 + 30 + 288 + 8)
    assert run(["plan", "show", path, "--resolution", "2048"]) == 0
    assert "at 2048x2048 (16384 image tokens)" in capsys.readouterr().out


def test_v1_import_through_cli(tmp_path, model_dir):
    v1 = tmp_path / "v1.json"
    torch.save([{"attn1": ["full_attn", "residual_window_attn", "output_share"], "attn2": None, "ff": None}] * 3, v1)
    out = str(tmp_path / "plan.json")
    assert run(["plan", "import", "--v1", str(v1), "--model", model_dir, "--window-k", "16", "-o", out]) == 0
    plan = Plan.load(out)
    assert plan.methods == ["full", "cache", "wars:16"]
    assert (plan.assignment[1] == 2).all() and (plan.assignment[2] == 1).all()


def test_cli_user_errors(tmp_path, model_dir, official_files):
    p_h, p_s, _, _ = official_files
    out = str(tmp_path / "plan.json")
    with pytest.raises(ValueError, match="not both"):
        run(["plan", "import", "--head-option", p_h, "--v1", p_h, "--model", model_dir, "-o", out])
    with pytest.raises(ValueError, match="nothing to import"):
        run(["plan", "import", "--model", model_dir, "-o", out])
    with pytest.raises(ValueError, match="--resolution is needed"):
        run(["plan", "import", "--head-option", p_h, "--model", model_dir, "-o", out])
    with pytest.raises(ValueError, match="multiples of"):
        run(["plan", "import", "--head-option", p_h, "--model", model_dir, "--resolution", "66", "-o", out])
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "dfa2-plan", "version": 1')
    with pytest.raises(PlanError, match="bad.json: truncated"):
        run(["plan", "show", str(bad)])
    assert not os.path.exists(out)
    assert run(["plan", "import", "--head-option", p_h, "--model", model_dir, "--resolution", "64", "-o", out]) == 0
    with pytest.raises(ValueError, match="--layer 'T9' is not a layer"):
        run(["plan", "show", out, "--layer", "T9"])


def test_helpers():
    assert parse_resolution("1024") == (1024, 1024) and parse_resolution("768x1024") == (768, 1024)
    with pytest.raises(ValueError, match="expected R or HxW"):
        parse_resolution("big")
    assert [short_layer(n) for n in ["transformer_blocks.12.attn", "transformer_blocks.0.attn2",
                                     "single_transformer_blocks.37.attn"]] == ["T12", "T0b", "S37"]
