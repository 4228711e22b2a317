"""The shipped testbed classifier (accuracy on held-out renders, clean and degraded), the prompt-accuracy metric
(exact scores for known mistakes, resize handling, errors) and its place in the ``dfa2 eval`` report."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dfa2_jax.testbed import classifier as tc
from dfa2_jax.testbed import world
from dfa2_jax.testbed.world import Obj, Scene, caption, render
from tests.oracles import degrade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def heldout():
    return world.make_batch(0, 300, "heldout")



def test_shipped_weights_small_and_loadable():
    assert os.path.isfile(tc.ASSET)
    assert os.path.getsize(tc.ASSET) < 2 * 1024 * 1024
    clf = tc.load_classifier()
    assert clf.config == tc.ClassifierConfig() and clf.metadata["format"] == "dfa2-testbed-classifier"
    assert tc.load_classifier() is clf  # cached


def test_accuracy_on_heldout_renders(heldout):
    images, _, scenes = heldout
    acc = tc.attribute_accuracy(tc.classify(images), tc.targets(scenes))
    for k in ("occupied", "shape", "colour", "size", "background"):
        assert acc[k] >= 0.98, acc


def test_accuracy_on_degraded_renders(heldout):
    images, _, scenes = heldout
    acc = tc.attribute_accuracy(tc.classify(degrade(images, 1)), tc.targets(scenes))
    for k in ("occupied", "shape", "colour", "size", "background"):
        assert acc[k] >= 0.95, acc


def test_prompt_accuracy_of_ground_truth_and_wrong_captions(heldout):
    images, captions, _ = heldout
    right = tc.prompt_accuracy(images, captions)
    assert right.shape == (300,) and right.dtype == np.float64
    assert right.mean() >= 0.98 and (right >= 0.75).all()
    wrong = tc.prompt_accuracy(images, captions[1:] + captions[:1])  # each image scored against another caption
    assert wrong.mean() < 0.6 and (wrong < right).mean() > 0.9
    assert tc.prompt_accuracy(degrade(images, 2), captions).mean() >= 0.96


def test_prompt_accuracy_exact_scores():
    s = Scene((Obj("circle", "red", "large", 0), Obj("square", "blue", "small", 4)), "grey")
    img = render(s)[None]

    def acc(scene):
        return float(tc.prompt_accuracy(img, [caption(scene)])[0])

    assert acc(s) == 1.0  # checked: 2 objects x 4 + background = 9
    assert acc(Scene((Obj("circle", "green", "large", 0), Obj("square", "blue", "small", 4)), "grey")) == 8 / 9
    assert acc(Scene((Obj("diamond", "red", "small", 0), Obj("square", "blue", "small", 4)), "grey")) == 7 / 9
    assert acc(Scene(s.objects, "brown")) == 8 / 9
    assert acc(Scene(s.objects[:1], "grey")) == 5 / 6  # the square is a spurious object: 5 of 4 + 1 + 1
    # the circle stated in an empty cell: absent (4 failures), and the real circle is spurious
    moved = Scene((Obj("circle", "red", "large", 2), Obj("square", "blue", "small", 4)), "grey")
    assert acc(moved) == 5 / 10
    counts = tc.score(tc.classify(img), [moved])
    assert counts["satisfied"].tolist() == [5] and counts["checked"].tolist() == [10]
    assert counts["spurious"].tolist() == [1]


def test_prompt_accuracy_resizes_larger_images(heldout):
    images, captions, _ = heldout
    small = images[:8]
    big = np.kron(small, np.ones((1, 4, 4, 1), np.uint8))  # 256x256, each pixel a 4x4 block
    assert np.array_equal(tc.to_world_images(big), small)  # the box filter averages the blocks back
    np.testing.assert_array_equal(tc.prompt_accuracy(big, captions[:8]), tc.prompt_accuracy(small, captions[:8]))
    pil = [Image.fromarray(a) for a in big]
    np.testing.assert_array_equal(tc.prompt_accuracy(pil, captions[:8]), tc.prompt_accuracy(small, captions[:8]))
    rect = np.kron(small[:2], np.ones((1, 2, 3, 1), np.uint8))  # 128x192: resized to 64x64 as well
    assert np.array_equal(tc.to_world_images(rect), small[:2])


def test_prompt_accuracy_errors(heldout):
    images, captions, _ = heldout
    with pytest.raises(ValueError, match="caption 1: .*'pink'"):
        tc.prompt_accuracy(images[:2], [captions[0], "a large pink circle at the top"])
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        tc.prompt_accuracy(images[:3], captions[:2])
    with pytest.raises(ValueError, match="image 0: 32x32 is smaller"):
        tc.prompt_accuracy(images[:1, :32, :32], captions[:1])
    with pytest.raises(ValueError, match="float32"):
        tc.prompt_accuracy(images[:1].astype(np.float32), captions[:1])
    assert tc.is_world_caption(captions[0]) and not tc.is_world_caption("a red fox in the snow")


def test_load_errors(tmp_path):
    from converters.safetensors_io import CheckpointError, SafetensorsFile, save_file

    with pytest.raises(FileNotFoundError, match="no testbed classifier weights"):
        tc.load_classifier(tmp_path / "none.safetensors")
    with SafetensorsFile(tc.ASSET) as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
        meta = dict(f.metadata)
    missing = dict(tensors)
    del missing["fc.kernel"]
    save_file(missing, tmp_path / "missing.safetensors", meta)
    with pytest.raises(CheckpointError, match="'fc.kernel'"):
        tc.load_classifier(tmp_path / "missing.safetensors")
    save_file({**tensors, "extra.kernel": np.zeros(3, np.float32)}, tmp_path / "extra.safetensors", meta)
    with pytest.raises(CheckpointError, match="extra.kernel"):
        tc.load_classifier(tmp_path / "extra.safetensors")
    save_file(tensors, tmp_path / "nometa.safetensors", {"format": "something else"})
    with pytest.raises(CheckpointError, match="not a testbed classifier"):
        tc.load_classifier(tmp_path / "nometa.safetensors")


def test_save_load_round_trip(tmp_path):
    m = tc.new_module(tc.ClassifierConfig(widths=(4, 8, 8), proj=4, hidden=8), seed=3)
    path = tmp_path / "tiny.safetensors"
    tc.save_weights(m, path, {"note": "test"})
    clf = tc.load_classifier(path)
    assert clf.metadata["note"] == "test" and clf.config.hidden == 8
    images = world.make_batch(5, 3)[0]
    cell, bg = m(tc.normalise(images))
    got_cell, got_bg = clf.logits(images)
    np.testing.assert_allclose(got_cell, np.asarray(cell), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_bg, np.asarray(bg), rtol=1e-5, atol=1e-5)


def test_no_torch_needed():
    code = ("import sys; from dfa2_jax.testbed import classifier as c, world; im, cap, _ = world.make_batch(0, 2); "
            "print(c.prompt_accuracy(im, cap).tolist()); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr


# ============================================================================================ dfa2 eval
@pytest.fixture(scope="module")
def flux(tiny_pipes):
    return tiny_pipes["flux"]


def _plan(pipe, steps):
    from dfa2_jax.plan import Plan, model_info_for

    info = model_info_for(pipe.transformer.config)
    a = np.random.default_rng(1).integers(0, 2, (steps, len(info["layers"]), info["num_heads"]))
    a[0] = 0
    return Plan(info, steps, ["full", "cache"], a)


def test_evaluate_reports_prompt_accuracy(flux, tmp_path):
    import json

    from dfa2_jax.evaluate import EvalError, evaluate, format_table

    prompts = world.make_batch(0, 2, "heldout")[1]
    plan = _plan(flux, 2)
    kw = dict(seed=0, height=64, width=64, repeat=1, batch_size=1, max_sequence_length=16)
    r = evaluate(flux, plan, prompts, out_dir=tmp_path, **kw)
    pa = r["prompt_accuracy"]
    assert "prompt_accuracy_skipped" not in r and pa["classifier"] == os.path.abspath(tc.ASSET)
    for kind in ("dense", "compressed"):
        want = tc.prompt_accuracy(r["images"][kind], prompts)
        assert pa[kind] == pytest.approx(want.tolist()) and pa["mean"][kind] == pytest.approx(want.mean())
        assert all(0.0 <= v <= 1.0 for v in pa[kind])
    with open(r["report_path"], encoding="utf-8") as f:
        rep = json.load(f)
    assert rep["prompt_accuracy"]["dense"] == pytest.approx(pa["dense"])
    for key in ("per_image", "mean", "lpips", "clip_score", "timings"):  # the existing fields stay
        assert key in rep
    text = format_table(r)
    assert "acc D" in text and f"{pa['mean']['compressed']:.3f}" in text

    # any prompt that is not a world caption: skipped, with the reason
    r2 = evaluate(flux, plan, [prompts[0], "a red fox in the snow"], **kw)
    assert r2["prompt_accuracy"] is None
    assert r2["prompt_accuracy_skipped"].startswith("prompt 1 is not a testbed world caption")
    assert "prompt_accuracy: skipped (prompt 1" in format_table(r2) and "acc D" not in format_table(r2)
    with pytest.raises(EvalError, match="none.safetensors: no such testbed classifier"):
        evaluate(flux, plan, prompts, testbed_classifier=tmp_path / "none.safetensors", **kw)


def test_testbed_prompt_accuracy_entry(heldout, tmp_path):
    from dfa2_jax.evaluate import testbed_prompt_accuracy

    images, captions, _ = heldout
    e = testbed_prompt_accuracy(captions[:2], {"dense": images[:2], "compressed": images[2:4]})
    assert e["prompt_accuracy"]["dense"] == pytest.approx(tc.prompt_accuracy(images[:2], captions[:2]).tolist())
    assert e["prompt_accuracy"]["mean"]["compressed"] < 0.7  # the images of other captions
    small = [Image.fromarray(a[:32, :32]) for a in images[:2]]
    e = testbed_prompt_accuracy(captions[:2], {"dense": small, "compressed": small})
    assert e["prompt_accuracy"] is None and "dense images: image 0: 32x32 is smaller" in e["prompt_accuracy_skipped"]
    e = testbed_prompt_accuracy(captions[:2], {"dense": images[:2], "compressed": images[:2]},
                                classifier=tmp_path / "none.safetensors")
    assert e["prompt_accuracy"] is None and "no testbed classifier weights" in e["prompt_accuracy_skipped"]
