"""`dfa2 calibrate` on a tiny diffusers pipeline folder, and its plan driving `dfa2 generate`."""

from __future__ import annotations

import os

import pytest

from dfa2_jax.cli import main
from dfa2_jax.plan import Plan
from tests.pipeline_fixtures import build_flux_pipeline


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("flux"))
    build_flux_pipeline(folder)
    return folder


def test_calibrate_then_generate(flux_folder, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("# calibration prompts\na photo of the cat\n\nthe dog on the left\n")
    out = str(tmp_path / "plan.json")
    args = ["calibrate", "--model", flux_folder, "--prompts", str(tmp_path / "prompts.txt"), "--resolution", "32x24",
            "--steps", "3", "--delta", "0.3", "--candidates", "arrow:2,cache", "--savings", "exact",
            "--dtype", "float32", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-o", out]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "attention FLOPs kept" in text and "solver" in text
    plan = Plan.load(out)
    assert plan.steps == 3 and plan.methods == ["full", "arrow:2", "cache"]
    assert plan.calibration["prompts"] == 2 and plan.calibration["resolution"] == [32, 24]
    assert not os.path.exists(out + ".calib.npz")  # the progress file is removed after success
    gen = ["generate", "--model", flux_folder, "--prompt", "a cat", "--height", "32", "--width", "24", "--steps", "3",
           "--dtype", "float32", "--plan", out, "--cache-dir", str(tmp_path / "cache"), "--no-progress",
           "-o", str(tmp_path / "img.png")]
    assert main(gen) == 0 and (tmp_path / "img.png").exists()


@pytest.mark.parametrize("extra,match", [
    (["--delta", "0"], "--delta 0: must be a finite number > 0"),
    (["--candidates", "arrow:2,cfg_share"], "--candidates: cfg_share needs classifier-free guidance"),
    (["--resolution", "30"], "--resolution 30: must be a multiple of 4"),
])
def test_calibrate_cli_errors(flux_folder, tmp_path, capsys, extra, match):
    args = ["calibrate", "--model", flux_folder, "--prompt", "x", "--resolution", "32", "--steps", "3",
            "--delta", "0.3", "--dtype", "float32", "--cache-dir", str(tmp_path / "c"), "--no-progress",
            "-o", str(tmp_path / "p.json")]
    assert main(args + extra) == 2  # a repeated option: argparse keeps the last value
    err = capsys.readouterr().err
    assert match in err and len(err.splitlines()) == 1 and not os.path.exists(tmp_path / "c")  # nothing loaded


def test_calibrate_cli_needs_prompts(flux_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    base = ["calibrate", "--model", flux_folder, "--resolution", "32", "--steps", "3", "--delta", "0.3",
            "-o", str(tmp_path / "p.json")]
    assert main(base + ["--prompts", str(empty)]) == 2
    assert "empty.txt" in capsys.readouterr().err
    assert main(base) == 2
    assert "no prompts" in capsys.readouterr().err
