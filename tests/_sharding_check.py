"""Each parallel mode of dfa2_jax.parallel.sharded.shard_denoise equals the single-device sampler (arrow + cache plan).

Run in a subprocess with 4 forced host devices (tests/test_sharding.py);
prints ``OK <mode> <max rel err>`` per mode, exits non-zero on the first mismatch.
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling a sampler per mode is most of the time: LLVM's optimisation passes are skipped (the HLO passes, the SPMD
# partitioning and its collectives are the same; only the host code is slower, on these tiny shapes negligibly).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from dfa2_jax.plan import methods as M  # noqa: E402
from dfa2_jax.sample import PlanArrays, denoise  # noqa: E402
from dfa2_jax.parallel.sharded import make_mesh, shard_denoise  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: tests.*
from tests.tiny_setups import flux_setup, sd3_setup  # noqa: E402

STEPS = 4
BATCH = 4
TOL = 1e-5


def _sd3():
    tr, cond, latents, t, s, kw, (n_img, _) = sd3_setup(batch=BATCH, steps=STEPS)
    return tr, cond, latents, t, s, kw, n_img


def _flux():
    tr, cond, latents, t, s, kw, (n_img, _) = flux_setup(batch=BATCH, steps=STEPS, heads=4)
    return tr, cond, latents, t, s, kw, n_img


def _flux_true_cfg():
    """FLUX with true CFG: a negative prompt's conditioning stacked before the prompt's ([neg; pos] on the batch)."""
    tr, cond, latents, t, s, kw, n_img = _flux()
    neg = {k: cond[k][::-1] * 0.5 for k in ("prompt_embeds", "pooled_projections")}
    cond = {**cond, **{k: jnp.concatenate([neg[k], cond[k]]) for k in neg},
            "guidance": jnp.concatenate([cond["guidance"], cond["guidance"]]), "true_cfg_scale": jnp.asarray(4.0)}
    return tr, cond, latents, t, s, {**kw, "do_cfg": True}, n_img


def _plan(tr, n_img, seed):
    """Random full / arrow / cache per step and head (step 0 full), plus one layer all-cache at step 2."""
    rng = np.random.default_rng(seed)
    layers, heads = len(tr.attention_layer_names()), tr.config.num_attention_heads
    codes = rng.choice([M.FULL, M.ARROW, M.CACHE], size=(STEPS, layers, heads)).astype(np.int32)
    codes[0] = M.FULL
    codes[2, 1] = M.CACHE
    ks = rng.choice([2, 4], size=(layers, heads))
    hw = np.full(codes.shape, -1, np.int32)
    for idx in np.ndindex(codes.shape):
        if codes[idx] == M.ARROW:
            hw[idx] = M.Method(M.ARROW, int(ks[idx[1:]])).half_window(n_img)
    assert (codes == M.ARROW).any() and (codes == M.CACHE).any()
    return PlanArrays(codes, hw, np.full((layers, heads), -1, np.int32))


MODES = {
    "flux": [("data=4", False), ("heads=4", False), ("heads=2", False), ("data=2,heads=2", False),
             ("data=4", True), ("data=2,heads=2", True), ("seq=4", False), ("data=2,seq=2", False),
             ("data=2,seq=2", True)],
    "flux_cfg": [("cfg=2,data=2", False), ("cfg=2,heads=2", False)],
    "sd3": [("data=4", False), ("heads=4", False), ("cfg=2,data=2", False), ("cfg=2,heads=2", False),
            ("data=2,heads=2", True), ("seq=4", False), ("cfg=2,seq=2", False)],
}


def calibration_check() -> int:
    """calibrate(mesh=...) gives the single-device plan (tiny pipelines, 4 prompts)."""
    import tempfile

    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.tiny import tiny_pipelines
    from dfa2_jax.parallel.sharded import resolve_mesh

    assert resolve_mesh("auto", batch=4, heads=4, family="flux", do_cfg=False).shape == {"data": 4}
    assert resolve_mesh("auto", batch=3, heads=4, family="flux", do_cfg=False) is None
    prompts = ["a red circle", "a blue square at the top", "two green triangles", "a white cross"]
    with tempfile.TemporaryDirectory() as d:
        pipes = tiny_pipelines(d, seed=0)
        for name, meshes in (("flux", ["data=4", "heads=2", "data=2,heads=2", "seq=2"]),
                             ("sd3", ["cfg=2,data=2", "heads=2", "seq=2"])):
            kw = dict(resolution=32, steps=3, delta=0.5, candidates="arrow:2,arrow:4,cache", progress=False,
                      max_sequence_length=8)
            ref = calibrate(pipes[name], prompts, **kw)
            assert (ref.plan.assignment[1:] != 0).any(), "the check needs a plan with compressed heads"
            for spec in meshes:
                res = calibrate(pipes[name], prompts, mesh=spec, **kw)
                if not np.array_equal(res.plan.assignment, ref.plan.assignment):
                    print(f"FAIL calibrate {name} {spec}: plan differs", flush=True)
                    return 1
                print(f"OK calibrate {name} {spec}: same plan "
                      f"({int((ref.plan.assignment[1:] != 0).sum())} compressed head-steps)", flush=True)
    return 0


KERNEL_MODES = {"flux": [("heads=4", False), ("data=2,heads=2", False), ("seq=4", False)]}  # Pallas (interpret)


def per_device_check() -> None:
    """Attention under a context mesh sees each device's own batch rows and heads (no gathered operands)."""
    from dfa2_jax.parallel.mesh import per_device, per_device_tables

    q = jnp.arange(4 * 3 * 8 * 2, dtype=jnp.float32).reshape(4, 3, 8, 2)
    hw = jnp.arange(8, dtype=jnp.int32)
    seen = []

    def fn(q, k, hw):
        seen.append((q.shape, hw.shape))
        return q + k + hw[None, None, :, None]

    for spec, local in (("data=2,heads=2", ((2, 3, 4, 2), (4,))), ("heads=4", ((4, 3, 2, 2), (2,))),
                        ("data=4", ((1, 3, 8, 2), (8,))), ("seq=4", ((4, 3, 2, 2), (2,)))):
        seen.clear()
        mesh = make_mesh(spec)
        with jax.set_mesh(mesh):
            out = jax.jit(lambda q, hw: per_device(fn, (q, q), (hw,)))(q, hw)
        assert seen == [local], (spec, seen)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(2 * q + hw[None, None, :, None]))
        print(f"OK per_device {spec} local {'x'.join(map(str, local[0]))}", flush=True)
    assert per_device(fn, (q, q), (hw,)).shape == q.shape and seen[-1][0] == q.shape  # no mesh: called as is

    # per-device tables (the kernel's launch schedules): made once per device for its own shape and heads, each
    # device's row reaching that device's call
    hw2 = jnp.stack([hw, hw + 1])  # [L=2, H]

    def table(shape, hw):
        return hw * 100 + shape[0] * 10 + shape[2]  # [L, local H]

    def with_row(q, k, hw, row):
        return q + k + row[None, None, :, None]

    for spec, (lb, lh) in (("data=2,heads=2", (2, 4)), ("heads=4", (4, 2)), ("data=4", (1, 8)), ("seq=4", (4, 2)),
                           (None, (4, 8))):
        with jax.set_mesh(make_mesh(spec)) if spec else contextlib.nullcontext():
            out = jax.jit(lambda q, hw, hw2: per_device(with_row, (q, q), (hw,),
                                                        (per_device_tables(table, q.shape, (hw2,))[:, 1],)))(q, hw, hw2)
        want = 2 * q + ((hw + 1) * 100 + lb * 10 + lh)[None, None, :, None]
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
        print(f"OK per_device_tables {spec or 'none'} local {lb}x{lh}", flush=True)


def collectives_check(setup) -> None:
    """The layouts the modes promise, read off the compiled FLUX step (``setup``: :func:`_flux`'s): seq (Ulysses)
    moves q/k/v and the attention outputs with all-to-alls and needs no all-reduce; heads (Megatron) sums the
    row-split projections with all-reduces and needs no all-to-all; data needs neither."""
    from flax import nnx

    from dfa2_jax.sample import velocity
    from dfa2_jax.parallel.sharded import place_inputs

    tr, cond, latents, t, s, kw, n_img = setup
    layers = len(tr.attention_layer_names())
    for spec in ("seq=4", "heads=4", "data=4"):
        mesh = make_mesh(spec)
        placed = place_inputs(mesh, tr.state, latents, cond, family="flux", do_cfg=False, fsdp=False, num_heads=4)

        def step(state, x, cond):
            return velocity(nnx.merge(tr.graphdef, state), x, jnp.asarray(t[0]), cond, family="flux", do_cfg=False)

        with jax.set_mesh(mesh):
            hlo = jax.jit(step).lower(placed.state, placed.latents, placed.cond).compile().as_text()
        a2a, ar, ag = hlo.count("all-to-all("), hlo.count("all-reduce("), hlo.count("all-gather(")
        if spec == "seq=4":  # q, k, v and the outputs by all-to-all; no token gathered
            assert a2a >= 4 * layers and ar == 0 and ag == 0, (spec, a2a, ar, ag)
        elif spec == "heads=4":
            assert ar >= layers and a2a == 0, (spec, a2a, ar)
        else:
            assert a2a == 0 and ar == 0, (spec, a2a, ar)
        print(f"OK collectives {spec} counts all-to-all={a2a},all-reduce={ar},all-gather={ag}", flush=True)


def main() -> int:
    """``_sharding_check.py [part]``: part ``calibrate``, ``flux`` (per-device attention, the collectives and the
    sampler's FLUX modes) or ``sd3`` (the sampler's SD3 modes); none runs flux and sd3."""
    assert jax.device_count() == 4, jax.devices()
    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    if part == "calibrate":
        return calibration_check()
    flux = _flux() if part in ("flux", "all") else None
    if flux is not None:
        per_device_check()
        collectives_check(flux)
    for name, setup in (("flux", lambda: flux), ("flux_cfg", _flux_true_cfg), ("sd3", _sd3)):
        if part not in (name.split("_")[0], "all"):
            continue
        tr, cond, latents, t, s, kw, n_img = setup()
        plan = _plan(tr, n_img, seed=3)
        ref = np.asarray(denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, **kw))
        scale = float(np.max(np.abs(ref)))
        for mesh_spec, fsdp in MODES[name]:
            mesh = make_mesh(mesh_spec)
            out = shard_denoise(mesh, tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, fsdp=fsdp,
                                **kw)
            err = float(np.max(np.abs(np.asarray(out) - ref)) / scale)
            mode = f"{name} {mesh_spec}{' fsdp' if fsdp else ''}"
            if not np.isfinite(err) or err > TOL:
                print(f"FAIL {mode} {err:.3e}", flush=True)
                return 1
            print(f"OK {mode} {err:.3e} sharding={str(out.sharding.spec).replace(' ', '')}", flush=True)
        for mesh_spec, fsdp in KERNEL_MODES.get(name, []):  # the kernel's cached heads and bands, per device
            out = shard_denoise(make_mesh(mesh_spec), tr.graphdef, tr.state, jnp.array(latents), cond, t, s,
                                plan=plan, fsdp=fsdp, attention_impl="interpret", **kw)
            err = float(np.max(np.abs(np.asarray(out) - ref)) / scale)
            if not np.isfinite(err) or err > TOL:
                print(f"FAIL {name} {mesh_spec} kernel {err:.3e}", flush=True)
                return 1
            print(f"OK {name} {mesh_spec} kernel {err:.3e} sharding={str(out.sharding.spec).replace(' ', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
