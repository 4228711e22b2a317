"""A small CNN that reads a testbed picture back: for each grid cell whether it holds an object and that object's
shape, colour and size, plus the background — and the "prompt accuracy" metric built on it. One classifier per
world (:mod:`dfa2_jax.testbed.world`): the config names its world, v1 (9 cells of 64x64 pictures) by default.

    >>> from dfa2_jax.testbed import classifier, world
    >>> images, captions, _ = world.make_batch(seed=0, n=8, split="heldout")
    >>> classifier.prompt_accuracy(images, captions)          # float64 [8], 1.0 = every attribute satisfied
    array([1., 1., 1., 1., 1., 1., 1., 1.])
    >>> images, captions, _ = world.make_batch(0, 8, "heldout", world="v2")
    >>> classifier.prompt_accuracy(images, captions)          # v2 captions: the shipped v2 classifier
    array([1., 1., 1., 1., 1., 1., 1., 1.])

Model: one CNN shared by the cells (weight sharing: every cell's object looks the same up to a sub-pixel
offset) reads a CROP x CROP window centred on the cell — the cell (v1: 21.3 px, v2: 32 px) plus a margin, from
the image padded by edge replication — through three 3x3 convolutions (the last two stride 2), a 1x1 projection
and a dense layer, then per-cell heads (occupied: 1 logit; shape, colour, size: one softmax each). The
background head reads the mean of the cells' features. Weights (float32) ship with the config in the file's
metadata: v1 (~0.3 M) in ``dfa2_jax/assets/testbed_classifier.safetensors``, v2 (~0.36 M, ``ClassifierConfig.v2()``)
in ``testbed2_classifier.safetensors`` (:data:`ASSETS`); ``scripts/train_testbed_classifier.py [--world v2]``
makes them. Loading needs numpy + JAX only (converters.safetensors_io), never torch.

Prompt accuracy of an image and its caption = satisfied / checked, where per caption object 4 attributes are
checked — an object is present in the stated cell, and it has the stated shape, colour and size (an absent object
fails all four) — plus the background (the default when the caption says none), and every cell the caption leaves
empty that the classifier sees an object in is one more checked, failed attribute (a spurious object). So the
score is in [0, 1], 1 only when the picture shows exactly the caption's scene as far as the classifier can tell.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfa2_jax.testbed import world
from dfa2_jax.testbed.world import is_world_caption

_ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
ASSETS = {"v1": os.path.join(_ASSET_DIR, "testbed_classifier.safetensors"),
          "v2": os.path.join(_ASSET_DIR, "testbed2_classifier.safetensors")}  # the shipped weights per world
ASSET = ASSETS["v1"]
FORMAT = "dfa2-testbed-classifier"
MAX_CHUNK = 256  # images per compiled call; smaller batches are padded to the next power of two


def heads(w: str | world.WorldSpec = "v1") -> tuple[tuple[str, int], ...]:
    """Per-cell logit groups of a world's classifier, in this order."""
    w = world.get_world(w)
    return (("occupied", 1), ("shape", len(w.shapes)), ("colour", len(w.colours)), ("size", len(w.sizes)))


N_CELLS = world.GRID * world.GRID  # v1
HEADS = heads("v1")
N_CELL_LOGITS = sum(n for _, n in HEADS)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of :class:`CellClassifier`. ``crop``: window side per cell (px, before the strides), ``pad``: edge
    padding so every window (with ``max_shift`` px of training jitter) lies inside the padded image; ``world``:
    the world it reads (a name in :data:`world.WORLDS`; files without it are v1)."""

    crop: int = 28
    pad: int = 6
    max_shift: int = 2
    widths: tuple[int, int, int] = (16, 32, 64)
    proj: int = 32
    hidden: int = 128
    world: str = "v1"

    @classmethod
    def v2(cls, **override) -> ClassifierConfig:
        """The v2 world (32 px cells, objects up to 22 px): a 36 px window keeps 5+ px around the largest object
        at the largest shift and never reaches a neighbour's object (>= 21 px from the cell centre)."""
        return cls(**{**dict(crop=36, pad=6, max_shift=2, world="v2"), **override})

    @property
    def spec(self) -> world.WorldSpec:
        return world.get_world(self.world)

    @property
    def n_cells(self) -> int:
        return self.spec.n_cells

    @property
    def n_cell_logits(self) -> int:
        return sum(n for _, n in heads(self.world))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClassifierConfig:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"classifier config has unknown field(s) {unknown} (expected {sorted(names)})")
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)

    def crop_starts(self) -> np.ndarray:
        """int32 [n_cells, 2]: (row, column) of each cell's window in the padded image, row-major cells."""
        w = self.spec
        starts = [int(round(c - self.crop / 2)) + self.pad for c in
                  (world.cell_centre(i, w)[0] for i in range(w.grid))]
        if min(starts) - self.max_shift < 0 or \
                max(starts) + self.max_shift + self.crop > w.image_size + 2 * self.pad:
            raise ValueError(f"crop={self.crop} with max_shift={self.max_shift} needs more than pad={self.pad}")
        return np.array([(starts[p // w.grid], starts[p % w.grid]) for p in range(w.n_cells)], np.int32)


# ================================================================================================ model
class CellClassifier(nnx.Module):
    """images [B, S, S, 3] in [-1, 1] -> (cell logits [B, n_cells, 16], background logits [B, n_backgrounds]);
    v1: S = 64, 9 cells; v2: S = 128, 16 cells."""

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        c = config
        w0, w1, w2 = c.widths
        self.config = c
        self.conv1 = nnx.Conv(3, w0, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(w0, w1, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.conv3 = nnx.Conv(w1, w2, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.proj = nnx.Conv(w2, c.proj, (1, 1), rngs=rngs)
        side = math.ceil(math.ceil(c.crop / 2) / 2)  # after two stride-2 SAME convolutions
        self.fc = nnx.Linear(side * side * c.proj, c.hidden, rngs=rngs)
        self.cell_head = nnx.Linear(c.hidden, c.n_cell_logits, rngs=rngs)
        self.bg_head = nnx.Linear(c.hidden, len(c.spec.backgrounds), rngs=rngs)

    def crops(self, x: jax.Array, shifts: jax.Array | None = None) -> jax.Array:
        """x [B, S, S, 3] -> [B, n_cells, crop, crop, 3]; shifts int [B, n_cells, 2] move each window (training)."""
        c = self.config
        xp = jnp.pad(x, ((0, 0), (c.pad, c.pad), (c.pad, c.pad), (0, 0)), mode="edge")
        starts = jnp.asarray(c.crop_starts())[None]  # [1, n_cells, 2]
        if shifts is not None:
            starts = starts + shifts
        starts = jnp.broadcast_to(starts, (x.shape[0], c.n_cells, 2))

        def one(img, st):  # img [H, W, 3], st [2]
            return jax.lax.dynamic_slice(img, (st[0], st[1], 0), (c.crop, c.crop, 3))

        return jax.vmap(lambda img, sts: jax.vmap(lambda st: one(img, st))(sts))(xp, starts)

    def __call__(self, x: jax.Array, shifts: jax.Array | None = None):
        b, n = x.shape[0], self.config.n_cells
        h = self.crops(x, shifts).reshape(b * n, self.config.crop, self.config.crop, 3)
        h = jax.nn.relu(self.conv1(h))
        h = jax.nn.relu(self.conv2(h))
        h = jax.nn.relu(self.conv3(h))
        h = jax.nn.relu(self.proj(h))
        h = jax.nn.relu(self.fc(h.reshape(b * n, -1))).reshape(b, n, -1)  # [B, n_cells, hidden]
        return self.cell_head(h), self.bg_head(h.mean(axis=1))


def new_module(config: ClassifierConfig = ClassifierConfig(), seed: int = 0) -> CellClassifier:
    """A freshly initialised classifier (``nnx.Rngs(seed)``)."""
    return CellClassifier(config, rngs=nnx.Rngs(seed))


def normalise(images) -> Any:
    """uint8 [B, S, S, 3] -> float32 in [-1, 1] (a jax array)."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


# ================================================================================================ io
def _leaf_name(path) -> str:
    return ".".join(str(p) for p in path)


def save_weights(module, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the module's parameters (float32) and config to ``path`` atomically (safetensors)."""
    from converters.safetensors_io import save_file

    _, state = nnx.split(module, nnx.Param)
    tensors = {_leaf_name(p): np.asarray(v[...], np.float32) for p, v in nnx.to_flat_state(state)}
    meta = {"format": FORMAT, "config": module.config.to_json(), **(extra_metadata or {})}
    save_file(tensors, path, metadata=meta)


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A loaded classifier: ``config``, the nnx split (``graphdef``, ``state``), ``metadata`` from the file and
    :meth:`logits` (jit-compiled, uint8 images in)."""

    config: ClassifierConfig
    graphdef: Any
    state: Any
    metadata: dict
    path: str | None = None

    @functools.cached_property
    def _jitted(self):
        graphdef = self.graphdef

        @jax.jit
        def apply(state, images_u8):
            return nnx.merge(graphdef, state)(normalise(images_u8))

        return apply

    @property
    def world(self) -> str:
        return self.config.world

    def logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, S, S, 3] -> (cell logits float32 [N, n_cells, 16], background logits [N, n_backgrounds]),
        in chunks of <= MAX_CHUNK images padded to a power of two (few distinct compiled shapes)."""
        n, c = len(images), self.config
        size = c.spec.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"images: shape {images.shape}, expected [N, {size}, {size}, 3] (world {c.world})")
        cells = np.zeros((n, c.n_cells, c.n_cell_logits), np.float32)
        bgs = np.zeros((n, len(c.spec.backgrounds)), np.float32)
        for lo in range(0, n, MAX_CHUNK):
            part = images[lo:lo + MAX_CHUNK]
            m = len(part)
            size = min(MAX_CHUNK, 1 << (m - 1).bit_length())
            if size > m:
                part = np.concatenate([part, np.zeros((size - m,) + part.shape[1:], part.dtype)])
            c, b = self._jitted(self.state, part)
            cells[lo:lo + m], bgs[lo:lo + m] = np.asarray(c)[:m], np.asarray(b)[:m]
        return cells, bgs


def load_classifier(path: str | os.PathLike | None = None, *, world: str = "v1") -> Classifier:
    """Read a classifier from a safetensors file (default: the shipped asset of ``world``). Every missing, unused
    or misshapen tensor is an error naming it and the file. Cached per path."""
    return _load(os.path.abspath(os.fspath(path if path is not None else asset_path(world))))


def asset_path(world_name: str = "v1") -> str:
    """The shipped weights file of a world's classifier."""
    world.get_world(world_name)
    if world_name not in ASSETS:
        raise FileNotFoundError(f"no shipped testbed classifier for world {world_name!r} (shipped: {list(ASSETS)})")
    return ASSETS[world_name]


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Classifier:
    from converters.safetensors_io import CheckpointError, SafetensorsFile

    if not os.path.isfile(path):
        flag = {os.path.abspath(p): ("" if w == "v1" else f" --world {w}") for w, p in ASSETS.items()}
        hint = (f" (run scripts/train_testbed_classifier.py{flag[path]} to make it)" if path in flag else "")
        raise FileNotFoundError(f"{path}: no testbed classifier weights{hint}")
    with SafetensorsFile(path) as f:
        meta = dict(f.metadata)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: metadata format {meta.get('format')!r}, expected {FORMAT!r} "
                                  "(not a testbed classifier file)")
        if "config" not in meta:
            raise CheckpointError(f"{path}: no 'config' in the metadata")
        config = ClassifierConfig.from_json(meta["config"])
        abstract = nnx.eval_shape(lambda: new_module(config))
        graphdef, state = nnx.split(abstract)
        flat = list(nnx.to_flat_state(state))
        names = {_leaf_name(p) for p, _ in flat}
        unused = sorted(set(f.keys()) - names)
        if unused:
            raise CheckpointError(f"{path}: tensor(s) {unused} have no place in the classifier (config {config})")
        leaves = []
        for p, var in flat:
            name = _leaf_name(p)
            if name not in f:
                raise CheckpointError(f"{path}: no tensor {name!r} (the classifier with config {config} needs it)")
            arr = f.get(name)
            if tuple(arr.shape) != tuple(var.shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, expected "
                                      f"{tuple(var.shape)}")
            leaves.append((p, var.replace(jnp.asarray(np.array(arr, np.float32)))))
    return Classifier(config, graphdef, nnx.from_flat_state(leaves), meta, path)


# ================================================================================================ labels
def _scenes_world(scenes: Sequence[world.Scene], default: str = "v1") -> world.WorldSpec:
    names = {s.world for s in scenes}
    if len(names) > 1:
        raise ValueError(f"scenes of several worlds: {sorted(names)}")
    return world.get_world(names.pop() if names else default)


def targets(scenes: Sequence[world.Scene], world_name: str = "v1") -> dict[str, np.ndarray]:
    """Ground truth of scenes (all of one world; ``world_name`` only names it for an empty list):
    ``occupied`` int32 [N, n_cells] (0/1), ``shape``/``colour``/``size`` int32 [N, n_cells] (indices into the
    world's shapes / colours / sizes, -1 in empty cells), ``background`` int32 [N]."""
    w = _scenes_world(scenes, world_name)
    n = len(scenes)
    out = {k: np.full((n, w.n_cells), -1, np.int32) for k in ("shape", "colour", "size")}
    out["occupied"] = np.zeros((n, w.n_cells), np.int32)
    out["background"] = np.zeros((n,), np.int32)
    colours, bgs = w.colour_names, w.background_names
    for i, s in enumerate(scenes):
        out["background"][i] = bgs.index(s.background)
        for o in s.objects:
            out["occupied"][i, o.position] = 1
            out["shape"][i, o.position] = w.shapes.index(o.shape)
            out["colour"][i, o.position] = colours.index(o.colour)
            out["size"][i, o.position] = w.sizes.index(o.size)
    return out


def split_logits(cell_logits, world_name: str = "v1"):
    """[..., 16] -> dict of the per-cell logit groups (:func:`heads` order; ``occupied`` keeps its last axis of
    1)."""
    out, lo = {}, 0
    for name, n in heads(world_name):
        out[name] = cell_logits[..., lo:lo + n]
        lo += n
    return out


def decode(cell_logits: np.ndarray, bg_logits: np.ndarray, world_name: str = "v1") -> dict[str, np.ndarray]:
    """Logits -> predictions in the layout of :func:`targets` (shape / colour / size predicted in every cell,
    occupied or not; ``occupied`` from logit > 0)."""
    g = split_logits(np.asarray(cell_logits), world_name)
    pred = {"occupied": (g["occupied"][..., 0] > 0).astype(np.int32)}
    for k in ("shape", "colour", "size"):
        pred[k] = np.argmax(g[k], axis=-1).astype(np.int32)
    pred["background"] = np.argmax(np.asarray(bg_logits), axis=-1).astype(np.int32)
    return pred


def attribute_accuracy(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-attribute accuracy: ``occupied`` over all cells, ``shape``/``colour``/``size`` over the truly occupied
    cells, ``background`` per image, ``object`` (occupied + all three right) over the truly occupied cells."""
    occ = truth["occupied"] == 1
    out = {"occupied": float(np.mean(pred["occupied"] == truth["occupied"]))}
    ok_all = pred["occupied"][occ] == 1
    for k in ("shape", "colour", "size"):
        hit = pred[k][occ] == truth[k][occ]
        out[k] = float(np.mean(hit))
        ok_all &= hit
    out["background"] = float(np.mean(pred["background"] == truth["background"]))
    out["object"] = float(np.mean(ok_all))
    return out


# ================================================================================================ metric
def to_world_images(images, world_name: str = "v1") -> np.ndarray:
    """uint8 [N, S, S, 3] (S: the world's image_size, 64 in v1) from uint8 [N, H, W, 3] (H, W >= S) or a
    sequence of PIL images / uint8 HxWx3 arrays; anything larger is resized down to SxS with PIL's box filter (an
    area average)."""
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, np.ndarray):
        raise ValueError(f"images: expected uint8 [N, H, W, 3], got an array of shape {images.shape}")
    else:
        items = list(images)
    size = world.get_world(world_name).image_size
    out = np.empty((len(items), size, size, 3), np.uint8)
    for i, im in enumerate(items):
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
        else:
            a = np.asarray(im)
            if a.dtype != np.uint8:
                raise ValueError(f"image {i}: dtype {a.dtype}, expected uint8 RGB")
            if a.ndim != 3 or a.shape[-1] != 3:
                raise ValueError(f"image {i}: shape {a.shape}, expected [H, W, 3] RGB")
            if a.shape[:2] == (size, size):
                out[i] = a
                continue
            im = Image.fromarray(a)
        if im.width < size or im.height < size:
            raise ValueError(f"image {i}: {im.width}x{im.height} is smaller than the world's {size}x{size}")
        out[i] = np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BOX))
    return out


def classify(images, *, classifier: Classifier | None = None, world_name: str = "v1") -> dict[str, np.ndarray]:
    """Predictions (:func:`decode` layout) for images accepted by :func:`to_world_images`; the classifier's world
    (default: the shipped classifier of ``world_name``) sets the image size."""
    clf = classifier or load_classifier(world=world_name)
    c = clf.config
    x = to_world_images(images, c.world)
    if len(x) == 0:
        return decode(np.zeros((0, c.n_cells, c.n_cell_logits)), np.zeros((0, len(c.spec.backgrounds))), c.world)
    return decode(*clf.logits(x), c.world)


def score(pred: dict[str, np.ndarray], scenes: Sequence[world.Scene]) -> dict[str, np.ndarray]:
    """Prompt-accuracy counts per image: ``satisfied`` and ``checked`` (int [N]), ``spurious`` (objects seen in
    cells the caption leaves empty, int [N]), ``accuracy`` = satisfied / checked (float64 [N]) and ``all_right``
    (bool [N]: every attribute of the caption satisfied and nothing spurious)."""
    truth = targets(scenes)
    occ = truth["occupied"] == 1
    present = (pred["occupied"] == 1) & occ
    sat = present.sum(1)
    for k in ("shape", "colour", "size"):
        sat = sat + (present & (pred[k] == truth[k])).sum(1)
    sat = sat + (pred["background"] == truth["background"])
    spurious = ((pred["occupied"] == 1) & ~occ).sum(1)
    checked = 4 * occ.sum(1) + 1 + spurious
    return {"satisfied": sat.astype(np.int64), "checked": checked.astype(np.int64),
            "spurious": spurious.astype(np.int64), "accuracy": sat / checked, "all_right": sat == checked}


def prompt_scores(images, captions: Sequence[str], *, classifier: Classifier | None = None) -> dict[str, np.ndarray]:
    """:func:`score` of ``images`` against ``captions`` (the arguments of :func:`prompt_accuracy`)."""
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    if classifier is not None:
        w = classifier.config.world
    else:  # the shipped classifier of the captions' world (v1 when the first caption belongs to none)
        w = (world.detect_world(captions[0]) if captions else None) or "v1"
        classifier = load_classifier(world=w)
    scenes = []
    for i, c in enumerate(captions):
        try:
            scenes.append(world.parse_caption(c, w))
        except ValueError as e:
            raise ValueError(f"caption {i}: {e}") from None
    x = to_world_images(images, w)
    if len(x) != len(scenes):
        raise ValueError(f"{len(x)} images but {len(scenes)} captions")
    return score(classify(x, classifier=classifier), scenes)


def prompt_accuracy(images, captions: Sequence[str], *, classifier: Classifier | None = None) -> np.ndarray:
    """Fraction of each caption's attributes that its image satisfies, float64 [N] (module docstring). ``images``:
    uint8 [N, S, S, 3] or larger (box-resized to S = the world's image_size), or N PIL images; ``captions``: N
    captions of the classifier's world (:func:`world.parse_caption`; a caption it rejects raises its ValueError,
    prefixed with the index). Default classifier: the shipped one of the first caption's world (v1 or v2)."""
    return prompt_scores(images, captions, classifier=classifier)["accuracy"]


__all__ = ["ASSET", "ASSETS", "asset_path", "heads", "ClassifierConfig", "Classifier", "CellClassifier", "new_module",
           "load_classifier", "save_weights", "targets", "decode", "split_logits", "attribute_accuracy",
           "to_world_images", "classify", "score", "prompt_scores", "prompt_accuracy", "is_world_caption",
           "normalise"]
