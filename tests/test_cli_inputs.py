"""Every bad input to ``dfa2`` stops the command before any work, with one line on stderr naming the argument or
file, exit status 2 and no output file; Ctrl-C ends a command with one line and status 130 (a calibration keeps
its checkpoint and says how to resume).

The model is the shipped testbed (``testbed-sd3``, config files only: the loaders are patched to fail the test if
called), a copy of its config files with a VAE of scale 8 (sizes in multiples of 16), or ``testbed-flux``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from dfa2_jax.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input files shared by the cases: plans, latents, prompts, a config-only model folder with VAE scale 8."""
    from dfa2_jax.models.configs import config_from_json
    from dfa2_jax.plan import Plan, model_info_for
    from dfa2_jax.testbed import testbed_path

    d = tmp_path_factory.mktemp("inputs")
    sd3, flux = (config_from_json(os.path.join(testbed_path(f), "transformer", "config.json"))
                 for f in ("sd3", "flux"))

    def plan(cfg, text, steps, layers, name):
        p = Plan(model_info_for(cfg, text), steps, ["full"], np.zeros((steps, layers, 4), np.int32),
                 {"resolution": [64, 64]})
        p.save(d / name)
        return str(d / name)

    plan(sd3, 109, 28, 6, "sd3_plan.json")
    plan(sd3, 109, 4, 6, "sd3_plan_4_steps.json")
    plan(flux, 32, 28, 9, "flux_plan.json")
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    np.save(d / "lat_small.npy", np.zeros((1, 4, 8, 8), np.float32))
    np.save(d / "lat_flux_unpacked.npy", np.zeros((1, 4, 16, 16), np.float32))
    np.save(d / "lat_int.npy", np.zeros((1, 4, 16, 16), np.int32))
    np.save(d / "lat_ok.npy", np.zeros((1, 4, 16, 16), np.float32))
    (d / "not_npy.npy").write_text("hello")
    (d / "prompts.txt").write_text("a red circle\n")
    # the testbed's config files with a 4-block VAE: scale factor 8, sizes in multiples of 16
    vae8 = d / "vae8"
    for sub in ("transformer", "vae"):
        (vae8 / sub).mkdir(parents=True)
        shutil.copy(os.path.join(testbed_path(), sub, "config.json"), vae8 / sub / "config.json")
    shutil.copy(os.path.join(testbed_path(), "model_index.json"), vae8 / "model_index.json")
    vcfg = json.loads((vae8 / "vae" / "config.json").read_text())
    vcfg["block_out_channels"] = [32, 64, 64, 64]
    (vae8 / "vae" / "config.json").write_text(json.dumps(vcfg))
    return d


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights are loaded: every error must come before the load."""
    import dfa2_jax.pipeline
    import dfa2_jax.transformer

    def boom(*a, **k):
        pytest.fail("weights were loaded before the error")

    monkeypatch.setattr(dfa2_jax.pipeline, "load_pipeline", boom)
    monkeypatch.setattr(dfa2_jax.transformer, "load_transformer", boom)


GEN = ["generate", "--model", "testbed-sd3", "--prompt", "a red circle", "--no-progress"]
CAL = ["calibrate", "--model", "testbed-sd3", "--prompt", "a red circle", "--delta", "0.1", "--no-progress"]
EVAL = ["eval", "--model", "testbed-sd3", "--prompt", "a red circle", "--plan", "{in}/sd3_plan.json"]

# (id, argv — "{in}" is the inputs folder, "{out}" the test's empty output folder —, exit via argparse?, what the
# one line must contain). Commands that write get -o / --out-dir under {out}; nothing may appear there.
CASES = [
    # --model
    ("model-missing-folder", ["generate", "--model", "{out}/no_model", "--prompt", "x", "-o", "{out}/x.png"], False,
     "no_model: no such file or folder"),
    ("model-unknown-short-name", ["generate", "--model", "testbed-sdxl", "--prompt", "x", "-o", "{out}/x.png"],
     False, "--model testbed-sdxl: no such file or folder (shipped models: testbed-sd3, testbed-flux"),
    ("model-not-a-pipeline", ["generate", "--model", "{in}", "--prompt", "x", "-o", "{out}/x.png"], False,
     "no transformer/config.json"),
    ("model-hf-id-not-cached", ["generate", "--model", "nobody/no-such-model", "--prompt", "x", "-o",
                                "{out}/x.png"], False, "not in the Hugging Face cache"),
    ("info-model-missing", ["info", "--model", "{out}/nothing"], False, "no such file or folder"),
    ("convert-unknown-short-name", ["convert", "--model", "testbed-sdxl"], False, "testbed-sdxl"),
    # sizes, steps, guidance, T5 length, dtype, mesh, implementation
    ("steps-0", GEN + ["--steps", "0", "-o", "{out}/x.png"], False, "--steps 0: must be >= 1"),
    ("height-0", GEN + ["--height", "0", "-o", "{out}/x.png"], False, "--height 0: must be >= 1"),
    ("width-negative", GEN + ["--width", "-64", "-o", "{out}/x.png"], False, "--width -64: must be >= 1"),
    ("height-33", GEN + ["--height", "33", "-o", "{out}/x.png"], False,
     "--height 33: must be a multiple of 8 for this model (VAE scale factor 4 x patch 2)"),
    ("height-33-vae8", GEN[:2] + ["{in}/vae8"] + GEN[3:] + ["--height", "33", "-o", "{out}/x.png"], False,
     "--height 33: must be a multiple of 16 for this model (VAE scale factor 8 x patch 2)"),
    ("height-24-vae8", GEN[:2] + ["{in}/vae8"] + GEN[3:] + ["--height", "24", "-o", "{out}/x.png"], False,
     "--height 24: must be a multiple of 16"),
    ("height-beyond-pos-embed", GEN + ["--height", "512", "-o", "{out}/x.png"], False,
     "--height 512: at most 256 for this model (pos_embed_max_size 32"),
    ("guidance-negative", GEN + ["--guidance", "-2", "-o", "{out}/x.png"], False,
     "--guidance -2: must be a finite number >= 0"),
    ("guidance-nan", GEN + ["--guidance", "nan", "-o", "{out}/x.png"], False, "--guidance nan"),
    ("guidance-for-model-without", ["generate", "--model", "testbed-flux", "--prompt", "x", "--guidance", "3",
                                    "-o", "{out}/x.png"], False, "--guidance 3: this FLUX model has no guidance"),
    ("negative-prompt-without-cfg", GEN + ["--negative-prompt", "blue", "--guidance", "1", "-o", "{out}/x.png"],
     False, "--negative-prompt: needs classifier-free guidance"),
    ("true-cfg-for-sd3", GEN + ["--true-cfg-scale", "4", "-o", "{out}/x.png"], False, "--true-cfg-scale: FLUX only"),
    ("true-cfg-without-negative-prompt", ["generate", "--model", "testbed-flux", "--prompt", "x", "--true-cfg-scale",
                                          "4", "-o", "{out}/x.png"], False, "true CFG needs a --negative-prompt"),
    ("flux-negative-prompt-without-true-cfg", ["generate", "--model", "testbed-flux", "--prompt", "x",
                                               "--negative-prompt", "blue", "-o", "{out}/x.png"], False,
     "--negative-prompt: FLUX runs a negative prompt with true CFG only"),
    ("max-sequence-length-0", GEN + ["--max-sequence-length", "0", "-o", "{out}/x.png"], False,
     "--max-sequence-length 0: must be 1 to 512"),
    ("mesh-bad", GEN + ["--mesh", "rows=2", "-o", "{out}/x.png"], False, "unknown axis 'rows'"),
    ("empty-prompt", ["generate", "--model", "testbed-sd3", "--prompt", " ", "-o", "{out}/x.png"], False,
     "--prompt '': must be a non-empty text"),
    ("dtype-float64", GEN + ["--dtype", "float64", "-o", "{out}/x.png"], True, "argument --dtype: invalid choice"),
    ("attention-impl-cuda", GEN + ["--attention-impl", "cuda", "-o", "{out}/x.png"], True,
     "argument --attention-impl: invalid choice: 'cuda'"),
    ("steps-not-a-number", GEN + ["--steps", "many", "-o", "{out}/x.png"], True,
     "argument --steps: invalid int value"),
    ("missing-required", ["generate", "--model", "testbed-sd3", "-o", "{out}/x.png"], True,
     "the following arguments are required: --prompt"),
    # outputs
    ("output-missing-folder", GEN + ["-o", "{out}/missing_dir/x.png"], False,
     "-o {out}/missing_dir/x.png: the folder {out}/missing_dir does not exist"),
    ("output-txt", GEN + ["-o", "{out}/x.txt"], False, "-o {out}/x.txt: extension '.txt' is not an image format"),
    ("output-no-extension", GEN + ["-o", "{out}/x"], False, "no extension is not an image format"),
    ("output-is-a-folder", GEN + ["-o", "{out}"], False, "is a folder; give a file name"),
    ("save-latents-missing-folder", GEN + ["--save-latents", "{out}/missing/x.npy", "-o", "{out}/x.png"], False,
     "--save-latents {out}/missing/x.npy: the folder {out}/missing does not exist"),
    ("save-latents-not-npy", GEN + ["--save-latents", "{out}/x.txt", "-o", "{out}/x.png"], False,
     "--save-latents {out}/x.txt: must end in .npy"),
    # --latents
    ("latents-shape", GEN + ["--latents", "{in}/lat_small.npy", "-o", "{out}/x.png"], False,
     "shape (1, 4, 8, 8) does not fit 64x64 with this model: expected (1, 4, 16, 16) = [B, C, H/4, W/4]"),
    ("latents-shape-vae8", GEN[:2] + ["{in}/vae8"] + GEN[3:] + ["--latents", "{in}/lat_small.npy", "-o",
                                                                "{out}/x.png"], False,
     "expected (1, 4, 16, 16) = [B, C, H/8, W/8] (SD3, VAE scale 8"),
    ("latents-flux-unpacked", ["generate", "--model", "testbed-flux", "--prompt", "x", "--latents",
                               "{in}/lat_flux_unpacked.npy", "-o", "{out}/x.png"], False,
     "expected packed (1, 64, 16) = [B, (H/4/2)·(W/4/2), C·4] (FLUX, VAE scale 4"),
    ("latents-int", GEN + ["--latents", "{in}/lat_int.npy", "-o", "{out}/x.png"], False,
     "dtype int32; expected floating-point noise"),
    ("latents-not-npy", GEN + ["--latents", "{in}/not_npy.npy", "-o", "{out}/x.png"], False, "not a .npy array"),
    ("latents-missing", GEN + ["--latents", "{in}/none.npy", "-o", "{out}/x.png"], False,
     "--latents {in}/none.npy: no such file"),
    ("latents-rows-vs-prompts", GEN + ["--prompt", "b", "--latents", "{in}/lat_ok.npy", "-o", "{out}/x.png"],
     False, "shape (1, 4, 16, 16) does not fit 64x64 with this model: expected (2, 4, 16, 16)"),
    # plans
    ("plan-for-another-model", GEN + ["--plan", "{in}/flux_plan.json", "-o", "{out}/x.png"], False,
     "flux_plan.json: model.family = 'flux' but the model has family = 'sd3'"),
    ("plan-steps-mismatch", GEN + ["--plan", "{in}/sd3_plan_4_steps.json", "--steps", "28", "-o", "{out}/x.png"],
     False, "the plan has 4 steps but --steps is 28"),
    ("plan-missing", GEN + ["--plan", "{in}/none.json", "-o", "{out}/x.png"], False,
     "--plan {in}/none.json: no such file"),
    ("plan-deeply-nested", GEN + ["--plan", "{in}/deep.json", "-o", "{out}/x.png"], False,
     "deep.json: not a plan (JSON nested deeper than Python's recursion limit)"),
    ("plan-show-deeply-nested", ["plan", "show", "{in}/deep.json"], False,
     "deep.json: not a plan (JSON nested deeper than Python's recursion limit)"),
    ("plan-show-unknown-model", ["plan", "show", "{in}/sd3_plan.json", "--model", "testbed-sdxl"], False,
     "--model testbed-sdxl: no such file or folder"),
    # calibrate
    ("calibrate-delta-negative", CAL[:6] + ["-1", "--no-progress", "-o", "{out}/p.json"], False,
     "--delta -1: must be a finite number > 0"),
    ("calibrate-steps-1", CAL + ["--steps", "1", "-o", "{out}/p.json"], False,
     "--steps 1: must be >= 2 (step 0 is always full)"),
    ("calibrate-resolution-bad", CAL + ["--resolution", "60", "-o", "{out}/p.json"], False,
     "--resolution 60: must be a multiple of 8"),
    ("calibrate-output-not-json", CAL + ["-o", "{out}/p.txt"], False, "-o {out}/p.txt: must end in .json"),
    ("calibrate-output-missing-folder", CAL + ["-o", "{out}/nope/p.json"], False, "the folder {out}/nope"),
    ("calibrate-resume-without-checkpoint", CAL + ["--resume", "-o", "{out}/p.json"], False,
     "--resume: no checkpoint at {out}/p.json.calib.npz"),
    ("calibrate-cfg-candidate-without-cfg", CAL + ["--candidates", "cfg_share", "--guidance", "1", "-o",
                                                   "{out}/p.json"], False,
     "--candidates: cfg_share needs classifier-free guidance"),
    ("calibrate-batch-too-small", CAL + ["--prompt", "b", "--batch", "1", "-o", "{out}/p.json"], False,
     "--batch 1: the progressive pass needs all 2 prompts"),
    ("calibrate-prompts-missing", ["calibrate", "--model", "testbed-sd3", "--prompts", "{in}/none.txt", "--delta",
                                   "0.1", "-o", "{out}/p.json"], False, "--prompts {in}/none.txt: no such file"),
    ("calibrate-c-zero", CAL + ["--c", "0", "-o", "{out}/p.json"], False, "--c 0: must be a number > 0"),
    ("calibrate-c-nan", CAL + ["--c", "nan", "-o", "{out}/p.json"], False, "--c nan: must be a number > 0"),
    ("calibrate-latency-table-missing", CAL + ["--latency-table", "{in}/none.json", "-o", "{out}/p.json"], False,
     "--latency-table {in}/none.json: no such file"),
    # eval
    ("eval-repeat-0", EVAL + ["--repeat", "0", "--out-dir", "{out}/ev"], False, "--repeat 0: must be >= 1"),
    ("eval-batch-0", EVAL + ["--batch", "0", "--out-dir", "{out}/ev"], False, "--batch 0: must be >= 1"),
    ("eval-plan-for-another-model", EVAL[:5] + ["--plan", "{in}/flux_plan.json", "--out-dir", "{out}/ev"], False,
     "model.family = 'flux' but the model has family = 'sd3'"),
    ("eval-steps-mismatch", EVAL + ["--steps", "10", "--out-dir", "{out}/ev"], False,
     "the plan has 28 steps but --steps is 10"),
    ("eval-height-bad", EVAL + ["--height", "30", "--out-dir", "{out}/ev"], False, "--height 30: must be a multiple"),
    ("eval-guidance-negative", EVAL + ["--guidance", "-1", "--out-dir", "{out}/ev"], False, "--guidance -1"),
    ("eval-out-dir-is-a-file", EVAL + ["--out-dir", "{in}/prompts.txt"], False, "is a file, not a folder"),
]


@pytest.mark.parametrize("argv,argparse_exit,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_stops_before_the_work(argv, argparse_exit, message, inputs, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    out.mkdir()

    def fill(s: str) -> str:
        return s.replace("{in}", str(inputs)).replace("{out}", str(out))

    argv = [fill(a) for a in argv]
    if argparse_exit:
        with pytest.raises(SystemExit) as e:
            main(argv)
        rc = e.value.code
    else:
        rc = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert rc == 2, captured.err
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"dfa2 {argv[0]}: error: "), lines[0]
    assert fill(message) in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""
    assert os.listdir(out) == [], f"files written: {os.listdir(out)}"


def test_help_shows_every_default(capsys):
    """Each option of generate, calibrate and eval says its default (required ones excepted)."""
    from dfa2_jax.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("generate", "calibrate", "eval"):
        p = sub.choices[name]
        for action in p._actions:
            if action.required or action.dest in ("help", "prompt", "prompts"):  # --prompt or --prompts: one needed
                continue
            assert "default" in (action.help or ""), f"dfa2 {name} {action.option_strings}: no default in help"
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "default: from the model folder's dfa2_defaults.json, else the family's" in text
    text = " ".join(sub.choices["generate"].format_help().split())
    assert "(SD3 28, FLUX.1-dev 28, FLUX.1-schnell 4)" in text and "(SD3 7.0, FLUX.1-dev 3.5, FLUX.1-schnell none)" in text


def test_ctrl_c_in_generate(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the model loads: one line, status 130, no image."""
    import dfa2_jax.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dfa2_jax.pipeline, "load_pipeline", interrupted)
    rc = main(GEN + ["-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 130 and err.splitlines() == ["dfa2 generate: interrupted"]
    assert os.listdir(tmp_path) == []


def test_ctrl_c_in_calibrate_keeps_a_resumable_checkpoint(tmp_path, capsys, monkeypatch):
    """Ctrl-C during step 2 of 3 (FLUX testbed: no CFG, the quicker one): one line naming the checkpoint and
    --resume, status 130; the checkpoint holds the two finished steps and ``--resume`` finishes the plan."""
    import dfa2_jax.calibrate.calibrate as cal_mod
    from dfa2_jax.plan import Plan

    real_step = cal_mod.run_step
    seen = []

    def step(*a, **k):
        t = int(a[-1])  # the step index (jnp.int32)
        seen.append(t)
        if t == 2:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    out = tmp_path / "plan.json"
    argv = ["calibrate", "--model", "testbed-flux", "--prompt", "a red circle", "--delta", "0.1", "--no-progress",
            "--steps", "3", "--candidates", "arrow:2,cache", "--savings", "exact", "-o", str(out)]
    monkeypatch.setattr(cal_mod, "run_step", step)
    rc = main(argv)
    err = capsys.readouterr().err
    ckpt = f"{out}.calib.npz"
    assert rc == 130, err
    assert err.splitlines() == [f"dfa2 calibrate: interrupted; progress kept in {ckpt} (2 of 3 steps done): run the "
                                "same command with --resume to continue"]
    assert os.path.isfile(ckpt) and not out.exists() and seen == [0, 1, 2]
    monkeypatch.setattr(cal_mod, "run_step", real_step)
    assert main(argv + ["--resume"]) == 0
    plan = Plan.load(out)
    assert plan.steps == 3 and plan.calibration["resolution"] == [64, 64] and not os.path.exists(ckpt)
    assert plan.model["family"] == "flux" and plan.model["text_tokens"] == 32  # the folder's T5 length
