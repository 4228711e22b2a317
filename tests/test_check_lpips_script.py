"""scripts/check_lpips_package.py writes the lpips package's model as the files our LPIPS loader reads: checked on
a torch module laid out as ``lpips.LPIPS(net="alex")`` is (its towers ``net.slice<k>.<i>`` holding torchvision's
``features[i]``, the heads both as ``lin<k>`` and again as ``lins.<k>``). The package itself does not import next
to the CPU torch of the test extra; the script ran against it on a CUDA machine (README)."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "check_lpips_package.py"
ALEX_SLICES = ((0, 1), (2, 3, 4), (5, 6, 7), (8, 9), (10, 11))  # lpips.pretrained_networks.alexnet
ALEX_CONVS = {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3), 8: (384, 256, 3), 10: (256, 256, 3)}


class _Lin(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        for k, idx in enumerate(ALEX_SLICES, 1):
            s = nn.Sequential()
            for i in idx:
                s.add_module(str(i), nn.Conv2d(*ALEX_CONVS[i][:2], ALEX_CONVS[i][2]) if i in ALEX_CONVS else nn.ReLU())
            setattr(self, f"slice{k}", s)


class _FakeLPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _Tower()
        for k, c in enumerate((64, 192, 384, 256, 256)):
            setattr(self, f"lin{k}", _Lin(c))
        self.lins = nn.ModuleList([getattr(self, f"lin{k}") for k in range(5)])


def test_weight_files_load_into_our_lpips(tmp_path):
    spec = importlib.util.spec_from_file_location("check_lpips_package", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from flax import nnx

    from converters.common import leaf_key
    from dfa2_jax.metrics.lpips import load_lpips

    torch.manual_seed(0)
    model = _FakeLPIPS()
    backbone, heads = script.write_weight_files(model, "alex", str(tmp_path))
    _, _, state = load_lpips(backbone, heads, net="alex")
    ours = {leaf_key(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}  # torch key -> value
    sd = model.state_dict()
    for i in ALEX_CONVS:  # features.<i> came from net.slice<k>.<i>
        k = next(n for n, idx in enumerate(ALEX_SLICES, 1) if i in idx)
        np.testing.assert_array_equal(ours[f"features.{i}.bias"], sd[f"net.slice{k}.{i}.bias"].numpy())
    for k in range(5):  # the heads from lin<k> ([1, C, 1, 1]: the same numbers in any conv layout)
        np.testing.assert_array_equal(ours[f"lin{k}.model.1.weight"].reshape(-1),
                                      sd[f"lin{k}.model.1.weight"].numpy().reshape(-1))
