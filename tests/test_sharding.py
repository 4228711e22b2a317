"""dfa2_jax.parallel.sharded: mesh parsing / validation in process; every parallel mode against the single-device
sampler in a subprocess with 4 forced host devices (this process already initialised jax with one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from dfa2_jax.parallel.sharded import make_mesh, param_spec, parse_mesh, validate


def test_parse_mesh():
    assert parse_mesh("data=2,heads=4") == {"data": 2, "heads": 4}
    assert parse_mesh(" cfg=2 , data=1") == {"cfg": 2, "data": 1}
    for bad, msg in (("tensor=2", "unknown axis 'tensor'"), ("data=0", ">= 1"), ("data=-2", ">= 1"),
                     ("data", "axis=size"), ("data=x", "integer"), ("data=2,data=2", "twice"), ("", "no axes")):
        with pytest.raises(ValueError, match=msg):
            parse_mesh(bad)


def test_make_mesh_device_count_errors():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"needs {4 * n} devices; {n} available"):
        make_mesh(f"data=2,heads={2 * n}")
    with pytest.raises(ValueError, match="needs 2 devices; 1 given"):
        make_mesh("heads=2", devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown mesh axis 'x'"):
        make_mesh({"x": 1})
    mesh = make_mesh("heads=1,data=1", devices=jax.devices()[:1])
    assert mesh.axis_names == ("data", "heads")  # canonical order


def test_validate_errors():
    validate({"data": 2, "heads": 4}, batch=4, heads=24, family="flux", do_cfg=False)
    with pytest.raises(ValueError, match="24 attention heads are not divisible by the heads axis size 5"):
        validate({"heads": 5}, batch=1, heads=24, family="flux", do_cfg=False)
    with pytest.raises(ValueError, match="batch 3 is not divisible by the data axis size 2"):
        validate({"data": 2}, batch=3, heads=24, family="sd3", do_cfg=True)
    with pytest.raises(ValueError, match="cfg axis .* needs classifier-free guidance"):
        validate({"cfg": 2}, batch=1, heads=24, family="flux", do_cfg=False)
    validate({"cfg": 2}, batch=1, heads=24, family="flux", do_cfg=True)  # FLUX's true CFG
    with pytest.raises(ValueError, match="size must be 1 or 2; got 4"):
        validate({"cfg": 4}, batch=1, heads=24, family="sd3", do_cfg=True)
    validate({"data": 2, "seq": 8}, batch=2, heads=24, family="flux", do_cfg=False)
    with pytest.raises(ValueError, match="24 attention heads are not divisible by the seq axis size 16"):
        validate({"seq": 16}, batch=1, heads=24, family="flux", do_cfg=False)
    with pytest.raises(ValueError, match=r"either the heads axis \(Megatron, size 2\) or the seq axis"):
        validate({"heads": 2, "seq": 2}, batch=1, heads=24, family="sd3", do_cfg=True)


def test_param_specs():
    mesh = AbstractMesh((2, 2), ("data", "heads"))
    blk = ("transformer_blocks", 0, "attn")
    assert param_spec(blk + ("to_q", "kernel"), (64, 64), mesh, fsdp=False) == P(None, "heads")
    assert param_spec(blk + ("add_v_proj", "bias"), (64,), mesh, fsdp=False) == P("heads")
    assert param_spec(blk + ("to_out", 0, "kernel"), (64, 64), mesh, fsdp=False) == P("heads", None)
    assert param_spec(blk + ("to_out", 0, "bias"), (64,), mesh, fsdp=False) == P(None)
    assert param_spec(blk + ("to_add_out", "kernel"), (64, 32), mesh, fsdp=False) == P("heads", None)
    assert param_spec(("single_transformer_blocks", 0, "proj_out", "kernel"), (320, 64), mesh,
                      fsdp=False) == P(None, None)
    # MLPs Megatron-style on the heads axis: hidden dim column-split in, row-split out.
    ff = ("transformer_blocks", 0, "ff", "net")
    assert param_spec(ff + (0, "proj", "kernel"), (64, 256), mesh, fsdp=False) == P(None, "heads")
    assert param_spec(ff + (0, "proj", "bias"), (256,), mesh, fsdp=False) == P("heads")
    assert param_spec(ff + (2, "kernel"), (256, 64), mesh, fsdp=False) == P("heads", None)
    assert param_spec(ff + (2, "bias"), (64,), mesh, fsdp=False) == P(None)
    assert param_spec(("transformer_blocks", 0, "ff_context", "net", 2, "kernel"), (256, 64), mesh,
                      fsdp=False) == P("heads", None)
    assert param_spec(("single_transformer_blocks", 0, "proj_mlp", "kernel"), (64, 256), mesh,
                      fsdp=False) == P(None, "heads")
    assert param_spec(("single_transformer_blocks", 0, "proj_mlp", "bias"), (255,), mesh, fsdp=False) == P(None)
    assert param_spec(("norm1", "linear", "kernel"), (64, 384), mesh, fsdp=False) == P(None, None)
    # FSDP: the largest free axis divisible by the data size; head-split axes are kept.
    assert param_spec(blk + ("to_q", "kernel"), (64, 64), mesh, fsdp=True) == P("data", "heads")
    assert param_spec(("ff", "net", 0, "proj", "kernel"), (64, 256), mesh, fsdp=True) == P("data", "heads")
    assert param_spec(("x_embedder", "kernel"), (64, 256), mesh, fsdp=True) == P(None, "data")
    assert param_spec(("x_embedder", "bias"), (3,), mesh, fsdp=True) == P(None)


PARTS = {
    "flux": {"per_device data=2,heads=2", "per_device heads=4", "per_device data=4", "per_device seq=4",
             "collectives seq=4", "collectives heads=4", "collectives data=4",
             "per_device_tables data=2,heads=2", "per_device_tables heads=4", "per_device_tables data=4",
             "per_device_tables seq=4", "per_device_tables none",
             "flux data=4", "flux heads=4", "flux heads=2", "flux data=2,heads=2", "flux data=4 fsdp",
             "flux heads=4 kernel", "flux data=2,heads=2 kernel", "flux seq=4", "flux data=2,seq=2",
             "flux data=2,seq=2 fsdp", "flux seq=4 kernel", "flux_cfg cfg=2,data=2", "flux_cfg cfg=2,heads=2"},
    "sd3": {"sd3 data=4", "sd3 heads=4", "sd3 cfg=2,data=2", "sd3 cfg=2,heads=2", "sd3 data=2,heads=2 fsdp",
            "sd3 seq=4", "sd3 cfg=2,seq=2"},
}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_parallel_modes_match_single_device(part):
    """Each part in its own process on 4 fake CPU devices (parts run side by side under xdist); the FLUX part also
    checks the per-device attention helpers and the collectives of each mode on its model."""
    script = Path(__file__).with_name("_sharding_check.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the script adds its flags (4 host devices)
    proc = subprocess.run([sys.executable, str(script), part], env=env, capture_output=True, text=True, timeout=600,
                          cwd=script.parent.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("OK ")]
    modes = {" ".join(line.split()[1:-2]) for line in ok}
    assert PARTS[part] <= modes, out


def test_calibration_on_a_mesh_gives_the_same_plan():
    script = Path(__file__).with_name("_sharding_check.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the script adds its flags (4 host devices)
    proc = subprocess.run([sys.executable, str(script), "calibrate"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=script.parent.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ok = {" ".join(line.split()[1:4]).rstrip(":") for line in proc.stdout.splitlines() if line.startswith("OK ")}
    assert {"calibrate flux data=4", "calibrate flux heads=2", "calibrate flux data=2,heads=2",
            "calibrate sd3 cfg=2,data=2", "calibrate sd3 heads=2", "calibrate flux seq=2",
            "calibrate sd3 seq=2"} <= ok, out[-4000:]


def test_resolve_mesh_single_device():
    from dfa2_jax.parallel.sharded import resolve_mesh

    one = len(jax.local_devices()) == 1
    if one:  # "auto" on one device: no mesh
        assert resolve_mesh("auto", batch=4, heads=4, family="flux", do_cfg=False) is None
    assert resolve_mesh(None, batch=4, heads=4, family="flux", do_cfg=False) is None
    assert resolve_mesh("none", batch=4, heads=4, family="flux", do_cfg=False) is None
    with pytest.raises(ValueError, match="heads are not divisible"):
        resolve_mesh("heads=3", batch=4, heads=4, family="flux", do_cfg=False)
    with pytest.raises(ValueError, match="mesh must be"):
        resolve_mesh(3, batch=4, heads=4, family="flux", do_cfg=False)
