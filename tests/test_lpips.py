"""LPIPS v0.1 (dfa2_jax.metrics.lpips) against a torch reference written here from the published layer
definitions (the ``lpips`` package cannot be imported next to CPU torch: it needs torchvision): torchvision's
AlexNet / VGG16 ``features`` as ``nn.Sequential`` with the same indices, lpips' ScalingLayer, normalize_tensor,
NetLinLayer (Dropout + 1x1 conv without bias), spatial_average and the sum over taps. Random backbones and heads
are saved with ``torch.save`` under the real file names and keys, and loaded back by our torch-free reader."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from converters.safetensors_io import CheckpointError
from converters.torch_pickle import save_torch_file
from dfa2_jax.metrics.lpips import (LPIPSConfig, load_lpips, lpips_distance, lpips_files, lpips_images,
                                    to_lpips_input)

torch = pytest.importorskip("torch")
nn = torch.nn


# ============================================================================================ torch reference
def tv_alexnet_features():
    """torchvision.models.AlexNet.features."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))


def tv_vgg16_features():
    """torchvision.models.vgg16().features (cfg "D", no batch norm)."""
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


# lpips/pretrained_networks.py: the slices' [start, end) ranges of features; their outputs are the taps
SLICES = {"alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
          "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class NetLinLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x):
        return self.model(x)


class TorchLPIPS(nn.Module):
    """lpips.LPIPS(net=net, version='0.1', lpips=True, spatial=False).eval() forward."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.features = tv_alexnet_features() if net == "alex" else tv_vgg16_features()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])
        self.lins = nn.ModuleList([NetLinLayer(c) for c in CHANNELS[net]])

    def forward(self, in0, in1):
        def taps(x):
            x = (x - self.shift) / self.scale
            outs = []
            for a, b in SLICES[self.net]:
                for i in range(a, b):
                    x = self.features[i](x)
                outs.append(x)
            return outs

        def normalize_tensor(f, eps=1e-10):
            return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

        val = 0
        for k, (f0, f1) in enumerate(zip(taps(in0), taps(in1))):
            d = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            val = val + self.lins[k](d).mean([2, 3], keepdim=True)
        return val  # [B, 1, 1, 1]


def write_lpips_files(root, net, seed, *, legacy=False):
    """A random TorchLPIPS and its weights under root as the module's layout: the torchvision checkpoint
    (``features.*`` + a stand-in ``classifier.*``) and the lpips head file (``lin<k>.model.1.weight``)."""
    torch.manual_seed(seed)
    ref = TorchLPIPS(net).eval()
    with torch.no_grad():
        for lin in ref.lins:  # released heads are non-negative; positive weights keep the distance informative
            lin.model[1].weight.abs_().mul_(20.0)  # distances of order 0.1-1, as the released heads give
    backbone, heads = lpips_files(root, net)
    os.makedirs(os.path.dirname(heads), exist_ok=True)
    bb = collections.OrderedDict(("features." + k, v) for k, v in ref.features.state_dict().items())
    bb["classifier.1.weight"] = torch.randn(10, 16)  # ignored by the converter: any shape
    bb["classifier.1.bias"] = torch.randn(10)
    hd = collections.OrderedDict((f"lin{k}.model.1.weight", lin.model[1].weight.detach().clone())
                                 for k, lin in enumerate(ref.lins))
    torch.save(bb, backbone, _use_new_zipfile_serialization=not legacy)
    torch.save(hd, heads)
    return ref, backbone, heads


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    # the alex backbone in torch's legacy (pre-1.6) format, as the 2017-2018 torchvision checkpoints were written
    return {net: write_lpips_files(root, net, seed, legacy=(net == "alex"))
            for seed, net in enumerate(("alex", "vgg"))}


# ============================================================================================ parity
@pytest.mark.parametrize("net,size", [("alex", 64), ("alex", 31), ("vgg", 32), ("vgg", 20)])
def test_lpips_matches_torch_reference(nets, net, size):
    ref, backbone, heads = nets[net]
    config, graphdef, state = load_lpips(backbone, heads, net=net)
    assert config == LPIPSConfig.for_net(net)
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, (3, 3, size, size + 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    y[2] = x[2]  # an identical pair
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(y))[:, 0, 0, 0].numpy()
    got = np.asarray(lpips_distance(graphdef, state, x, y))
    err = float(np.max(np.abs(got - want)))
    print(f"LPIPS-{net} {size}x{size + 3}: max |ours - torch| = {err:.2e} (values {want})")
    assert err <= 1e-5, (got, want)
    assert abs(got[2]) < 1e-9 and want[0] > 1e-3  # identical pair: 0 up to rounding of the batched convs


def test_lpips_images_uint8(nets):
    ref, backbone, heads = nets["alex"]
    config, graphdef, state = load_lpips(backbone, heads, net="alex")
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(2)]
    b = [np.clip(im.astype(int) + rng.integers(-40, 40, im.shape), 0, 255).astype(np.uint8) for im in a]
    from PIL import Image

    got = lpips_images(config, graphdef, state, [Image.fromarray(a[0]), a[1]], b)
    x, y = to_lpips_input(a), to_lpips_input(b)
    assert x.shape == (2, 3, 40, 48) and x.min() >= -1 and x.max() <= 1
    # lpips.im2tensor(image, factor=255 / 2, cent=1): torch.Tensor((image / factor - cent)[..., None]
    # .transpose((3, 2, 0, 1))), per image
    want_x = [torch.Tensor((im / (255. / 2.) - 1.)[:, :, :, np.newaxis].transpose((3, 2, 0, 1))) for im in a]
    assert np.array_equal(x, torch.cat(want_x).numpy())
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(y))[:, 0, 0, 0].numpy()
    assert got.dtype == np.float64 and np.max(np.abs(got - want)) <= 1e-5
    with pytest.raises(ValueError, match="at least 31x31"):
        lpips_images(config, graphdef, state, [a[0][:30]], [b[0][:30]])
    with pytest.raises(ValueError, match="LPIPS-alex needs images of at least 31x31 pixels, got 30x40"):
        lpips_distance(graphdef, state, np.zeros((1, 3, 30, 40), np.float32), np.zeros((1, 3, 30, 40), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_lpips_input([a[0].astype(np.float32)])


def test_min_sizes():
    assert LPIPSConfig.alex().min_size == 31 and LPIPSConfig.vgg().min_size == 16
    assert LPIPSConfig.alex().tap_channels == CHANNELS["alex"] and LPIPSConfig.vgg().tap_channels == CHANNELS["vgg"]
    with pytest.raises(ValueError, match="squeeze"):
        LPIPSConfig.for_net("squeeze")


# ============================================================================================ converter errors
def test_converter_errors_name_key_and_file(nets, tmp_path):
    from converters.torch_pickle import load_torch_file

    _, backbone, heads = nets["alex"]
    bb, hd = load_torch_file(backbone), load_torch_file(heads)

    extra = tmp_path / "extra.pth"
    save_torch_file({**bb, "features.13.weight": np.zeros((2,), np.float32)}, extra)
    with pytest.raises(CheckpointError, match=r"extra\.pth: tensor 'features\.13\.weight' has no place"):
        load_lpips(extra, heads, net="alex")

    lacking = tmp_path / "lacking.pth"
    save_torch_file({k: v for k, v in hd.items() if not k.startswith("lin3.")}, lacking)
    with pytest.raises(CheckpointError, match=r"lacking\.pth: lacks 1 tensor.*lin3\.model\.1\.weight"):
        load_lpips(backbone, lacking, net="alex")

    _, _, vgg_heads = nets["vgg"]  # vgg heads for the alex tower: the shapes differ
    with pytest.raises(CheckpointError, match=r"vgg\.pth: tensor 'lin1\.model\.1\.weight' has shape"):
        load_lpips(backbone, vgg_heads, net="alex")

    nested = tmp_path / "nested.pth"
    save_torch_file({"state_dict": {"a": np.zeros(1, np.float32)}}, nested)
    with pytest.raises(CheckpointError, match=r"nested\.pth: expected a plain state dict"):
        load_lpips(nested, heads, net="alex")
    with pytest.raises(ValueError, match="no such file"):
        load_lpips(tmp_path / "nope.pth", heads, net="alex")
