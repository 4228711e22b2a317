"""The trained testbed pipelines shipped with the package, and the generation settings they were trained for.

    >>> from dfa2_jax.testbed import load_testbed
    >>> pipe, settings = load_testbed()                       # SD3-style, float32, ~4 s on a CPU
    >>> out = pipe(["a large red circle in the centre"], seed=0, **settings.generate_kwargs())
    >>> flux, flux_settings = load_testbed("flux")            # FLUX-style
    >>> big, big_settings = load_testbed("sd3", world="v2")   # 1024 image tokens (128x128, x2 VAE, patch 2)
    >>> big_flux, _ = load_testbed("flux", world="v2")        # FLUX-style, 1024 image tokens

``dfa2_jax/assets/testbed_sd3/`` is a diffusers ``StableDiffusion3Pipeline`` folder (6 layers x 4 heads,
3.48 M transformer params, 64x64 images, tiny frozen text encoders) and ``dfa2_jax/assets/testbed_flux/`` a
``FluxPipeline`` folder (3 double + 6 single blocks x 4 heads of 32, RoPE, no guidance embedding, 3.39 M
params) sharing its VAE, CLIP-L tower and T5 encoder, both made by ``scripts/train_testbed.py`` on the
procedural world (:mod:`dfa2_jax.testbed.world`); docs/TESTBED.md tells their story. Each ``testbed_info.json``
holds the settings it must be sampled with: 64x64, the T5 length it was trained at (the pipelines pad T5 to
``max_sequence_length`` and do not mask, so another length changes the text tokens the model sees), 28 steps,
and CFG 4 for SD3 (FLUX: none; guidance_scale None). Each folder's ``dfa2_defaults.json``
(:mod:`dfa2_jax.defaults`) carries the same values (and float32), so ``dfa2 generate --model testbed-sd3`` and
``load_pipeline(testbed_path())(prompt)`` sample them without any flag or argument.

``dfa2_jax/assets/testbed2_sd3/`` is the second-generation SD3-style testbed, trained on world v2 (128x128
pictures, a 4x4 grid, 1-5 objects): 6 layers x 4 heads of 64 (13.75 M params, bfloat16 weights upcast on load),
a x2 VAE, so a picture is 32x32 = 1024 image tokens next to 2 x 56 text tokens: large enough for arrow
attention's bands to skip whole kernel tiles. Its settings: 128x128, 28 steps, CFG 4, T5 length 56.
``dfa2_jax/assets/testbed2_flux/`` is its FLUX-style twin (3 double + 6 single blocks x 4 heads of 64, RoPE, no
guidance embedding, 13.40 M params, bfloat16 weights; 2x2-packed latents, so again 1024 image tokens, next to 56
T5 tokens), sharing its VAE, CLIP-L tower and T5 encoder; settings: 128x128, 28 steps, no guidance, T5 length 56.
``MODEL_NAMES``: the short names ``testbed-sd3``, ``testbed-flux``, ``testbed2-sd3`` and ``testbed2-flux`` that
``--model`` accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
FAMILIES = ("sd3", "flux")
WORLDS = ("v1", "v2")
SHIPPED = {"v1": ("sd3", "flux"), "v2": ("sd3", "flux")}  # the families shipped per world
INFO_FILE = "testbed_info.json"


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """What a testbed pipeline was trained for (its ``testbed_info.json``)."""

    family: str
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float | None  # None: the model takes no guidance (the FLUX-style testbeds)
    max_sequence_length: int
    world: str = "v1"  # the world it was trained on (dfa2_jax.testbed.world.WORLDS; its classifier scores it)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pipe(prompts, **...)``, :func:`dfa2_jax.evaluate.evaluate` and (less
        ``num_inference_steps``, ``height`` and ``width``) :func:`dfa2_jax.calibrate.calibrate.calibrate`;
        ``guidance_scale`` only where the model takes one."""
        kw = {"height": self.height, "width": self.width, "num_inference_steps": self.num_inference_steps,
              "max_sequence_length": self.max_sequence_length}
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        return kw


def _folder_name(family: str, world: str) -> str:
    return {"v1": "testbed", "v2": "testbed2"}[world] + f"_{family}"


def testbed_path(family: str = "sd3", world: str = "v1") -> str:
    """The shipped pipeline folder of ``family`` trained on ``world`` (v1: ``testbed_{family}``, v2:
    ``testbed2_{family}``). Raises FileNotFoundError naming what is missing."""
    if world not in WORLDS:
        raise FileNotFoundError(f"no shipped testbed of world {world!r} (shipped: {', '.join(WORLDS)})")
    if family not in SHIPPED[world]:
        raise FileNotFoundError(f"no shipped {family!r} testbed (shipped: {', '.join(SHIPPED[world])})"
                                + ("" if world == "v1" else f" for world {world}"))
    path = os.path.join(ASSETS, _folder_name(family, world))
    if not os.path.isfile(os.path.join(path, INFO_FILE)):
        raise FileNotFoundError(f"{path}: the shipped testbed is missing or incomplete (no {INFO_FILE}); "
                                "reinstall the package")
    return path


# short names for ``--model`` (every command that reads one: generate, calibrate, eval, info, convert, plan)
MODEL_NAMES = {f"{prefix}-{family}": (family, world) for world, prefix in (("v1", "testbed"), ("v2", "testbed2"))
               for family in SHIPPED[world]}


def model_path(name: str) -> str | None:
    """The shipped folder of a short model name (:data:`MODEL_NAMES`), None for other strings. Raises
    FileNotFoundError when the named folder is missing from the installation."""
    named = MODEL_NAMES.get(name)
    return None if named is None else testbed_path(*named)


def read_settings(folder: str | os.PathLike) -> GenerationSettings:
    """The generation settings of a testbed pipeline folder, from its ``testbed_info.json``."""
    path = os.path.join(os.fspath(folder), INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (not a testbed folder)") from None
    try:
        return GenerationSettings(family=str(info["family"]), height=int(info["height"]), width=int(info["width"]),
                                  num_inference_steps=int(info["num_inference_steps"]),
                                  guidance_scale=(None if info["guidance_scale"] is None
                                                  else float(info["guidance_scale"])),
                                  max_sequence_length=int(info["max_sequence_length"]),
                                  world=str(info.get("world_name", "v1")))
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r} field") from None


def testbed_settings(family: str = "sd3", world: str = "v1") -> GenerationSettings:
    """The generation settings of the shipped ``family`` testbed of ``world``."""
    return read_settings(testbed_path(family, world))


def load_testbed(family: str = "sd3", *, world: str = "v1", dtype: str = "float32", cache_dir=False):
    """(pipeline, :class:`GenerationSettings`) of the shipped ``family`` testbed of ``world`` (v1: 64 image
    tokens, v2: 1024). ``cache_dir=False`` (default): the weights are converted on every load (a second or
    two) rather than copied under ~/.cache."""
    from dfa2_jax.pipeline import load_pipeline

    path = testbed_path(family, world)
    return load_pipeline(path, dtype=dtype, cache_dir=cache_dir), read_settings(path)


__all__ = ["GenerationSettings", "testbed_path", "testbed_settings", "read_settings", "load_testbed", "FAMILIES",
           "WORLDS", "SHIPPED", "MODEL_NAMES", "model_path"]
