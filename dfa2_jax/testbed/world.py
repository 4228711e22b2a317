"""A procedural text-to-image world: 64x64 pictures of 1-3 flat shapes on a 3x3 grid, with captions that state
every attribute the picture shows, and a parser that inverts the captions exactly.

    >>> images, captions, scenes = make_batch(seed=0, n=4)   # uint8 [4, 64, 64, 3], 4 str, 4 Scene
    >>> captions[3]
    'a large blue diamond at the top left on a dark blue background'
    >>> parse_caption(captions[3]) == scenes[3]
    True

The world (all of it is data in this file; nothing random outside ``sample_scene``):

* grid: the image is cut into 3x3 cells of 64/3 px; an object is centred in its cell, no jitter.
* objects: a shape from SHAPES, a colour from COLOURS, a size from SIZES (bounding box SIZE_PX: 10 or 18 px),
  at most one object per cell, 1-3 objects per scene.
* background: one of BACKGROUNDS; the default (black) is left unsaid in the caption.
* rendering: each shape is drawn at SUPERSAMPLE x resolution and box-downsampled, so edges are anti-aliased;
  objects never overlap (an 18 px object leaves >= 3 px to the next cell's object).

Captions are templated English, one phrase per object in row-major position order, joined as
"X", "X and Y" or "X, Y and Z", then " on a <background> background" unless the background is the default::

    a <size> <colour> <shape> <position phrase>[, ...][ and ...][ on a <background> background]

:func:`parse_caption` accepts exactly the strings :func:`caption` makes (surrounding whitespace aside) and
raises ValueError naming the first bad word otherwise, so ``caption(parse_caption(t)) == t.strip()``.

Held-out captions: a scene is *held out* when a fixed hash of its caption falls in the first HELDOUT_PERMILLE
of 1000 buckets (:func:`is_heldout`). ``make_batch(split="train")`` never returns a held-out scene and
``make_batch(split="heldout")`` returns only held-out scenes (rejection sampling from a separate random stream),
so held-out captions are unseen in training by construction, whatever the batch sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

import numpy as np

IMAGE_SIZE = 64
GRID = 3
SUPERSAMPLE = 4
MAX_OBJECTS = 3

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
}
# Backgrounds are darker than every object colour and far from each of them, so a shape always stands out.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "grey": (110, 110, 110),
    "dark blue": (20, 30, 100),
    "brown": (110, 65, 30),
}
DEFAULT_BACKGROUND = "black"
P_DEFAULT_BACKGROUND = 0.4  # sample_scene: the default background with this probability, else another one
SIZES: tuple[str, ...] = ("small", "large")
SIZE_PX: dict[str, int] = {"small": 10, "large": 18}  # bounding-box side in output pixels
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right",
                              "bottom left", "bottom", "bottom right")  # row-major 3x3 grid
POSITION_PHRASES: tuple[str, ...] = ("at the top left", "at the top", "at the top right", "on the left",
                                     "in the centre", "on the right", "at the bottom left", "at the bottom",
                                     "at the bottom right")
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_PERMILLE = 100  # 10% of all scenes (by caption hash) are held out of training

_PHRASE_TO_POSITION = {p: i for i, p in enumerate(POSITION_PHRASES)}
_SPLIT_KEYS = {"train": 0x7261696E, "heldout": 0x68656C64}  # separate SeedSequence entropy per split
_BACKGROUND_RE = re.compile(r"(?P<body>.*) on a (?P<bg>.+?) background")


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: ``shape`` in SHAPES, ``colour`` in COLOURS, ``size`` in SIZES, ``position`` 0..8 (an index
    into POSITIONS, row-major)."""

    shape: str
    colour: str
    size: str
    position: int

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r} (expected one of {_choices(SHAPES)})")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r} (expected one of {_choices(COLOURS)})")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r} (expected one of {_choices(SIZES)})")
        if isinstance(self.position, bool) or not isinstance(self.position, (int, np.integer)) \
                or not 0 <= self.position < GRID * GRID:
            raise ValueError(f"position {self.position!r} must be an int in 0..{GRID * GRID - 1} (row-major cell)")
        object.__setattr__(self, "position", int(self.position))


@dataclasses.dataclass(frozen=True)
class Scene:
    """1..MAX_OBJECTS objects in distinct cells on a background (a key of BACKGROUNDS). The objects are stored
    in row-major position order whatever order they are given in, so equal scenes compare equal."""

    objects: tuple[Obj, ...]
    background: str = DEFAULT_BACKGROUND

    def __post_init__(self):
        objs = tuple(self.objects)
        if not 1 <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(objs)}")
        if not all(isinstance(o, Obj) for o in objs):
            raise ValueError(f"scene objects must be Obj instances, got {[type(o).__name__ for o in objs]}")
        cells = [o.position for o in objs]
        if len(set(cells)) != len(cells):
            dup = next(c for c in cells if cells.count(c) > 1)
            raise ValueError(f"two objects in the same cell {dup} ({POSITIONS[dup]!r})")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r} (expected one of {_choices(BACKGROUNDS)})")
        object.__setattr__(self, "objects", tuple(sorted(objs, key=lambda o: o.position)))


# ================================================================================================ sampling
def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: 1-3 objects (uniform), distinct cells, uniform shape / colour / size each; the default
    background with probability P_DEFAULT_BACKGROUND, else a uniform other one. May be a held-out scene
    (:func:`is_heldout`); :func:`make_batch` filters by split."""
    k = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.permutation(GRID * GRID)[:k]
    attrs = rng.integers(0, [len(SHAPES), len(COLOURS), len(SIZES)], size=(k, 3))
    colours = list(COLOURS)
    objs = tuple(Obj(SHAPES[a[0]], colours[a[1]], SIZES[a[2]], int(c)) for a, c in zip(attrs, cells))
    if rng.random() < P_DEFAULT_BACKGROUND:
        background = DEFAULT_BACKGROUND
    else:
        others = [b for b in BACKGROUNDS if b != DEFAULT_BACKGROUND]
        background = others[int(rng.integers(len(others)))]
    return Scene(objs, background)


def is_heldout(scene: Scene) -> bool:
    """Whether the scene belongs to the held-out split: blake2b of its caption, mod 1000, < HELDOUT_PERMILLE.
    Stable across processes, platforms and numpy versions."""
    h = int.from_bytes(hashlib.blake2b(caption(scene).encode(), digest_size=8).digest(), "little")
    return h % 1000 < HELDOUT_PERMILLE


def _split_rng(seed: int, split: str) -> np.random.Generator:
    if split not in _SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r} (expected one of {_choices(SPLITS)})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed {seed!r} must be a non-negative int")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_KEYS[split]]))


def sample_scenes(seed: int, n: int, split: str = "train") -> list[Scene]:
    """The n scenes of ``make_batch(seed, n, split)`` without rendering them. A prefix of a longer draw:
    ``sample_scenes(s, n)[:m] == sample_scenes(s, m)``."""
    rng = _split_rng(seed, split)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n {n!r} must be a non-negative int")
    want = split == "heldout"
    scenes = []
    while len(scenes) < n:
        s = sample_scene(rng)
        if is_heldout(s) == want:
            scenes.append(s)
    return scenes


def make_batch(seed: int, n: int, split: str = "train") -> tuple[np.ndarray, list[str], list[Scene]]:
    """n deterministic samples of ``split`` ("train" or "heldout"; the two never share a caption):
    images uint8 [n, 64, 64, 3], captions, scenes. The same (seed, split) gives the same stream, so a smaller
    n gives a prefix of a larger one."""
    scenes = sample_scenes(seed, n, split)
    return render_batch(scenes), [caption(s) for s in scenes], scenes


# ================================================================================================ rendering
def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with half-extent r at offsets (u right, v down) from its centre."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":  # 0.8 r half-side: about the area of the circle, so size reads the same for all
        return (au <= 0.8 * r) & (av <= 0.8 * r)
    if shape == "triangle":  # apex up, base 2r wide at v = +r
        return (v >= -r) & (v <= r) & (au <= (v + r) / 2)
    if shape == "diamond":
        return au + av <= r
    if shape == "cross":  # a plus sign, arms r/3 half-wide
        return ((au <= r / 3) & (av <= r)) | ((av <= r / 3) & (au <= r))
    raise ValueError(f"unknown shape {shape!r} (expected one of {_choices(SHAPES)})")


def cell_centre(position: int) -> tuple[float, float]:
    """(x, y) of a cell's centre in pixel units (pixel i spans [i, i + 1))."""
    cell = IMAGE_SIZE / GRID
    return (position % GRID + 0.5) * cell, (position // GRID + 0.5) * cell


@functools.lru_cache(maxsize=1)
def shape_masks() -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of every (shape, size, position): float32
    [len(SHAPES), len(SIZES), 9, 64, 64], read-only."""
    s = SUPERSAMPLE
    coords = (np.arange(IMAGE_SIZE * s, dtype=np.float64) + 0.5) / s  # sample centres in output pixels
    out = np.zeros((len(SHAPES), len(SIZES), GRID * GRID, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for i, shape in enumerate(SHAPES):
        for j, size in enumerate(SIZES):
            for p in range(GRID * GRID):
                cx, cy = cell_centre(p)
                m = _inside(shape, coords[None, :] - cx, coords[:, None] - cy, SIZE_PX[size] / 2)
                out[i, j, p] = m.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(1, 3))
    out.flags.writeable = False
    return out


def _cell_span(i: int) -> tuple[int, int]:
    """Pixel rows (or columns) [lo, hi) that cover grid row (column) i: every object of that cell lies inside."""
    cell = IMAGE_SIZE / GRID
    return int(np.floor(i * cell)), int(np.ceil((i + 1) * cell))


def render_batch(scenes) -> np.ndarray:
    """uint8 [len(scenes), 64, 64, 3]: each scene's background with its objects alpha-blended by coverage.
    Objects never leave their cell, so each is blended into its cell's window only, all objects of a cell at once
    (fancy indexing over the batch): 10k scenes take well under a second."""
    masks = shape_masks().reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    colours = list(COLOURS)
    n = len(scenes)
    bg = np.zeros((n, 3), np.uint8)
    rows: list[list[tuple[int, int, int]]] = [[] for _ in range(GRID * GRID)]  # per cell: (image, mask, colour)
    for b, sc in enumerate(scenes):
        if not isinstance(sc, Scene):
            raise ValueError(f"scene {b} is a {type(sc).__name__}, not a Scene")
        bg[b] = BACKGROUNDS[sc.background]
        for o in sc.objects:
            m = (SHAPES.index(o.shape) * len(SIZES) + SIZES.index(o.size)) * GRID * GRID + o.position
            rows[o.position].append((b, m, colours.index(o.colour)))
    out = np.ascontiguousarray(np.broadcast_to(bg[:, None, None, :], (n, IMAGE_SIZE, IMAGE_SIZE, 3)))
    palette = np.array(list(COLOURS.values()), np.float32)
    for p, items in enumerate(rows):
        if not items:
            continue
        b, m, c = (np.array(x) for x in zip(*items))
        (y0, y1), (x0, x1) = _cell_span(p // GRID), _cell_span(p % GRID)
        a = masks[m, y0:y1, x0:x1, None]  # [k, h, w, 1]
        under = out[b, y0:y1, x0:x1].astype(np.float32)
        out[b, y0:y1, x0:x1] = np.rint(under + a * (palette[c][:, None, None, :] - under)).astype(np.uint8)
    return out


def render(scene: Scene) -> np.ndarray:
    """uint8 [64, 64, 3] picture of ``scene``."""
    return render_batch([scene])[0]


# ================================================================================================ captions
def _object_phrase(o: Obj) -> str:
    return f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}"


def caption(scene: Scene) -> str:
    """Templated English stating every attribute the picture shows (see the module docstring)."""
    if not isinstance(scene, Scene):
        raise ValueError(f"caption() takes a Scene, got {type(scene).__name__}")
    phrases = [_object_phrase(o) for o in scene.objects]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if scene.background != DEFAULT_BACKGROUND:
        text += f" on a {scene.background} background"
    return text


def _parse_object(phrase: str, text: str) -> Obj:
    words = phrase.split(" ")
    if len(words) < 5:
        raise ValueError(f"caption {text!r}: object phrase {phrase!r} is too short (expected 'a <size> <colour> "
                         f"<shape> <position phrase>')")
    article, size, colour, shape = words[:4]
    where = " ".join(words[4:])
    if article != "a":
        raise ValueError(f"caption {text!r}: bad word {article!r}: an object phrase starts with 'a'")
    if size not in SIZES:
        raise ValueError(f"caption {text!r}: unknown size {size!r} (expected one of {_choices(SIZES)})")
    if colour not in COLOURS:
        raise ValueError(f"caption {text!r}: unknown colour {colour!r} (expected one of {_choices(COLOURS)})")
    if shape not in SHAPES:
        raise ValueError(f"caption {text!r}: unknown shape {shape!r} (expected one of {_choices(SHAPES)})")
    if where not in _PHRASE_TO_POSITION:
        raise ValueError(f"caption {text!r}: unknown position {where!r} (expected one of "
                         f"{_choices(POSITION_PHRASES)})")
    return Obj(shape, colour, size, _PHRASE_TO_POSITION[where])


def parse_caption(text: str) -> Scene:
    """The Scene whose :func:`caption` is ``text`` (surrounding whitespace ignored). Raises ValueError naming
    the bad word or phrase for anything :func:`caption` cannot make (unknown words, repeated cells, more than
    MAX_OBJECTS objects, objects out of row-major order, the default background stated, other joining)."""
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a str, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise ValueError("empty caption")
    background = DEFAULT_BACKGROUND
    m = _BACKGROUND_RE.fullmatch(s)
    if m is not None:
        background, body = m["bg"], m["body"]
        if background not in BACKGROUNDS:
            raise ValueError(f"caption {text!r}: unknown background {background!r} (expected one of "
                             f"{_choices(b for b in BACKGROUNDS if b != DEFAULT_BACKGROUND)})")
        if background == DEFAULT_BACKGROUND:
            raise ValueError(f"caption {text!r}: background {background!r} is the default and is left unsaid")
    else:
        body = s
    head, sep, last = body.rpartition(" and ")
    phrases = (head.split(", ") + [last]) if sep else [body]
    objs = [_parse_object(p, text) for p in phrases]
    if len(objs) > MAX_OBJECTS:
        raise ValueError(f"caption {text!r}: {len(objs)} objects, at most {MAX_OBJECTS}")
    cells = [o.position for o in objs]
    for c in cells:
        if cells.count(c) > 1:
            raise ValueError(f"caption {text!r}: two objects {POSITION_PHRASES[c]!r}")
    late = next((i for i in range(1, len(cells)) if cells[i] < cells[i - 1]), None)
    if late is not None:
        raise ValueError(f"caption {text!r}: objects must be listed in row-major order (top left to bottom "
                         f"right), but {phrases[late]!r} comes after {phrases[late - 1]!r}")
    scene = Scene(tuple(objs), background)
    canon = caption(scene)
    if canon != s:  # e.g. "X, Y" without "and", or "X and Y and Z"
        raise ValueError(f"caption {text!r} is not in the world's form; expected {canon!r}")
    return scene


def is_world_caption(text) -> bool:
    """Whether :func:`parse_caption` accepts ``text``."""
    try:
        parse_caption(text)
    except ValueError:
        return False
    return True


__all__ = ["IMAGE_SIZE", "GRID", "SHAPES", "COLOURS", "BACKGROUNDS", "DEFAULT_BACKGROUND", "SIZES", "SIZE_PX",
           "POSITIONS", "POSITION_PHRASES", "SPLITS", "HELDOUT_PERMILLE", "Obj", "Scene", "sample_scene",
           "sample_scenes", "is_heldout", "make_batch", "render", "render_batch", "shape_masks", "cell_centre",
           "caption", "parse_caption", "is_world_caption"]
