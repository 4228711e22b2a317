"""LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") in
Flax NNX, AlexNet and VGG16 towers, with weights read from the files a user has on disk (never downloaded).

The forward is the ``lpips`` package's ``LPIPS(net=net, version="0.1", lpips=True, spatial=False)`` in eval mode
(``lpips/lpips.py`` and ``lpips/pretrained_networks.py``, lpips 0.1.4):

1. ``x``, ``y``: RGB [B, 3, H, W] in [-1, 1]. ``ScalingLayer``: (x - shift) / scale with
   shift = [-.030, -.088, -.188], scale = [.458, .448, .450] per channel.
2. torchvision's ``features`` of the net, with the same layer indices (:data:`ALEX_FEATURES`,
   :data:`VGG16_FEATURES`), read at the LPIPS taps: alex relu1..relu5 (after ``features[1, 4, 7, 9, 11]``), vgg
   relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (after ``features[3, 8, 15, 22, 29]``). Layers after the last tap
   are never run.
3. Per tap: unit-normalise over channels, ``f / (sqrt(sum_c f²) + 1e-10)`` (``lpips.normalize_tensor``), and
   d = (f_x - f_y)².
4. ``lin{k}`` (``NetLinLayer``: Dropout, identity in eval, then a 1x1 conv C -> 1 without bias) on d, then the
   mean over H, W (``spatial_average``).
5. The sum over the taps: one distance per image pair, [B].

Our image arrays (uint8 HxWx3 or PIL images, as the pipelines return) become the [-1, 1] input by
``x / 127.5 - 1`` (``lpips.im2tensor``): :func:`to_lpips_input`. AlexNet needs images of at least 31x31 pixels,
VGG16 16x16 (every layer up to the last tap must keep one pixel).

Weights, read with the restricted torch-pickle reader (:func:`converters.torch_pickle.load_torch_file`: no torch,
no code from the file run) from ``<metrics_dir>/lpips/``::

    <metrics_dir>/lpips/alexnet-owt-7be5be79.pth   torchvision's AlexNet ImageNet checkpoint (net "alex")
    <metrics_dir>/lpips/vgg16-397923af.pth         torchvision's VGG16 ImageNet checkpoint (net "vgg")
    <metrics_dir>/lpips/v0.1/alex.pth              the lpips package's lpips/weights/v0.1/alex.pth
    <metrics_dir>/lpips/v0.1/vgg.pth               the lpips package's lpips/weights/v0.1/vgg.pth

The torchvision files are the ones ``torchvision.models.alexnet(weights="IMAGENET1K_V1")`` / ``vgg16(...)`` cache
in ``~/.cache/torch/hub/checkpoints/`` (plain state dicts ``features.<i>.weight`` / ``.bias``, ``classifier.*``);
the head files are plain state dicts ``lin<k>.model.1.weight`` [1, C, 1, 1]. Our leaves carry those names
(``features`` and ``lin<k>.model`` are ``nnx.List`` s indexed as the torch ``nn.Sequential`` s, ``None`` where
torch has a ReLU, pool or Dropout), so the key map is the identity. ``classifier.*`` in a backbone file is
ignored on purpose (LPIPS reads only ``features``); any other key that fills nothing, any leaf no key fills and
any shape mismatch is a :class:`CheckpointError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import common
from converters.safetensors_io import CheckpointError
from converters.torch_pickle import load_torch_file

LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor
LPIPS_SUBDIR = "lpips"
HEADS_VERSION = "v0.1"

# torchvision ``features``: ("conv", in, out, kernel, stride, padding) | ("relu",) | ("pool", kernel, stride).
_C, _R = "conv", ("relu",)
ALEX_FEATURES = (
    (_C, 3, 64, 11, 4, 2), _R, ("pool", 3, 2), (_C, 64, 192, 5, 1, 2), _R, ("pool", 3, 2),
    (_C, 192, 384, 3, 1, 1), _R, (_C, 384, 256, 3, 1, 1), _R, (_C, 256, 256, 3, 1, 1), _R, ("pool", 3, 2),
)


def _vgg(cfg) -> tuple:
    layers, c_in = [], 3
    for v in cfg:
        if v == "M":
            layers.append(("pool", 2, 2))
        else:
            layers += [(_C, c_in, v, 3, 1, 1), _R]
            c_in = v
    return tuple(layers)


VGG16_FEATURES = _vgg((64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"))


@dataclasses.dataclass(frozen=True, slots=True)
class LPIPSConfig:
    """One LPIPS net: torchvision's ``features`` layout, the tap indices (outputs of ``features[i]``), the file
    names of :func:`lpips_files`' layout. Presets :meth:`alex`, :meth:`vgg`; :meth:`for_net` by name."""

    net: str
    features: tuple
    taps: tuple[int, ...]
    backbone_file: str
    heads_file: str

    def __post_init__(self):
        for i in self.taps:
            if not (0 <= i < len(self.features)):
                raise ValueError(f"tap {i} is outside features[0:{len(self.features)}]")

    @classmethod
    def alex(cls) -> LPIPSConfig:
        return cls("alex", ALEX_FEATURES, (1, 4, 7, 9, 11), "alexnet-owt-7be5be79.pth", "alex.pth")

    @classmethod
    def vgg(cls) -> LPIPSConfig:
        return cls("vgg", VGG16_FEATURES, (3, 8, 15, 22, 29), "vgg16-397923af.pth", "vgg.pth")

    @classmethod
    def for_net(cls, net: str) -> LPIPSConfig:
        presets = {"alex": cls.alex, "vgg": cls.vgg}
        if net not in presets:
            raise ValueError(f"LPIPS net={net!r}: expected one of {sorted(presets)} (squeeze is not implemented)")
        return presets[net]()

    @property
    def tap_channels(self) -> tuple[int, ...]:
        """Channels at each tap (the lin heads' inputs): alex (64, 192, 384, 256, 256), vgg (64, 128, 256, 512,
        512)."""
        out = []
        for t in self.taps:
            out.append(next(layer[2] for layer in reversed(self.features[:t + 1]) if layer[0] == _C))
        return tuple(out)

    def out_size(self, n: int) -> int:
        """Spatial size at the last tap of an n-pixel side (<= 0: the image is too small)."""
        for layer in self.features[:self.taps[-1] + 1]:
            if layer[0] == _C:
                n = (n + 2 * layer[5] - layer[3]) // layer[4] + 1
            elif layer[0] == "pool":
                n = (n - layer[1]) // layer[2] + 1
            if n <= 0:
                return n
        return n

    @property
    def min_size(self) -> int:
        n = 1
        while self.out_size(n) < 1:
            n += 1
        return n


class Conv2d(nnx.Module):
    """torch ``nn.Conv2d(in, out, k, stride, padding, bias)`` on NHWC; ``kernel`` HWIO. f32 convolutions at
    HIGHEST precision (a metric, not a throughput path: no TF32 on GPU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        bound = 1.0 / np.sqrt(in_channels * kernel_size ** 2)
        self.stride, self.padding = stride, padding
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, kernel_size, in_channels,
                                                                   out_channels), dtype, -bound, bound))
        self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), dtype, -bound, bound))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H', W', Cout]
        kernel = self.kernel[...]
        p, s = self.padding, self.stride
        y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, window_strides=(s, s),
                                         padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return y if self.bias is None else y + self.bias[...]


def max_pool(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """torch ``nn.MaxPool2d(kernel, stride)`` (no padding, floor mode) on NHWC."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), "VALID")


class NetLinLayer(nnx.Module):
    """lpips ``NetLinLayer``: ``model`` = [Dropout (identity in eval; ``None`` here), Conv2d(C, 1, 1, bias=False)],
    so the leaf is ``model.1.kernel`` as the head file's ``lin<k>.model.1.weight``."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.model = nnx.List([None, Conv2d(channels, 1, 1, use_bias=False, dtype=dtype, rngs=rngs)])

    def __call__(self, d: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B]
        return jnp.mean(self.model[1](d)[..., 0], axis=(1, 2))  # spatial_average


class LPIPS(nnx.Module):
    """LPIPS v0.1 of ``config.net``: ``features`` (torchvision indices), ``lin0`` .. ``lin4``."""

    def __init__(self, config: LPIPSConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        last = config.taps[-1]
        self.features = nnx.List([
            Conv2d(layer[1], layer[2], layer[3], stride=layer[4], padding=layer[5], dtype=dtype, rngs=rngs)
            if layer[0] == _C and i <= last else None
            for i, layer in enumerate(config.features)])
        for k, c in enumerate(config.tap_channels):
            setattr(self, f"lin{k}", NetLinLayer(c, dtype=dtype, rngs=rngs))

    def taps(self, x: jax.Array) -> list[jax.Array]:
        """The backbone's tap activations of scaled NHWC input x: each [B, H_k, W_k, C_k]."""
        outs = []
        for i, layer in enumerate(self.config.features[:self.config.taps[-1] + 1]):
            if layer[0] == _C:
                x = self.features[i](x)
            elif layer[0] == "relu":
                x = jax.nn.relu(x)
            else:
                x = max_pool(x, layer[1], layer[2])
            if i in self.config.taps:
                outs.append(x)
        return outs

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x, y: [B, 3, H, W] RGB in [-1, 1] -> LPIPS distance [B] (float32)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS inputs must be two [B, 3, H, W] arrays of one shape; got {x.shape} and "
                             f"{y.shape}")
        if min(x.shape[2:]) < self.config.min_size:
            raise ValueError(f"LPIPS-{self.config.net} needs images of at least {self.config.min_size}x"
                             f"{self.config.min_size} pixels, got {x.shape[2]}x{x.shape[3]}")
        b = x.shape[0]
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)[:, None, None]
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)[:, None, None]
        z = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale  # [2B, 3, H, W]: one backbone pass
        total = jnp.zeros((b,), jnp.float32)
        for k, f in enumerate(self.taps(z.transpose(0, 2, 3, 1))):
            f = f.astype(jnp.float32)
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + NORM_EPS)
            d = jnp.square(f[:b] - f[b:])  # [B, H_k, W_k, C_k]
            total = total + getattr(self, f"lin{k}")(d)
        return total


# ============================================================================================ weights
def lpips_files(metrics_dir: str | os.PathLike, net: str = "alex") -> tuple[str, str]:
    """(backbone, heads) paths of ``net`` in the metrics folder layout of this module's docstring."""
    cfg = LPIPSConfig.for_net(net)
    root = os.path.join(os.fspath(metrics_dir), LPIPS_SUBDIR)
    return os.path.join(root, cfg.backbone_file), os.path.join(root, HEADS_VERSION, cfg.heads_file)


def _state_dict(path: str, what: str) -> dict[str, np.ndarray]:
    sd = load_torch_file(path)
    if not (isinstance(sd, dict) and sd and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                                for k, v in sd.items())):
        raise CheckpointError(f"{path}: expected a plain state dict (name -> tensor) of {what}, as torch.save("
                              f"model.state_dict()) writes; got {type(sd).__name__}"
                              + (f" with keys {list(sd)[:5]}" if isinstance(sd, dict) else ""))
    return sd


def load_lpips(backbone: str | os.PathLike, heads: str | os.PathLike, net: str = "alex", dtype="float32"
               ) -> tuple[LPIPSConfig, nnx.GraphDef, nnx.State]:
    """torchvision backbone checkpoint + lpips v0.1 head file of ``net`` -> (config, graphdef, state).

    ``classifier.*`` keys of the backbone are ignored; every other key must fill a leaf of the same shape, and
    every leaf must be filled (``features.*`` from ``backbone``, ``lin*`` from ``heads``), else
    :class:`CheckpointError` naming the key and file."""
    config = LPIPSConfig.for_net(net)
    backbone, heads = os.fspath(backbone), os.fspath(heads)
    bb = _state_dict(backbone, f"torchvision's {net} backbone ({config.backbone_file})")
    hd = _state_dict(heads, f"the lpips {HEADS_VERSION} {net} heads ({config.heads_file})")
    dt = common.parse_dtype(dtype)
    abstract = nnx.eval_shape(lambda: LPIPS(config, dtype=dt, rngs=nnx.Rngs(0)))
    expected = {common.leaf_key(p) for p, _ in nnx.to_flat_state(nnx.state(abstract))}
    for path, sd, prefix in ((backbone, bb, "features."), (heads, hd, "lin")):
        missing = sorted(k for k in expected if k.startswith(prefix) and k not in sd)
        if missing:
            raise CheckpointError(f"{path}: lacks {len(missing)} tensor(s) of the LPIPS {net} model, e.g. "
                                  f"{missing[:5]} (is it the {net} file?)")
    items = [(k, v, k, backbone) for k, v in bb.items() if not k.startswith("classifier.")]
    items += [(k, v, k, heads) for k, v in hd.items()]
    graphdef, state = common.fill_state(abstract, items, root=f"{backbone} + {heads}", what=f"LPIPS {net} model")
    return config, graphdef, state


# ============================================================================================ scoring
@functools.partial(jax.jit, static_argnums=(0,))
def _distance(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, y: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x, y)


def lpips_distance(graphdef: nnx.GraphDef, state: nnx.State, x, y) -> jax.Array:
    """LPIPS [B] of x, y [B, 3, H, W] in [-1, 1] with a loaded model; one compile per (graphdef, shape)."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"LPIPS inputs must be two [B, 3, H, W] arrays of one shape; got {x.shape} and {y.shape}")
    return _distance(graphdef, state, x, y)


def to_lpips_input(images: Sequence) -> np.ndarray:
    """uint8 RGB images (HxWx3 arrays or PIL images, one size) -> [B, 3, H, W] float32 in [-1, 1], x / 127.5 - 1
    (``lpips.im2tensor``)."""
    arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    if not arrays:
        raise ValueError("no images")
    for a in arrays:
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"expected uint8 HxWx3 RGB images; got shape {a.shape} dtype {a.dtype}")
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images of different sizes {sorted({a.shape for a in arrays})}")
    x = np.stack(arrays) / (255.0 / 2.0) - 1.0  # float64, then float32: as im2tensor's torch.Tensor(...)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def lpips_images(config: LPIPSConfig, graphdef: nnx.GraphDef, state: nnx.State, a: Sequence, b: Sequence
                 ) -> np.ndarray:
    """LPIPS of each pair (a[i], b[i]) of uint8 RGB images (arrays or PIL), one pair at a time (memory bounded;
    pairs may differ in size) -> float64 [N]. Raises ValueError naming the pair when an image is smaller than the
    net's minimum (:attr:`LPIPSConfig.min_size`)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} and {len(b)} images: LPIPS compares pairs")
    out = []
    for i, (u, v) in enumerate(zip(a, b)):
        x, y = to_lpips_input([u]), to_lpips_input([v])
        if x.shape != y.shape:
            raise ValueError(f"pair {i}: images of different sizes {x.shape[2:]} and {y.shape[2:]}")
        if min(x.shape[2:]) < config.min_size:
            raise ValueError(f"pair {i}: LPIPS-{config.net} needs images of at least {config.min_size}x"
                             f"{config.min_size} pixels, got {x.shape[2]}x{x.shape[3]}")
        out.append(float(lpips_distance(graphdef, state, x, y)[0]))
    return np.asarray(out, np.float64)


__all__ = ["ALEX_FEATURES", "LPIPS", "LPIPSConfig", "LPIPS_SCALE", "LPIPS_SHIFT", "VGG16_FEATURES", "load_lpips",
           "lpips_distance", "lpips_files", "lpips_images", "to_lpips_input"]
