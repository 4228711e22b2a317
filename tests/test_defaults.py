"""Generation defaults travel with the model (``dfa2_defaults.json``, :mod:`dfa2_jax.defaults`): the reader and its
one-line errors, the families' published defaults, the shipped testbeds' files, and the acceptance test —
``dfa2 generate --model testbed-sd3 --prompt <caption> -o x.png`` with no other flag draws the caption (and the
same for ``testbed-flux``)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dfa2_jax.defaults import (DEFAULTS_FILE, DefaultsError, GenerationDefaults, family_defaults, model_defaults,
                               read_defaults)
from dfa2_jax.models.configs import FluxConfig, SD3Config

# prompt accuracy of world.make_batch(0, 16, "heldout") generated as one batch with every setting left to the
# model folder (28 steps, 64x64, T5 32, SD3 CFG 4, seed 0), measured on CPU with jax 0.10.2: 1.0 for each of the 16
# captions with both testbeds.
ACC_MIN = 0.9


def test_family_defaults_are_diffusers():
    assert family_defaults(SD3Config.medium()) == GenerationDefaults(1024, 1024, 28, 7.0, 256, "bfloat16")
    assert family_defaults(SD3Config.v35_large()) == GenerationDefaults.sd3()
    assert family_defaults(FluxConfig.dev()) == GenerationDefaults(1024, 1024, 28, 3.5, 512, "bfloat16")
    assert family_defaults(FluxConfig.schnell()) == GenerationDefaults(1024, 1024, 4, None, 256, "bfloat16")
    # diffusers: SD3 sample_size x VAE scale; FLUX 128 x VAE scale
    assert family_defaults(SD3Config.medium(sample_size=16), vae_scale_factor=4).height == 64
    assert family_defaults(FluxConfig.dev(), vae_scale_factor=4).width == 512


def test_read_partial_file_and_comments(tmp_path):
    (tmp_path / DEFAULTS_FILE).write_text(json.dumps({"_comment": "x", "num_inference_steps": 8,
                                                      "guidance_scale": 5}))
    assert read_defaults(tmp_path) == {"num_inference_steps": 8, "guidance_scale": 5.0}
    d = model_defaults(tmp_path, SD3Config.medium())
    assert d == dataclasses.replace(GenerationDefaults.sd3(), num_inference_steps=8, guidance_scale=5.0)
    assert model_defaults(tmp_path / "elsewhere", SD3Config.medium()) == GenerationDefaults.sd3()  # no file


@pytest.mark.parametrize("content,message", [
    ({"height": 0}, "height = 0 must be an integer >= 1"),
    ({"width": 64.5}, "width = 64.5 must be an integer >= 1"),
    ({"num_inference_steps": True}, "num_inference_steps = True must be an integer >= 1"),
    ({"max_sequence_length": 1024}, "max_sequence_length = 1024 must be <= 512"),
    ({"guidance_scale": -1}, "guidance_scale = -1 must be a finite number >= 0, or null"),
    ({"guidance_scale": "high"}, "guidance_scale = 'high' must be a finite number"),
    ({"dtype": "float64"}, "dtype = 'float64' must be one of float32, bfloat16, float16"),
    ({"steps": 4}, "unknown field 'steps' (known: height, width, num_inference_steps"),
    ([1, 2], "expected a JSON object"),
    ("{not json", "not valid JSON (line 1 column 2"),
])
def test_bad_files_name_the_file_and_field(tmp_path, content, message):
    path = tmp_path / DEFAULTS_FILE
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DefaultsError) as e:
        model_defaults(tmp_path, SD3Config.medium())
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_guidance_must_fit_the_model(tmp_path):
    path = tmp_path / DEFAULTS_FILE
    path.write_text(json.dumps({"guidance_scale": 3.5}))
    with pytest.raises(DefaultsError, match="has no guidance embedding"):
        model_defaults(tmp_path, FluxConfig.schnell())
    path.write_text(json.dumps({"guidance_scale": None}))
    with pytest.raises(DefaultsError, match="has a guidance embedding"):
        model_defaults(tmp_path, FluxConfig.dev())
    assert model_defaults(tmp_path, SD3Config.medium()).guidance_scale == 1.0  # SD3: null = CFG off
    path.write_text(json.dumps({"guidance_scale": 0}))
    assert model_defaults(tmp_path, FluxConfig.schnell()).guidance_scale is None  # diffusers' schnell passes 0.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_shipped_defaults_are_the_trained_settings(family):
    """Each shipped testbed's dfa2_defaults.json = its testbed_info.json (what it was trained for), float32; the
    short name resolves to the folder; load_testbed() still returns the same settings."""
    from dfa2_jax.cli.common import inspect_model, resolve_model
    from dfa2_jax.testbed import testbed_path, testbed_settings

    path = testbed_path(family)
    assert resolve_model(f"testbed-{family}") == path
    st = testbed_settings(family)
    d = inspect_model(path).defaults
    assert d == GenerationDefaults(st.height, st.width, st.num_inference_steps, st.guidance_scale,
                                   st.max_sequence_length, "float32")
    assert d.generate_kwargs() == st.generate_kwargs()
    assert set(read_defaults(path)) == {f.name for f in dataclasses.fields(GenerationDefaults)}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_with_no_flags_draws_the_caption(family, tmp_path, capsys, monkeypatch):
    """The acceptance test: ``dfa2 generate --model testbed-<family> --prompt <caption> -o x.png``, no other flag,
    on 16 held-out captions (one call with 16 --prompt: one batch), each image scored by the shipped testbed
    classifier. The settings the command picks are the folder's, and the Python pipeline with every argument left
    None prepares exactly what it does with the folder's settings passed."""
    from PIL import Image

    from dfa2_jax.cli import build_parser, main
    from dfa2_jax.cli.generate import resolve
    from dfa2_jax.defaults import pipeline_defaults
    from dfa2_jax.pipeline import load_pipeline
    from dfa2_jax.testbed import testbed_path, testbed_settings, world
    from dfa2_jax.testbed.classifier import prompt_accuracy

    monkeypatch.setenv("DFA2_CACHE_DIR", str(tmp_path / "cache"))  # converted params: not under ~/.cache
    _, captions, _ = world.make_batch(0, 16, "heldout")
    argv = ["generate", "--model", f"testbed-{family}"] + [a for c in captions for a in ("--prompt", c)]
    argv += ["-o", str(tmp_path / "x.png")]
    settings = resolve(build_parser().parse_args(argv))
    st = testbed_settings(family)
    assert (settings.height, settings.width, settings.num_inference_steps, settings.guidance_scale,
            settings.max_sequence_length, settings.dtype) == (64, 64, 28, st.guidance_scale, 32, "float32")

    assert main(argv) == 0
    paths = capsys.readouterr().out.split()
    assert paths == [str(tmp_path / f"x-{i}.png") for i in range(16)]
    images = [Image.open(p).convert("RGB") for p in paths]
    assert all(im.size == (64, 64) for im in images)
    acc = prompt_accuracy(images, captions)
    assert acc.mean() >= ACC_MIN, f"prompt accuracy {acc.round(3)} (mean {acc.mean():.3f})"

    # the Python pipeline, arguments left None: the folder's settings (prepare only: no denoising)
    pipe = load_pipeline(testbed_path(family), dtype="float32", cache_dir=False)
    assert pipeline_defaults(pipe).generate_kwargs() == st.generate_kwargs()
    a = pipe.prepare(captions[:2])
    b = pipe.prepare(captions[:2], **st.generate_kwargs())
    assert (a.size, a.n_img, a.text_len, a.do_cfg, len(a.timesteps)) == (b.size, b.n_img, b.text_len, b.do_cfg, 28)
    np.testing.assert_array_equal(a.latents, b.latents)
    for k in ("prompt_embeds", "pooled_projections", "guidance_scale", "guidance"):
        if b.cond.get(k) is not None:
            np.testing.assert_array_equal(a.cond[k], b.cond[k])
