"""A small CNN that reads a testbed picture back: for each of the 9 grid cells whether it holds an object and
that object's shape, colour and size, plus the background — and the "prompt accuracy" metric built on it.

    >>> from dfa2_jax.testbed import classifier, world
    >>> images, captions, _ = world.make_batch(seed=0, n=8, split="heldout")
    >>> classifier.prompt_accuracy(images, captions)          # float64 [8], 1.0 = every attribute satisfied
    array([1., 1., 1., 1., 1., 1., 1., 1.])

Model: one CNN shared by the 9 cells (weight sharing: every cell's object looks the same up to a sub-pixel
offset) reads a CROP x CROP window centred on the cell — the 21.3 px cell plus a margin, from the image padded
by edge replication — through three 3x3 convolutions (the last two stride 2), a 1x1 projection and a dense
layer, then per-cell heads (occupied: 1 logit; shape, colour, size: one softmax each). The background head reads
the mean of the 9 cells' features. Weights (~0.3 M float32) ship in ``dfa2_jax/assets/testbed_classifier.
safetensors`` with the config in the file's metadata; ``scripts/train_testbed_classifier.py`` makes them.
Loading needs numpy + JAX only (converters.safetensors_io), never torch.

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

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                     "testbed_classifier.safetensors")
FORMAT = "dfa2-testbed-classifier"
N_CELLS = world.GRID * world.GRID
HEADS = (("occupied", 1), ("shape", len(world.SHAPES)), ("colour", len(world.COLOURS)),
         ("size", len(world.SIZES)))  # per-cell logit groups, in this order
N_CELL_LOGITS = sum(n for _, n in HEADS)
MAX_CHUNK = 256  # images per compiled call; smaller batches are padded to the next power of two


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of :class:`CellClassifier`. ``crop``: window side per cell (px, before the strides), ``pad``: edge
    padding so every window (with ``max_shift`` px of training jitter) lies inside the padded image."""

    crop: int = 28
    pad: int = 6
    max_shift: int = 2
    widths: tuple[int, int, int] = (16, 32, 64)
    proj: int = 32
    hidden: int = 128

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
        """int32 [9, 2]: (row, column) of each cell's window in the padded image, row-major cells."""
        starts = [int(round(c - self.crop / 2)) + self.pad for c in
                  (world.cell_centre(i)[0] for i in range(world.GRID))]
        if min(starts) - self.max_shift < 0 or \
                max(starts) + self.max_shift + self.crop > world.IMAGE_SIZE + 2 * self.pad:
            raise ValueError(f"crop={self.crop} with max_shift={self.max_shift} needs more than pad={self.pad}")
        return np.array([(starts[p // world.GRID], starts[p % world.GRID]) for p in range(N_CELLS)], np.int32)


# ================================================================================================ model
class CellClassifier(nnx.Module):
    """images [B, 64, 64, 3] in [-1, 1] -> (cell logits [B, 9, 16], background logits [B, n_backgrounds])."""

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
        self.cell_head = nnx.Linear(c.hidden, N_CELL_LOGITS, rngs=rngs)
        self.bg_head = nnx.Linear(c.hidden, len(world.BACKGROUNDS), rngs=rngs)

    def crops(self, x: jax.Array, shifts: jax.Array | None = None) -> jax.Array:
        """x [B, 64, 64, 3] -> [B, 9, crop, crop, 3]; shifts int [B, 9, 2] move each window (training)."""
        c = self.config
        xp = jnp.pad(x, ((0, 0), (c.pad, c.pad), (c.pad, c.pad), (0, 0)), mode="edge")
        starts = jnp.asarray(c.crop_starts())[None]  # [1, 9, 2]
        if shifts is not None:
            starts = starts + shifts
        starts = jnp.broadcast_to(starts, (x.shape[0], N_CELLS, 2))

        def one(img, st):  # img [H, W, 3], st [2]
            return jax.lax.dynamic_slice(img, (st[0], st[1], 0), (c.crop, c.crop, 3))

        return jax.vmap(lambda img, sts: jax.vmap(lambda st: one(img, st))(sts))(xp, starts)

    def __call__(self, x: jax.Array, shifts: jax.Array | None = None):
        b = x.shape[0]
        h = self.crops(x, shifts).reshape(b * N_CELLS, self.config.crop, self.config.crop, 3)
        h = jax.nn.relu(self.conv1(h))
        h = jax.nn.relu(self.conv2(h))
        h = jax.nn.relu(self.conv3(h))
        h = jax.nn.relu(self.proj(h))
        h = jax.nn.relu(self.fc(h.reshape(b * N_CELLS, -1))).reshape(b, N_CELLS, -1)  # [B, 9, hidden]
        return self.cell_head(h), self.bg_head(h.mean(axis=1))


def new_module(config: ClassifierConfig = ClassifierConfig(), seed: int = 0) -> CellClassifier:
    """A freshly initialised classifier (``nnx.Rngs(seed)``)."""
    return CellClassifier(config, rngs=nnx.Rngs(seed))


def normalise(images) -> Any:
    """uint8 [B, 64, 64, 3] -> float32 in [-1, 1] (a jax array)."""
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

    def logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 64, 64, 3] -> (cell logits float32 [N, 9, 16], background logits [N, n_backgrounds]),
        in chunks of <= MAX_CHUNK images padded to a power of two (few distinct compiled shapes)."""
        n = len(images)
        cells = np.zeros((n, N_CELLS, N_CELL_LOGITS), np.float32)
        bgs = np.zeros((n, len(world.BACKGROUNDS)), np.float32)
        for lo in range(0, n, MAX_CHUNK):
            part = images[lo:lo + MAX_CHUNK]
            m = len(part)
            size = min(MAX_CHUNK, 1 << (m - 1).bit_length())
            if size > m:
                part = np.concatenate([part, np.zeros((size - m,) + part.shape[1:], part.dtype)])
            c, b = self._jitted(self.state, part)
            cells[lo:lo + m], bgs[lo:lo + m] = np.asarray(c)[:m], np.asarray(b)[:m]
        return cells, bgs


def load_classifier(path: str | os.PathLike | None = None) -> Classifier:
    """Read a classifier from a safetensors file (default: the shipped asset). Every missing, unused or
    misshapen tensor is an error naming it and the file. Cached per path."""
    return _load(os.path.abspath(os.fspath(path if path is not None else ASSET)))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Classifier:
    from converters.safetensors_io import CheckpointError, SafetensorsFile

    if not os.path.isfile(path):
        hint = " (run scripts/train_testbed_classifier.py to make it)" if path == os.path.abspath(ASSET) else ""
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
def targets(scenes: Sequence[world.Scene]) -> dict[str, np.ndarray]:
    """Ground truth of scenes: ``occupied`` int32 [N, 9] (0/1), ``shape``/``colour``/``size`` int32 [N, 9]
    (indices into SHAPES / COLOURS / SIZES, -1 in empty cells), ``background`` int32 [N]."""
    n = len(scenes)
    out = {k: np.full((n, N_CELLS), -1, np.int32) for k in ("shape", "colour", "size")}
    out["occupied"] = np.zeros((n, N_CELLS), np.int32)
    out["background"] = np.zeros((n,), np.int32)
    colours, bgs = list(world.COLOURS), list(world.BACKGROUNDS)
    for i, s in enumerate(scenes):
        out["background"][i] = bgs.index(s.background)
        for o in s.objects:
            out["occupied"][i, o.position] = 1
            out["shape"][i, o.position] = world.SHAPES.index(o.shape)
            out["colour"][i, o.position] = colours.index(o.colour)
            out["size"][i, o.position] = world.SIZES.index(o.size)
    return out


def split_logits(cell_logits):
    """[..., 16] -> dict of the per-cell logit groups (HEADS order; ``occupied`` keeps its last axis of 1)."""
    out, lo = {}, 0
    for name, n in HEADS:
        out[name] = cell_logits[..., lo:lo + n]
        lo += n
    return out


def decode(cell_logits: np.ndarray, bg_logits: np.ndarray) -> dict[str, np.ndarray]:
    """Logits -> predictions in the layout of :func:`targets` (shape / colour / size predicted in every cell,
    occupied or not; ``occupied`` from logit > 0)."""
    g = split_logits(np.asarray(cell_logits))
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
def to_world_images(images) -> np.ndarray:
    """uint8 [N, 64, 64, 3] from uint8 [N, H, W, 3] (H, W >= 64) or a sequence of PIL images / uint8 HxWx3
    arrays; anything larger is resized down to 64x64 with PIL's box filter (an area average)."""
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, np.ndarray):
        raise ValueError(f"images: expected uint8 [N, H, W, 3], got an array of shape {images.shape}")
    else:
        items = list(images)
    size = world.IMAGE_SIZE
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


def classify(images, *, classifier: Classifier | None = None) -> dict[str, np.ndarray]:
    """Predictions (:func:`decode` layout) for images accepted by :func:`to_world_images`."""
    clf = classifier or load_classifier()
    x = to_world_images(images)
    if len(x) == 0:
        return decode(np.zeros((0, N_CELLS, N_CELL_LOGITS)), np.zeros((0, len(world.BACKGROUNDS))))
    return decode(*clf.logits(x))


def score(pred: dict[str, np.ndarray], scenes: Sequence[world.Scene]) -> dict[str, np.ndarray]:
    """Prompt-accuracy counts per image: ``satisfied`` and ``checked`` (int [N]), ``spurious`` (objects seen in
    cells the caption leaves empty, int [N]) and ``accuracy`` = satisfied / checked (float64 [N])."""
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
            "spurious": spurious.astype(np.int64), "accuracy": sat / checked}


def prompt_accuracy(images, captions: Sequence[str], *, classifier: Classifier | None = None) -> np.ndarray:
    """Fraction of each caption's attributes that its image satisfies, float64 [N] (module docstring). ``images``:
    uint8 [N, 64, 64, 3] or larger (box-resized to 64), or N PIL images; ``captions``: N world captions
    (:func:`world.parse_caption`; a caption it rejects raises its ValueError, prefixed with the index)."""
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    scenes = []
    for i, c in enumerate(captions):
        try:
            scenes.append(world.parse_caption(c))
        except ValueError as e:
            raise ValueError(f"caption {i}: {e}") from None
    x = to_world_images(images)
    if len(x) != len(scenes):
        raise ValueError(f"{len(x)} images but {len(scenes)} captions")
    return score(classify(x, classifier=classifier), scenes)["accuracy"]


__all__ = ["ASSET", "ClassifierConfig", "Classifier", "CellClassifier", "new_module", "load_classifier",
           "save_weights", "targets", "decode", "split_logits", "attribute_accuracy", "to_world_images", "classify",
           "score", "prompt_accuracy", "is_world_caption", "normalise"]
