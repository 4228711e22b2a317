"""A procedural text-to-image testbed: a world of flat shapes with exact captions (:mod:`.world`), a small
CNN that reads its pictures back (:mod:`.classifier`), for a prompt-accuracy metric, and small SD3- and
FLUX-style pipelines trained on each of its two worlds, shipped with the package (:mod:`.shipped`:
:func:`load_testbed`)."""

from dfa2_jax.testbed.world import (BACKGROUNDS, COLOURS, DEFAULT_BACKGROUND, IMAGE_SIZE, POSITIONS, SHAPES, SIZES,
                                    Obj, Scene, caption, is_heldout, is_world_caption, make_batch, parse_caption,
                                    render, render_batch, sample_scene)
from dfa2_jax.testbed.shipped import GenerationSettings, load_testbed, testbed_path, testbed_settings

__all__ = ["IMAGE_SIZE", "SHAPES", "COLOURS", "BACKGROUNDS", "DEFAULT_BACKGROUND", "SIZES", "POSITIONS", "Obj",
           "Scene", "sample_scene", "render", "render_batch", "caption", "parse_caption", "is_world_caption",
           "make_batch", "is_heldout", "GenerationSettings", "testbed_path", "testbed_settings", "load_testbed"]
