"""Our LPIPS (:mod:`dfa2_jax.metrics.lpips`) against the ``lpips`` package itself, on the same weights.

Needs ``lpips`` and a torchvision that loads next to the installed torch (on a CUDA machine: the CUDA builds of
both). Nothing is downloaded: the package's model is built with its real v0.1 linear heads (shipped inside the
lpips wheel) and a randomly initialised torchvision backbone (``pnet_rand=True``; seeded), both are written as
the files our loader reads (torchvision's ``features.<i>.*`` state dict, the heads file), and the two forwards
compare on random image pairs in [-1, 1] and on the pipeline-style input of uint8 images.

    python3 scripts/check_lpips_package.py                # alex and vgg, 64x64 and 96x128 pairs
    python3 scripts/check_lpips_package.py --nets alex --pairs 8

Prints one row per (net, size): the largest |ours − lpips| over the pairs and the largest relative error; exits 1
when an error exceeds ``--tol`` (1e-5, float32).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import numpy as np


def write_weight_files(model, net: str, folder: str) -> tuple[str, str]:
    """The lpips package's model -> (backbone, heads) files in our metrics-folder layout under ``folder``."""
    import torch

    from dfa2_jax.metrics.lpips import lpips_files

    backbone_path, heads_path = lpips_files(folder, net)
    os.makedirs(os.path.dirname(heads_path), exist_ok=True)
    sd = model.state_dict()
    # lpips' towers hold torchvision's features[i] as net.slice<k>.<i>: the torchvision key is features.<i>; the
    # heads are lin<k>.* (the same modules again as lins.<k>.*: left out).
    backbone = {"features." + k.split(".", 3)[2] + "." + k.split(".", 3)[3]: v.detach().cpu()
                for k, v in sd.items() if k.startswith("net.slice")}
    heads = {k: v.detach().cpu() for k, v in sd.items() if re.match(r"lin\d+\.", k)}
    torch.save(backbone, backbone_path)
    torch.save(heads, heads_path)
    return backbone_path, heads_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default="alex,vgg")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--sizes", default="64x64,96x128", help="image sizes HxW")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import lpips
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure of the oracle is the one thing to report
        print(f"check_lpips_package: the lpips package does not import here ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    from dfa2_jax.metrics.lpips import load_lpips, lpips_distance, to_lpips_input

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    from importlib.metadata import version

    print(f"lpips {version('lpips')}, torch {torch.__version__} on {device}")
    rng = np.random.default_rng(args.seed)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            torch.manual_seed(args.seed)
            model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
            config, graphdef, state = load_lpips(*write_weight_files(model, net, tmp), net=net)
            model = model.to(device)
            for size in args.sizes.split(","):
                h, w = map(int, size.split("x"))
                x = rng.uniform(-1, 1, (args.pairs, 3, h, w)).astype(np.float32)
                y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
                u8 = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2 * args.pairs)]
                for kind, (a, b) in (("float", (x, y)),
                                     ("uint8", (to_lpips_input(u8[: args.pairs]), to_lpips_input(u8[args.pairs:])))):
                    with torch.no_grad():
                        ref = model(torch.from_numpy(a).to(device), torch.from_numpy(b).to(device))
                    ref = ref.reshape(-1).double().cpu().numpy()
                    ours = np.asarray(lpips_distance(graphdef, state, a, b), np.float64)
                    err = float(np.max(np.abs(ours - ref)))
                    rel = float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-12)))
                    worst = max(worst, err)
                    print(f"{net:5s} {h}x{w} {kind:5s} pairs {args.pairs}: lpips {ref.min():.5f}..{ref.max():.5f}  "
                          f"max |ours - lpips| {err:.2e}  max rel {rel:.2e}")
    ok = worst <= args.tol
    print(f"{'OK' if ok else 'FAILED'}: largest error {worst:.2e} (tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
