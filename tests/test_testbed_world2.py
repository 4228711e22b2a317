"""World v2 (128x128, 4x4 grid, 1-5 objects, "in row R column C") and its classifier: exact caption <-> scene
round trips (hypothesis), v1 unchanged bit for bit, renders that show the caption, and the shipped v2 classifier's
accuracy and prompt-accuracy metric."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfa2_jax.testbed import classifier as tc
from dfa2_jax.testbed import world
from dfa2_jax.testbed.world import (V1, V2, Obj, Scene, caption, detect_world, get_world, is_heldout,
                                    is_world_caption, make_batch, parse_caption, render, render_batch)
from tests.oracles import degrade


# ============================================================================================ the spec
def test_v2_spec():
    assert (V2.image_size, V2.grid, V2.n_cells, V2.min_objects, V2.max_objects) == (128, 4, 16, 1, 5)
    assert V2.shapes == V1.shapes and V2.colours == V1.colours and V2.backgrounds == V1.backgrounds
    assert V2.sizes == ("small", "large") and V2.size_px == (12, 22)
    assert V2.positions[0] == "row 1 column 1" and V2.positions[6] == "row 2 column 3"
    assert V2.position_phrases[15] == "in row 4 column 4"
    assert get_world("v2") is V2 and get_world(V2) is V2 and get_world() is V1
    with pytest.raises(ValueError, match="unknown world 'v3'"):
        get_world("v3")


def test_v1_spec_is_the_module_constants():
    assert (V1.image_size, V1.grid, V1.max_objects) == (world.IMAGE_SIZE, world.GRID, world.MAX_OBJECTS)
    assert V1.positions == world.POSITIONS and V1.position_phrases == world.POSITION_PHRASES
    assert dict(V1.colour_rgb) == world.COLOURS and dict(V1.background_rgb) == world.BACKGROUNDS
    assert dict(zip(V1.sizes, V1.size_px)) == world.SIZE_PX


def test_v1_bit_for_bit():
    """Renders, captions and masks of v1 as made before the world was parametrised (sha256 pinned then)."""
    h = hashlib.sha256()
    for split in ("train", "heldout"):
        images, captions, _ = make_batch(5, 300, split)
        h.update(images.tobytes())
        h.update("\n".join(captions).encode())
    h.update(world.shape_masks().tobytes())
    assert h.hexdigest() == "99b9272a6835a01334f091782777e1e3c0511ed4140b80a2d20fd4ac6bb68f04"


# ============================================================================================ captions
@st.composite
def scenes(draw, name: str):
    w = get_world(name)
    k = draw(st.integers(w.min_objects, w.max_objects))
    cells = draw(st.lists(st.integers(0, w.n_cells - 1), min_size=k, max_size=k, unique=True))
    objs = [Obj(draw(st.sampled_from(w.shapes)), draw(st.sampled_from(w.colour_names)), draw(st.sampled_from(w.sizes)),
                c, name) for c in cells]
    return Scene(tuple(objs), draw(st.sampled_from(w.background_names)), name)


any_scene = st.sampled_from(["v1", "v2"]).flatmap(scenes)


@settings(max_examples=300, deadline=None)
@given(any_scene)
def test_round_trip(scene):
    text = caption(scene)
    assert parse_caption(text, scene.world) == scene
    assert parse_caption(f" {text}\n", scene.world) == scene
    assert detect_world(text) == scene.world  # no caption belongs to two worlds
    assert not is_world_caption(text, "v2" if scene.world == "v1" else "v1")
    assert caption(parse_caption(text, scene.world)) == text


_WORDS = sorted({x for w in (V1, V2) for group in (w.shapes, w.colour_names, w.sizes, w.background_names,
                                                   w.position_phrases) for p in group for x in p.split()}
                | {"a", "and", "on", "background", ",", "0", "5", "row", "column", ""})


@settings(max_examples=400, deadline=None)
@given(any_scene, st.integers(0, 10 ** 6), st.sampled_from(_WORDS), st.booleans())
def test_parse_is_exact(scene, where, word, insert):
    """Any edit of a caption either is rejected (ValueError) or is itself a canonical caption of the world."""
    words = caption(scene).split(" ")
    i = where % (len(words) + insert)
    words = words[:i] + [word] + words[i + (not insert):]
    text = " ".join(words)
    try:
        got = parse_caption(text, scene.world)
    except ValueError:
        return
    assert caption(got) == text.strip() and got.world == scene.world


def test_caption_text_v2():
    s = Scene((Obj("cross", "white", "small", 15, "v2"), Obj("circle", "red", "large", 1, "v2"),
               Obj("square", "cyan", "small", 6, "v2")), "grey", "v2")
    assert caption(s) == ("a large red circle in row 1 column 2, a small cyan square in row 2 column 3 and a small "
                          "white cross in row 4 column 4 on a grey background")
    assert caption(Scene((Obj("diamond", "blue", "large", 4, "v2"),), world="v2")) == \
        "a large blue diamond in row 2 column 1"


@pytest.mark.parametrize("text, word", [
    ("a large red circle in row 5 column 1", "'in row 5 column 1'"),
    ("a large red circle in row 1 column 0", "'in row 1 column 0'"),
    ("a large red circle at the top", "'at the top'"),  # a v1 phrase
    ("a large red circle in row 2 column 1 and a small red circle in row 1 column 1", "row-major"),
    ("a large red circle in row 1 column 1 and a small red circle in row 1 column 1", "two objects"),
    (", ".join(f"a large red circle in row 1 column {c}" for c in (1, 2, 3, 4)) + " and a large red circle in row "
     "2 column 1 and a large red circle in row 2 column 2", "unknown position"),
    (", ".join(f"a large red circle in row 1 column {c}" for c in (1, 2, 3, 4)) + ", a large red circle in row 2 "
     "column 1 and a large red circle in row 2 column 2", "6 objects, at most 5"),
])
def test_bad_v2_captions(text, word):
    with pytest.raises(ValueError, match=word):
        parse_caption(text, "v2")
    assert not is_world_caption(text, "v2") and detect_world(text) != "v2"


def test_v2_scene_validation():
    with pytest.raises(ValueError, match="position 16"):
        Obj("circle", "red", "small", 16, "v2")
    with pytest.raises(ValueError, match="position 9"):
        Obj("circle", "red", "small", 9)  # v1 stays 0..8
    assert Obj("circle", "red", "small", 9, "v2").position == 9
    with pytest.raises(ValueError, match="object of world 'v1'"):
        Scene((Obj("circle", "red", "small", 2),), world="v2")
    with pytest.raises(ValueError, match="1..5 objects, got 6"):
        Scene(tuple(Obj("circle", "red", "small", c, "v2") for c in range(6)), world="v2")
    with pytest.raises(ValueError, match="belongs to world 'v1', not 'v2'"):
        render_batch([Scene((Obj("circle", "red", "small", 2),))], world="v2")


# ============================================================================================ batches, split
def test_make_batch_v2():
    a_img, a_cap, a_sc = make_batch(3, 60, world="v2")
    assert a_img.shape == (60, 128, 128, 3) and a_img.dtype == np.uint8
    b_img, b_cap, _ = make_batch(3, 20, world="v2")
    assert np.array_equal(b_img, a_img[:20]) and b_cap == a_cap[:20]
    assert all(s.world == "v2" and parse_caption(c, "v2") == s for c, s in zip(a_cap, a_sc))
    z_img, z_cap, _ = make_batch(0, 0, world="v2")
    assert z_img.shape == (0, 128, 128, 3) and z_cap == []


def test_v2_covers_the_world_and_holds_out_by_caption():
    _, train, tr = make_batch(0, 1500, "train", world="v2")
    _, held, he = make_batch(0, 1500, "heldout", world="v2")
    assert not set(train) & set(held)
    assert not any(is_heldout(s) for s in tr) and all(is_heldout(s) for s in he)
    objs = [o for s in tr for o in s.objects]
    assert {o.position for o in objs} == set(range(16)) and {len(s.objects) for s in tr} == {1, 2, 3, 4, 5}
    assert {o.shape for o in objs} == set(V2.shapes) and {o.colour for o in objs} == set(V2.colour_names)
    assert {s.background for s in tr} == set(V2.background_names)
    assert len(set(held)) > 1350  # only one-object scenes (5120 of them) repeat much


# ============================================================================================ rendering
def _window(p, w=V2):
    (y0, y1), (x0, x1) = world._cell_span(p // w.grid, w), world._cell_span(p % w.grid, w)
    return slice(y0, y1), slice(x0, x1)


def test_v2_masks_stay_in_their_cells_with_room_between():
    masks = world.shape_masks("v2")
    assert masks.shape == (5, 2, 16, 128, 128) and masks.min() >= 0 and masks.max() <= 1
    for p in range(16):
        inside = np.zeros((128, 128), bool)
        inside[_window(p)] = True
        assert not masks[:, :, p][..., ~inside].any(), p
    # the largest object leaves >= 10 px to the next cell's: columns covered by cell 0 and cell 1
    cols0 = np.nonzero(masks[:, 1, 0].max(axis=(0, 1)))[0]
    cols1 = np.nonzero(masks[:, 1, 1].max(axis=(0, 1)))[0]
    assert cols1.min() - cols0.max() - 1 >= 10


def test_v2_render_shows_the_caption():
    _, _, scenes_ = make_batch(11, 200, world="v2")
    images = render_batch(scenes_)
    masks = world.shape_masks("v2")
    covered = (masks > 0).sum(axis=(3, 4))  # [shape, size, cell]
    small_max, large_min = covered[:, 0].max(), covered[:, 1].min()
    assert small_max < large_min  # size reads from the covered area for every shape
    for img, s in zip(images, scenes_):
        assert np.array_equal(img, render(s))
        bg = np.array(V2.background_rgb[s.background])
        occupied = {o.position for o in s.objects}
        for o in s.objects:
            x, y = world.cell_centre(o.position, "v2")
            assert np.array_equal(img[int(y), int(x)], V2.colour_rgb[o.colour]), (caption(s), o)
            win = img[_window(o.position)].astype(int)
            n = (np.abs(win - bg).sum(-1) > 0).sum()
            assert (n > (small_max + large_min) / 2) == (o.size == "large"), (caption(s), n)
        for p in set(range(16)) - occupied:
            ys, xs = _window(p)
            assert (img[ys.start + 2:ys.stop - 2, xs.start + 2:xs.stop - 2] == bg).all(), (caption(s), p)


# ============================================================================================ classifier v2
@pytest.fixture(scope="module")
def heldout2():
    return make_batch(0, 300, "heldout", world="v2")



def test_v2_classifier_shipped():
    path = tc.ASSETS["v2"]
    assert os.path.isfile(path) and os.path.getsize(path) < 2 * 1024 * 1024
    clf = tc.load_classifier(world="v2")
    assert clf.config == tc.ClassifierConfig.v2() and clf.world == "v2" and clf.metadata["world"] == "v2"
    assert tc.load_classifier(path) is clf
    assert tc.load_classifier().config == tc.ClassifierConfig()  # v1 unchanged


def test_v2_classifier_accuracy(heldout2):
    images, _, scenes_ = heldout2
    clf = tc.load_classifier(world="v2")
    truth = tc.targets(scenes_)
    assert truth["occupied"].shape == (300, 16)
    clean = tc.attribute_accuracy(tc.classify(images, classifier=clf), truth)
    degraded = tc.attribute_accuracy(tc.classify(degrade(images, 1), classifier=clf), truth)
    for k in ("occupied", "shape", "colour", "size", "background"):
        assert clean[k] >= 0.99, clean
        assert degraded[k] >= 0.97, degraded


def test_v2_prompt_accuracy(heldout2):
    images, captions, _ = heldout2
    clf = tc.load_classifier(world="v2")
    auto = tc.prompt_accuracy(images, captions)  # v2 captions pick the v2 classifier
    np.testing.assert_array_equal(auto, tc.prompt_accuracy(images, captions, classifier=clf))
    assert auto.mean() >= 0.99
    wrong = tc.prompt_accuracy(images, captions[1:] + captions[:1])
    assert wrong.mean() < 0.6 and (wrong < auto).mean() > 0.9
    scores = tc.prompt_scores(images, captions)
    assert scores["all_right"].dtype == bool and scores["all_right"].mean() >= 0.95
    big = np.kron(images[:4], np.ones((1, 2, 2, 1), np.uint8))  # 256x256: box-resized back to 128
    np.testing.assert_array_equal(tc.prompt_accuracy(big, captions[:4]), auto[:4])
    with pytest.raises(ValueError, match="caption 0: .*'in row 1 column 1'"):  # a v2 caption, the v1 classifier
        tc.prompt_accuracy(images[:1], ["a large red circle in row 1 column 1"], classifier=tc.load_classifier())


def test_v2_prompt_accuracy_exact_scores():
    s = Scene((Obj("circle", "red", "large", 0, "v2"), Obj("square", "blue", "small", 10, "v2")), "grey", "v2")
    img = render(s)[None]

    def acc(scene):
        return float(tc.prompt_accuracy(img, [caption(scene)])[0])

    assert acc(s) == 1.0
    assert acc(Scene((Obj("circle", "green", "large", 0, "v2"), s.objects[1]), "grey", "v2")) == 8 / 9
    assert acc(Scene((Obj("triangle", "red", "small", 0, "v2"), s.objects[1]), "grey", "v2")) == 7 / 9
    assert acc(Scene(s.objects[:1], "grey", "v2")) == 5 / 6  # the square is spurious
    moved = Scene((Obj("circle", "red", "large", 15, "v2"), s.objects[1]), "grey", "v2")
    assert acc(moved) == 5 / 10


def test_v2_classifier_save_load_round_trip(tmp_path):
    m = tc.new_module(tc.ClassifierConfig.v2(widths=(4, 8, 8), proj=4, hidden=8), seed=3)
    path = tmp_path / "tiny2.safetensors"
    tc.save_weights(m, path)
    clf = tc.load_classifier(path)
    assert clf.config.world == "v2" and clf.config.crop == 36
    images = make_batch(5, 3, world="v2")[0]
    cell, bg = m(tc.normalise(images))
    got_cell, got_bg = clf.logits(images)
    assert got_cell.shape == (3, 16, 16)
    np.testing.assert_allclose(got_cell, np.asarray(cell), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_bg, np.asarray(bg), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \[N, 128, 128, 3\]"):
        clf.logits(make_batch(5, 2)[0])
