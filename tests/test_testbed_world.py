"""The procedural testbed world: caption <-> scene round trip, deterministic batches, a held-out split disjoint
from training, renders that show what the caption states, and parse errors that name the bad word."""

import numpy as np
import pytest

from dfa2_jax.testbed import world
from dfa2_jax.testbed.world import (BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Obj, Scene, caption,
                                    is_heldout, is_world_caption, make_batch, parse_caption, render, render_batch,
                                    sample_scene)


def test_constants():
    assert IMAGE_SIZE == 64
    assert len(SHAPES) >= 5 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLOURS) >= 8 and SIZES == ("small", "large")
    assert POSITIONS == ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
                         "bottom right")
    assert world.DEFAULT_BACKGROUND == "black" and len(BACKGROUNDS) >= 4
    # backgrounds are far from every object colour (a shape always stands out)
    for b, bc in BACKGROUNDS.items():
        for c, cc in COLOURS.items():
            assert np.abs(np.subtract(bc, cc)).max() >= 90, (b, c)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_round_trip_many_seeds(split):
    _, captions, scenes = make_batch(7, 600, split)
    for text, scene in zip(captions, scenes):
        assert caption(scene) == text
        assert parse_caption(text) == scene
        assert parse_caption("  " + text + "\n") == scene
        assert is_world_caption(text)
    # the sampler covers the whole vocabulary
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES) and {o.colour for o in objs} == set(COLOURS)
    assert {o.size for o in objs} == set(SIZES) and {o.position for o in objs} == set(range(9))
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}


def test_round_trip_sample_scene_loop():
    rng = np.random.default_rng(123)
    for _ in range(500):
        s = sample_scene(rng)
        assert parse_caption(caption(s)) == s
        assert list(o.position for o in s.objects) == sorted(o.position for o in s.objects)


def test_caption_text():
    s = Scene((Obj("square", "blue", "large", 4), Obj("circle", "red", "small", 0)), "grey")
    assert s.objects[0].position == 0  # stored row-major whatever the given order
    assert caption(s) == "a small red circle at the top left and a large blue square in the centre on a grey background"
    s3 = Scene((Obj("cross", "white", "small", 8), Obj("triangle", "cyan", "large", 3),
                Obj("diamond", "yellow", "large", 1)))
    assert caption(s3) == ("a large yellow diamond at the top, a large cyan triangle on the left and a small white "
                           "cross at the bottom right")
    assert caption(Scene((Obj("circle", "green", "small", 5),), "dark blue")) == \
        "a small green circle on the right on a dark blue background"


def test_make_batch_deterministic_and_prefix():
    a_img, a_cap, a_sc = make_batch(3, 50)
    b_img, b_cap, b_sc = make_batch(3, 50)
    assert a_img.shape == (50, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    c_img, c_cap, _ = make_batch(3, 20)
    assert np.array_equal(c_img, a_img[:20]) and c_cap == a_cap[:20]
    d_img, d_cap, _ = make_batch(4, 50)
    assert d_cap != a_cap
    e_img, e_cap, _ = make_batch(3, 50, "heldout")
    assert e_cap != a_cap
    z_img, z_cap, z_sc = make_batch(0, 0)
    assert z_img.shape == (0, 64, 64, 3) and z_cap == [] and z_sc == []


def test_heldout_disjoint_from_train():
    _, train, tr_sc = make_batch(0, 2000, "train")
    _, held, he_sc = make_batch(0, 2000, "heldout")
    assert not set(train) & set(held)
    assert not any(is_heldout(s) for s in tr_sc) and all(is_heldout(s) for s in he_sc)
    assert len(set(held)) > 1500  # plenty of distinct held-out captions
    # the split is a property of the caption, whatever the seed
    _, train2, _ = make_batch(99, 2000, "train")
    assert not set(train2) & set(held)


def test_bad_split_and_seed():
    with pytest.raises(ValueError, match="'test'"):
        make_batch(0, 3, "test")
    with pytest.raises(ValueError, match="-1"):
        make_batch(-1, 3)


def _cell_box(p):
    """(row, column) of the pixel holding the cell's centre."""
    x, y = world.cell_centre(p)
    return int(y), int(x)


def test_render_shows_the_caption():
    _, _, scenes = make_batch(11, 300)
    images = render_batch(scenes)
    for img, s in zip(images, scenes):
        assert np.array_equal(img, render(s))
        bg = np.array(BACKGROUNDS[s.background])
        assert np.array_equal(img[0, 31], bg) or any(o.position == 1 for o in s.objects)
        assert np.array_equal(img[63, 63], bg)  # no object reaches the corner pixel
        occupied = {o.position for o in s.objects}
        for o in s.objects:
            cy, cx = _cell_box(o.position)
            colour = np.array(COLOURS[o.colour])
            # every shape covers its centre: the centre pixel carries the stated colour exactly
            assert np.array_equal(img[cy, cx], colour), (caption(s), o)
            lo, hi = world._cell_span(o.position // 3), world._cell_span(o.position % 3)
            window = img[lo[0]:lo[1], hi[0]:hi[1]].astype(int)
            # ... and so does the inside of the shape: the most common non-background colour of the cell
            px = window.reshape(-1, 3)
            px = px[np.abs(px - bg).sum(-1) > 0]
            values, counts = np.unique(px, axis=0, return_counts=True)
            assert np.array_equal(values[np.argmax(counts)], colour), (caption(s), o)
            coverage = (np.abs(window - bg).sum(-1) > 0).sum()
            assert (coverage > 150) == (o.size == "large"), (caption(s), coverage)
        for p in set(range(9)) - occupied:  # empty cells are pure background
            lo, hi = world._cell_span(p // 3), world._cell_span(p % 3)
            window = img[lo[0] + 2:lo[1] - 2, hi[0] + 2:hi[1] - 2]
            assert (window == bg).all(), (caption(s), POSITIONS[p])


def test_shapes_differ():
    masks = world.shape_masks()
    assert masks.shape == (len(SHAPES), 2, 9, 64, 64)
    assert masks.min() >= 0 and masks.max() <= 1
    # anti-aliased: partial coverage exists along the edges
    assert ((masks > 0) & (masks < 1)).any()
    for j in range(2):
        flat = masks[:, j, 4].reshape(len(SHAPES), -1)
        for a in range(len(SHAPES)):
            for b in range(a + 1, len(SHAPES)):
                assert np.abs(flat[a] - flat[b]).sum() > (8 if j == 0 else 25), (SHAPES[a], SHAPES[b], j)


@pytest.mark.parametrize("text, word", [
    ("a large pink circle at the top", "'pink'"),
    ("a huge red circle at the top", "'huge'"),
    ("a large red hexagon at the top", "'hexagon'"),
    ("a large red circle at the tip", "'at the tip'"),
    ("the large red circle at the top", "'the'"),
    ("a large red circle at the top on a pink background", "'pink'"),
    ("a large red circle at the top on a black background", "'black'"),
    ("a large red circle", "too short"),
    ("a large red circle at the top and a small blue square at the top", "two objects 'at the top'"),
    ("a small red circle in the centre and a large blue square at the top", "row-major"),
    ("a large Red circle at the top", "'Red'"),
    ("", "empty caption"),
])
def test_bad_captions_name_the_word(text, word):
    with pytest.raises(ValueError, match=word.replace("(", r"\(")):
        parse_caption(text)
    assert not is_world_caption(text)


def test_non_canonical_joining_rejected():
    for text in ["a large red circle at the top, a small blue square in the centre",
                 "a large red circle at the top and a small blue square in the centre and a small red circle at the "
                 "bottom",
                 "a large red circle at the top,  a small blue square on the left and a small red circle at the "
                 "bottom",
                 "a large red circle at the top, a large red circle on the left, a small blue square in the centre "
                 "and a small red circle at the bottom"]:
        with pytest.raises(ValueError):
            parse_caption(text)
    assert not is_world_caption(None) and not is_world_caption(3)


def test_scene_validation():
    with pytest.raises(ValueError, match="'octagon'"):
        Obj("octagon", "red", "small", 0)
    with pytest.raises(ValueError, match="position 9"):
        Obj("circle", "red", "small", 9)
    with pytest.raises(ValueError, match="same cell 2"):
        Scene((Obj("circle", "red", "small", 2), Obj("square", "blue", "large", 2)))
    with pytest.raises(ValueError, match="1..3 objects, got 0"):
        Scene(())
    with pytest.raises(ValueError, match="'beige'"):
        Scene((Obj("circle", "red", "small", 2),), "beige")
