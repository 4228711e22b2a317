"""A procedural text-to-image testbed: a world of flat shapes with exact captions (:mod:`.world`) and a small
CNN that reads its pictures back (:mod:`.classifier`), for a prompt-accuracy metric."""

from dfa2_jax.testbed.world import (BACKGROUNDS, COLOURS, DEFAULT_BACKGROUND, IMAGE_SIZE, POSITIONS, SHAPES, SIZES,
                                    Obj, Scene, caption, is_heldout, is_world_caption, make_batch, parse_caption,
                                    render, render_batch, sample_scene)

__all__ = ["IMAGE_SIZE", "SHAPES", "COLOURS", "BACKGROUNDS", "DEFAULT_BACKGROUND", "SIZES", "POSITIONS", "Obj",
           "Scene", "sample_scene", "render", "render_batch", "caption", "parse_caption", "is_world_caption",
           "make_batch", "is_heldout"]
