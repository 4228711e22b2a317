"""The Mosaic GPU arrow kernel's machine code without a GPU: what one key-block step executes, per mask kind.

    JAX_PLATFORMS=cpu python3 scripts/kernel_sass.py                         # FLUX 2048² and SD3 1024²
    JAX_PLATFORMS=cpu python3 scripts/kernel_sass.py --shapes FLUX-2048 --mgpu --out runs/sass

Compiles the kernel for an H100 through XLA's deviceless GPU compile
(:func:`dfa2_jax.benchmarking.deviceless_h100s`: the jax CUDA plugin of jax's exact version), the half-windows
traced so that every mask kind's loop is in the code, with jax's Mosaic GPU dump of the PTX (its
``MOSAIC_GPU_DUMP_PTX`` / ``MOSAIC_GPU_DUMP_TO``, set by this script); then assembles the PTX with ``ptxas``
(sm_90a) and disassembles it with ``nvdisasm``, both from the CUDA toolkit (on PATH, or under ``--cuda-bin``).
``--mgpu`` adds jax's Mosaic GPU FlashAttention-3 example (dense, float16) at the same shape.

Prints per kernel ptxas' register and spill report, then each innermost loop that issues wgmma (one key-block
step of the compute warpgroups: the kernel has one loop per mask kind, clean / tail / band / general as the call
needs them, in code order): its instructions, the counts that pace a step (HGMMA, MUFU.EX2, FFMA, FMUL, FADD,
FMNMX, F2FP conversions, uniform-datapath) and spill loads/stores. ``--out`` keeps the PTX and SASS.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
LABEL = re.compile(r"\s*(\.L_x_\d+):")
BRANCH_TARGET = re.compile(r"BRA.*`\((\.L_x_\d+)\)")
PACED = ("HGMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP")


def opcode(text: str) -> str:
    """An instruction's opcode with its modifiers, the predicate guard dropped (``@!P2 BRA`` -> ``BRA``)."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def step_loops(sass: str) -> list[dict]:
    """The innermost loops of ``nvdisasm -c`` output that issue wgmma, in code order: per loop its address range,
    instruction count and opcode counts. A loop is a backward branch's range [target, branch]; innermost: no other
    such range inside it."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = SASS_LINE.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2).strip()))
    ranges = set()
    for addr, text in instrs:
        m = BRANCH_TARGET.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] <= addr:
            ranges.add((labels[m.group(1)], addr))
    inner = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    loops = []
    for lo, hi in sorted(inner):
        ops = collections.Counter(opcode(t) for a, t in instrs if lo <= a <= hi)
        if not any(op.startswith("HGMMA") for op in ops):
            continue
        count = {k: sum(n for op, n in ops.items() if op.startswith(k)) for k in PACED}
        count["uniform"] = sum(n for op, n in ops.items() if op.startswith("U"))
        count["spill"] = sum(n for op, n in ops.items() if op.startswith(("STL", "LDL")))
        loops.append(dict(lo=lo, hi=hi, instructions=sum(ops.values()), **count))
    return loops


def tool(name: str, cuda_bin: str | None) -> str:
    path = os.path.join(cuda_bin, name) if cuda_bin else shutil.which(name)
    if not path or not os.path.isfile(path):
        sys.exit(f"kernel_sass: {name} not found {'in --cuda-bin ' + cuda_bin if cuda_bin else 'on PATH'} (the CUDA "
                 "toolkit's, e.g. from the nvidia-cuda-nvcc and nvidia-cuda-nvdisasm wheels); pass --cuda-bin DIR")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="FLUX-2048,SD3-1024", help="comma list of the kernel benchmark's shapes")
    p.add_argument("--mgpu", action="store_true", help="also jax's Mosaic GPU FA3 example (dense, float16)")
    p.add_argument("--cuda-bin", default=None, help="folder holding ptxas and nvdisasm (default: PATH)")
    p.add_argument("--out", default=None, help="folder for the PTX and SASS (default: a temporary one)")
    args = p.parse_args(argv)
    ptxas, nvdisasm = tool("ptxas", args.cuda_bin), tool("nvdisasm", args.cuda_bin)

    import jax
    import jax.numpy as jnp

    from dfa2_jax.benchmarking import ATTENTION_SHAPES, deviceless_h100s
    from pallas_kernels import mosaic_gpu

    known = {s.name: s for s in ATTENTION_SHAPES}
    names = args.shapes.split(",")
    for name in names:
        if name not in known:
            p.error(f"--shapes: unknown shape {name!r} (known: {', '.join(known)})")
    try:
        devices, target = deviceless_h100s(1)
    except RuntimeError as e:
        sys.exit(f"kernel_sass: {e}")
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    out_dir = args.out or tempfile.mkdtemp(prefix="kernel_sass_")
    os.makedirs(out_dir, exist_ok=True)

    def compile_kernel(tag, fn, *args_):
        dump = os.path.join(out_dir, tag)
        shutil.rmtree(dump, ignore_errors=True)
        os.makedirs(dump)
        os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"  # read by jax's Mosaic GPU compiler at each kernel's compile
        os.environ["MOSAIC_GPU_DUMP_TO"] = dump
        with target:
            jax.jit(fn).trace(*args_).lower(lowering_platforms=("cuda",)).compile()
        (ptx,) = [os.path.join(dump, f) for f in os.listdir(dump) if f.endswith(".ptx")]
        cubin = ptx[:-4] + ".cubin"
        report = subprocess.run([ptxas, "-arch=sm_90a", "-O3", "-v", ptx, "-o", cubin], capture_output=True,
                                text=True, check=True).stderr
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
        with open(ptx[:-4] + ".sass", "w") as f:
            f.write(sass)
        regs = re.search(r"Used (\d+) registers", report)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        print(f"\n{tag}: {regs.group(1) if regs else '?'} registers (ptxas' kernel-wide figure), spills "
              f"{spills.group(1) + ' B stored / ' + spills.group(2) + ' B loaded' if spills else 'none'}; "
              f"{sum(1 for line in sass.splitlines() if SASS_LINE.match(line))} instructions")
        print(f"  {'loop':>13} {'instrs':>6} " + " ".join(f"{k:>8}" for k in PACED + ("uniform", "spill")))
        for loop in step_loops(sass):
            print(f"  {loop['lo']:>6x}-{loop['hi']:<6x} {loop['instructions']:>6} "
                  + " ".join(f"{loop[k]:>8}" for k in PACED + ("uniform", "spill")))

    for name in names:
        shp = known[name]
        seq = shp.n_img + shp.text_len
        qkv = jax.ShapeDtypeStruct((1, seq, shp.heads, shp.head_dim), jnp.bfloat16, sharding=sharding)
        windows = jax.ShapeDtypeStruct((shp.heads,), jnp.int32, sharding=sharding)

        def ours(q, k, v, w, shp=shp):
            return mosaic_gpu.arrow_attention_mosaic_gpu(q, k, v, w, text_len=shp.text_len,
                                                         text_first=shp.text_first, cache=q)

        compile_kernel(f"{name}_arrow", ours, qkv, qkv, qkv, windows)
        if args.mgpu:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

            cfg = fa3.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
            pad = -(-seq // 128) * 128
            f16 = jax.ShapeDtypeStruct((1, pad, shp.heads, shp.head_dim), jnp.float16, sharding=sharding)
            compile_kernel(f"{name}_fa3_example", lambda q, k, v, cfg=cfg: fa3.attention(q, k, v, cfg), f16, f16, f16)
    print(f"\nPTX and SASS: {out_dir}")


if __name__ == "__main__":
    main()
