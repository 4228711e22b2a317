"""Compile the FLUX.1-dev sampler (``--model sd3``: SD3-medium with CFG) for an NVIDIA H100 on a machine without a
GPU: XLA's memory analysis, the cache-sized copies left in the compiled program and the compile time, dense vs the
benchmark's 68% plan (:func:`dfa2_jax.benchmarking.benchmark_plan`), on one GPU or sharded over several
(``--meshes``).

This is XLA's deviceless (ahead-of-time) GPU compile (:func:`dfa2_jax.benchmarking.deviceless_h100s`): a
topology built from a target description (``H100_TARGET``: the device facts XLA's GPU compiler reads) instead of an
attached GPU, through the jax CUDA plugin, which must be installed for jax's exact version (Python ≥ 3.12 for jax ≥
0.11, e.g. ``pip install jax-cuda13-plugin==$JAX_VERSION jax-cuda13-pjrt==$JAX_VERSION``); run with
JAX_PLATFORMS=cpu.
The plan's layers compile the real Pallas kernel (``--backend mosaic|triton``: ``attention_impl="mosaic_gpu"`` /
``"triton"``, passed explicitly since "auto" resolves to the jnp reference on a host without a GPU; ptxas runs
here too). cuDNN's attention (the dense layers) needs a GPU to build its graph, so it is replaced by an opaque
custom call of the same signature that returns a new buffer, as cuDNN's does (``stand-in``, a do-nothing FFI
handler registered through ctypes); its workspace is not counted. The figures are the compiled program's, before
any run: use ``scripts/bench_memory.py`` on a GPU for the device peak.

    JAX_PLATFORMS=cpu python3 scripts/aot_memory.py --res 2048 --steps 28
    JAX_PLATFORMS=cpu python3 scripts/aot_memory.py --variants step --res 1024   # one step's kernels and traffic
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python3 scripts/aot_memory.py --smoke --meshes "none;heads=2"     # no CUDA plugin needed

``--smoke`` compiles the tiny benchmark model at 128², 3 steps, for the host CPU instead of an H100 (the same
stand-in, registered for the CPU; the plan's heads as ``--smoke-impl``, default the Triton kernel in interpret
mode): every step but the CUDA topology, for a check of the script without the plugin.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import math
import os
import re
import sys
import time

STAND_IN = "dfa2_attention_stand_in"
HLO_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
_handlers = []  # the ctypes callbacks must outlive the registration


def register_stand_in(platform: str = "CUDA") -> None:
    """A do-nothing XLA FFI handler for ``platform``, registered as ``STAND_IN``. Compilation only: XLA
    queries the handler's API version at registration (the metadata extension of the call frame), which it
    answers; it is never executed."""
    import jax

    def handler(frame: int) -> None:
        ext = ctypes.c_void_p.from_address(frame + 8).value  # XLA_FFI_CallFrame.extension_start
        while ext:
            if ctypes.c_int.from_address(ext + 8).value == 1:  # XLA_FFI_Extension_Metadata
                meta = ctypes.c_void_p.from_address(ext + 24).value  # -> XLA_FFI_Metadata
                ctypes.c_int.from_address(meta + 24).value = 0  # api_version.major_version
                ctypes.c_int.from_address(meta + 28).value = 1  # api_version.minor_version
            ext = ctypes.c_void_p.from_address(ext + 16).value
        return None

    cfunc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(handler)
    _handlers.append(cfunc)
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    jax.ffi.register_ffi_target(STAND_IN, new_capsule(ctypes.cast(cfunc, ctypes.c_void_p), None, None),
                                platform=platform)


BACKENDS = {"mosaic": "mosaic_gpu", "mosaic_gpu": "mosaic_gpu", "triton": "triton"}  # --backend -> attention_impl
HLO_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1, "s32": 4, "u32": 4, "s64": 8,
             "u64": 8}


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (an HLO result type, a tuple's included)."""
    total = 0
    for dtype, dims in re.findall(r"\b(\w+)\[([\d,]*)\]", text):
        if dtype in HLO_BYTES:
            total += math.prod(int(d) for d in dims.split(",") if d) * HLO_BYTES[dtype]
    return total


def scan_body(hlo: str) -> str:
    """The text of the largest while-loop body of a compiled module (a sampler's ``lax.scan`` step)."""
    comps = {m.group(1): m.group(2) for m in re.finditer(r"\n(?:ENTRY )?%?([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}\n",
                                                         hlo, re.S)}
    bodies = [b for b in re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo) if b in comps]
    if not bodies:
        raise ValueError("no while loop in the compiled module")
    return "\n" + comps[max(bodies, key=lambda b: len(comps[b]))]


def kernel_traffic(hlo: str, *, body: bool = False) -> tuple[int, int, list[tuple[str, int, int]]]:
    """The entry computation's kernels (fusions, custom calls, copies) of a compiled module's text, or with
    ``body`` those of its scan step (:func:`scan_body`): (count, bytes, [(family, bytes, count)] largest first),
    each kernel's bytes being its operands' plus its result's sizes — the traffic through memory if every operand
    is read whole once (a fusion that slices an operand reads less)."""
    from dfa2_jax.benchmarking import kernel_family

    if body:
        entry = scan_body(hlo)
    else:
        entry = hlo[hlo.index("\nENTRY"):]
        entry = entry[:entry.index("\n}\n")]
    sizes: dict[str, int] = {}
    families: dict[str, list[int]] = {}
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(?:,|$)", line)
        if not m:
            continue
        name, result, op, operands = m.groups()
        sizes[name] = _shape_bytes(result)
        if op in ("fusion", "custom-call", "copy"):
            moved = sizes[name] + sum(sizes.get(a.strip()[1:], 0) for a in operands.split(",")
                                      if a.strip().startswith("%"))
            fam = families.setdefault(kernel_family(name), [0, 0])
            fam[0] += moved
            fam[1] += 1
    ranked = sorted(((f, b, n) for f, (b, n) in families.items()), key=lambda t: -t[1])
    return sum(n for _, _, n in ranked), sum(b for _, b, _ in ranked), ranked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux", choices=("flux", "sd3"),
                    help="FLUX.1-dev (batch 1) or SD3-medium (batch 1, classifier-free guidance: model batch 2)")
    ap.add_argument("--res", type=int, default=None, help="default 2048 (FLUX) / 1024 (SD3); --smoke: 128")
    ap.add_argument("--steps", type=int, default=None, help="default 28; --smoke: 3")
    ap.add_argument("--layers", default=None, help="FLUX: double,single blocks (default 19,38); SD3: blocks (24)")
    ap.add_argument("--backend", default="mosaic", choices=sorted(BACKENDS),
                    help="the plan's arrow kernel (attention_impl mosaic_gpu or triton)")
    ap.add_argument("--variants", default="dense,plan",
                    help="comma list of dense, plan (the sampler) and step (one dense transformer evaluation, batch "
                         "1, no mesh: its kernels' memory traffic is printed)")
    ap.add_argument("--meshes", default="none",
                    help="';'-separated meshes to compile on (dfa2 --mesh syntax, e.g. 'none;heads=4;seq=4'): the "
                         "sharded sampler (dfa2_jax.parallel.sharded.shard_denoise) on that many H100s of one host; "
                         "figures are per device")
    ap.add_argument("--dump", default=None, help="folder for each compiled module's HLO text")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny model compiled for the host CPU (no CUDA plugin): a check of the script")
    ap.add_argument("--smoke-impl", default="interpret", choices=("interpret", "xla"),
                    help="--smoke: how the plan's heads compile on the CPU")
    args = ap.parse_args()
    args.steps = args.steps or (3 if args.smoke else 28)
    if unknown := set(args.variants.split(",")) - {"dense", "plan", "step"}:
        sys.exit(f"aot_memory --variants: unknown {', '.join(sorted(unknown))} (known: dense, plan, step)")
    attention_impl = args.smoke_impl if args.smoke else BACKENDS[args.backend]
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from converters.transformer import abstract_model
    from dfa2_jax import runtime
    from dfa2_jax.benchmarking import (benchmark_plan, deviceless_h100s, flux_ids, image_tokens, model_config,
                                       schedule, text_tokens, tree_bytes)
    from dfa2_jax.models import attention
    from dfa2_jax.parallel.mesh import per_device
    from dfa2_jax.parallel.sharded import make_mesh, parse_mesh, sharded_sampler_inputs
    from dfa2_jax.sample import plan_inputs, scan_sampler, split_plan_inputs
    from dfa2_jax.transformer import flux_forward, flux_rope, sd3_forward

    n_gpus = max(math.prod(parse_mesh(m).values()) if m != "none" else 1 for m in args.meshes.split(";"))
    if args.smoke:
        devices, platform = jax.devices()[:n_gpus], "cpu"
        if len(devices) < n_gpus:
            sys.exit(f"aot_memory --smoke: the meshes need {n_gpus} devices; run with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n_gpus}")
        device_kind = f"the host CPU ({devices[0].device_kind})"
        target_mesh = contextlib.nullcontext()
    else:
        try:
            devices, target_mesh = deviceless_h100s(n_gpus)
        except RuntimeError as e:
            sys.exit(f"aot_memory: {e} (or --smoke: the tiny model compiled for the host CPU)")
        platform, device_kind = "cuda", devices[0].device_kind
    register_stand_in("cpu" if args.smoke else "CUDA")

    def cudnn_stand_in(q, k, v, implementation=None):  # per device under a mesh, as dense_attention's cuDNN call
        def local(q, k, v):
            return jax.ffi.ffi_call(STAND_IN, jax.ShapeDtypeStruct(q.shape, q.dtype))(q, k, v)

        return per_device(local, (q, k, v))

    # Both modules call dense_attention through their own global name: the models' joint attention and the plan
    # runtime's full heads.
    attention.dense_attention = runtime.dense_attention = cudnn_stand_in
    sharding = jax.sharding.SingleDeviceSharding(devices[0])

    def on_gpu(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)

    family = args.model
    cfg = model_config(family, tiny=args.smoke)
    if family == "flux":
        if args.layers:
            n_double, n_single = (int(x) for x in args.layers.split(","))
            cfg = dataclasses.replace(cfg, num_layers=n_double, num_single_layers=n_single)
        batch, res, do_cfg = 1, args.res or (128 if args.smoke else 2048), False
        blocks = f"{cfg.num_layers}+{cfg.num_single_layers} blocks"
    else:
        if args.layers:
            cfg = dataclasses.replace(cfg, num_layers=int(args.layers))
        batch, res, do_cfg = 2, args.res or (128 if args.smoke else 1024), True  # [uncond, cond]
        blocks = f"{cfg.num_layers} blocks, CFG"
    text = text_tokens(family, tiny=args.smoke)
    dtype = jnp.bfloat16
    graphdef, params = nnx.split(abstract_model(cfg, dtype))
    h = w = res // 8
    n_img = image_tokens(res)
    ts, sig = schedule(family, args.steps, n_img)
    plan, kept = benchmark_plan(cfg, text_len=text, steps=args.steps, n_img=n_img, tiny=args.smoke)
    cond = {"prompt_embeds": jax.ShapeDtypeStruct((batch, text, cfg.joint_attention_dim), dtype),
            "pooled_projections": jax.ShapeDtypeStruct((batch, cfg.pooled_projection_dim), dtype)}
    if family == "flux":
        cond.update(rope=flux_rope(cfg, *flux_ids(res, text)),
                    guidance=jax.ShapeDtypeStruct((1,), jnp.float32))
        latents = jax.ShapeDtypeStruct((1, n_img, cfg.in_channels), dtype)
    else:
        cond["guidance_scale"] = jax.ShapeDtypeStruct((), jnp.float32)
        latents = jax.ShapeDtypeStruct((1, cfg.in_channels, h, w), dtype)
    mib = 2.0 ** 20
    rows = []

    def compile_traced(trace, mesh=None):
        t0 = time.perf_counter()
        with jax.set_mesh(mesh) if mesh is not None else target_mesh:  # a mesh knows its devices' kind
            traced = trace()
            t1 = time.perf_counter()
            lowered = traced.lower(lowering_platforms=(platform,))
        t2 = time.perf_counter()
        compiled = lowered.compile()
        return compiled, (t1 - t0, t2 - t1, time.perf_counter() - t2)

    def sharded(mesh_spec, p):
        """shard_denoise's placement on a mesh of the target's devices (device_put making abstract placed
        values), then the sampler compiled instead of run."""
        mesh = make_mesh(mesh_spec, devices=devices[:math.prod(parse_mesh(mesh_spec).values())])

        def abstract_put(x, device=None, *a, **k):
            return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=device), x)

        real_put, jax.device_put = jax.device_put, abstract_put
        try:
            rng = np.random.default_rng(0)
            concrete = {k: (v if not isinstance(v, jax.ShapeDtypeStruct) else
                            jnp.asarray(rng.standard_normal(v.shape), v.dtype)) for k, v in cond.items()}
            sargs, skw = sharded_sampler_inputs(
                mesh, graphdef, params, jnp.zeros(latents.shape, dtype), concrete, ts, sig, family=family,
                do_cfg=do_cfg, plan=p, num_heads=cfg.num_attention_heads, attention_impl=attention_impl)
        finally:
            jax.device_put = real_put
        graph, state, lat, cnd, t, sg, plan_in = sargs
        arrays, attn = split_plan_inputs(plan_in)
        caches = tree_bytes(attn) // mesh.size
        compiled, times = compile_traced(lambda: scan_sampler.trace(graph, state, lat, cnd, t, sg, arrays, attn,
                                                                    **skw), mesh)
        return caches, compiled, times

    def dense_step():
        """One dense evaluation of the transformer, batch 1, as the one-step benchmark times it."""
        emb = on_gpu(jax.ShapeDtypeStruct((1, text, cfg.joint_attention_dim), dtype))
        pooled = on_gpu(jax.ShapeDtypeStruct((1, cfg.pooled_projection_dim), dtype))
        t = on_gpu(jax.ShapeDtypeStruct((1,), jnp.float32))  # the timestep; FLUX.1-dev's guidance has its shape
        if family == "flux":
            x = on_gpu(jax.ShapeDtypeStruct((1, n_img, cfg.in_channels), dtype))
            return compile_traced(lambda: flux_forward.trace(graphdef, on_gpu(params), x, emb, pooled, t,
                                                             on_gpu(cond["rope"]), t))
        x = on_gpu(jax.ShapeDtypeStruct((1, cfg.in_channels, h, w), dtype))
        return compile_traced(lambda: sd3_forward.trace(graphdef, on_gpu(params), x, emb, pooled, t))

    plans = {"dense": None, "plan": plan}
    traffic = []
    steps_traffic = []  # (variant, kernel_traffic of the sampler's scan step) on one GPU
    for mesh_spec in args.meshes.split(";"):
        for name in args.variants.split(","):
            if name == "step":
                if mesh_spec != "none":
                    continue
                caches = 0
                compiled, times = dense_step()
                traffic.append(kernel_traffic(compiled.as_text()))
            elif mesh_spec == "none":
                p = plans[name]
                spec, plan_in = plan_inputs(graphdef, params, latents, cond, ts, p, family=family, do_cfg=do_cfg,
                                            attention_impl=attention_impl)
                arrays, state = on_gpu(split_plan_inputs(plan_in))
                caches = tree_bytes(state)
                compiled, times = compile_traced(lambda: scan_sampler.trace(
                    graphdef, on_gpu(params), on_gpu(latents), on_gpu(cond), on_gpu(ts), on_gpu(sig), arrays, state,
                    family=family, do_cfg=do_cfg, report=False, spec=spec))
            else:
                caches, compiled, times = sharded(mesh_spec, plans[name])
            m = compiled.memory_analysis()
            hlo = compiled.as_text()
            head = (rf"{HLO_DTYPES[jnp.dtype(dtype).name]}\[\d+,\d+,\d+,{cfg.attention_head_dim}\]"  # [B, S(pad), H, D]
                    r"\{[0-9,]*\} copy\(")
            copies = len(re.findall(head, hlo))
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, f"{mesh_spec}-{name}.hlo.txt"), "w") as f:
                    f.write(hlo)
            rows.append((mesh_spec, name, caches, m, copies, *times))
            if mesh_spec == "none" and name != "step":
                steps_traffic.append((name, kernel_traffic(hlo, body=True)))
            print(f"{mesh_spec} {name}: compiled in {sum(times):.1f} s", flush=True)

    shape = ("FLUX.1-dev" if family == "flux" else "SD3-medium") + ("-tiny" if args.smoke else "")
    print(f"\n{shape}-shaped, {blocks}, {res}², {args.steps} steps, bf16; deviceless compile for {device_kind}; "
          f"jax {jax.__version__}; plan keeps {kept:.3f} of attention (kernel: {attention_impl}); MiB")
    print(f"{'mesh':<9} {'variant':<7} {'caches':>7} {'args':>7} {'output':>7} {'alias':>7} {'temp':>7} "
          f"{'cache copies':>12} {'trace s':>7} {'lower s':>7} {'compile s':>9}")
    for mesh_spec, name, caches, m, copies, tr, lo, co in rows:
        print(f"{mesh_spec:<9} {name:<7} {caches / mib:7.0f} {m.argument_size_in_bytes / mib:7.0f} "
              f"{m.output_size_in_bytes / mib:7.0f} {m.alias_size_in_bytes / mib:7.0f} "
              f"{m.temp_size_in_bytes / mib:7.0f} "
              f"{copies:12d} {tr:7.1f} {lo:7.1f} {co:9.1f}")
    for n_kernels, moved, families in traffic:
        print(f"\none dense step, batch 1: {n_kernels} kernels moving {moved / 1e9:.2f} GB (each kernel's operands "
              "and result read or written once); largest kernel families:")
        for fam, b, n in families[:10]:
            print(f"  {fam:<28} {b / 1e9:8.2f} GB  x{n}")
    for name, (n_kernels, moved, families) in steps_traffic:
        print(f"\n{name} sampler, one step of its scan (one GPU): {n_kernels} kernels moving {moved / 1e9:.2f} GB; "
              "largest kernel families:")
        for fam, b, n in families[:10]:
            print(f"  {fam:<28} {b / 1e9:8.2f} GB  x{n}")


if __name__ == "__main__":
    main()
