"""Every benchmark script runs its CPU smoke path end to end (tiny models, fake host devices where a mesh is
needed), as a subprocess of the installed package from an unrelated folder, so a GPU run is never spent on a broken
script; their own checks hold on the way. The testbed trainers and the sweep (minutes of work) are only imported
and asked for --help; the suite prints its commands."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


# Compiled programs persist between runs (XLA's cache; torch inductor keeps its own in the temp folder): a second
# run of the tests skips most compilation.
CACHE = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "dfa2_jax_smoke_xla_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def _run(script: str, *args: str, cwd: Path, devices: int = 1, timeout: float = 600) -> str:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **CACHE)  # the suite's flags (conftest) kept
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_bench_arrow_interpret(tmp_path):
    out = _run("bench_arrow.py", "--interpret", "--small", "--shapes", "FLUX-small", "--iters", "1", "--warmup", "1",
               "--mixes", "2", cwd=tmp_path)
    checked = [line.split()[1] for line in out.splitlines() if line.strip().startswith("check ")]
    assert checked == ["full", "arrow:8", "arrow:16", "arrow:32", "mixed", "mix1", "mix2"], out
    assert all(line.rstrip().endswith("ok") for line in out.splitlines() if line.strip().startswith("check "))
    assert "worst of 2 mixes:" in out and "mixed plan (wall):" in out


def test_bench_transformer_smoke(tmp_path):
    """Ours, diffusers eager and diffusers under torch.compile on the tiny FLUX model (torch.compile's 'eager'
    backend: the worker's plumbing without inductor's minute of C++ code generation on a CPU)."""
    out = _run("bench_transformer.py", "--smoke", "--models", "flux-dev", "--out", str(tmp_path),
               "--torch-compile-backend", "eager", "--profile", cwd=tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())
    # --profile: the JAX worker wrote its compiled program and its (here, CPU: empty) GPU kernel table
    assert "ENTRY" in (tmp_path / "hlo_flux-dev_128.txt").read_text()
    assert json.loads((tmp_path / "kernels_jax_flux-dev_128.json").read_text())["framework"] == "jax"
    assert {r["framework"] for r in rows} == {"jax", "torch", "torch-compile"}, out
    assert all(r["finite"] and r["ms"] > 0 and r["queued_ms"] > 0 for r in rows)
    compiled = next(r for r in rows if r["framework"] == "torch-compile")
    assert compiled["compile_mode"] == "default" and compiled["first_call_s"] > compiled["ms"] / 1e3
    table = out[out.index("\nmodel"):]
    assert "jax/tc" in table and "tc compile s" in table and "q jax/tc" in table and "flux-dev" in table


def test_bench_transformer_kernel_tables():
    """The profile's grouping of GPU kernel names: cuBLAS / XLA / Inductor matmuls, cuDNN attention, copies, and
    kernel families without their instance numbers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_transformer", SCRIPTS / "bench_transformer.py")
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    kernels = [dict(name="nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", count=3, ms=4.0),
               dict(name="gemm_fusion_dot_45", count=1, ms=1.0),
               dict(name="cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", count=2, ms=3.0),
               dict(name="loop_add_fusion_12", count=1, ms=0.5), dict(name="loop_add_fusion.3", count=2, ms=0.25),
               dict(name="triton_poi_fused_add_mul_7", count=1, ms=0.125), dict(name="Memcpy DtoD", count=1, ms=0.5)]
    summary = bt.summarize_kernels(kernels, span_ms=12.5)
    assert summary["span_ms"] == 12.5
    assert summary["kinds"] == {"matmul": 5.0, "attention": 3.0, "other": 0.875, "copy": 0.5}
    assert summary["total_ms"] == 9.375 and summary["n_kernels"] == 11
    families = {f["family"]: (f["ms"], f["count"]) for f in summary["top_non_matmul"]}
    assert families["loop_add_fusion"] == (0.75, 3) and families["triton_poi_fused_add_mul"] == (0.125, 1)
    assert summary["top_non_matmul"][0]["family"].startswith("cudnn_generated")  # largest first


def test_profile_kernel_reads_a_trace():
    """profile_kernel's reading of a profiler trace against hand counts: one CTA, two tiles (3 clean + 1 band key
    blocks, then 2 clean), two compute warpgroups and the memory one (left out)."""
    spec = importlib.util.spec_from_file_location("profile_kernel", SCRIPTS / "profile_kernel.py")
    pk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pk)
    table = np.array([[1, 2, 0, 0, 0, 0, 0, 0, 0],
                      [0, 0, 0, 5, 0, 0, 3, 3, 4],
                      [0, 0, 1, 5, 0, 0, 2, 2, 2]])
    tiles, steps, by_kind = pk.steps_by_kind(table, 1, ("clean", "band"))
    assert tiles.tolist() == [2] and steps.tolist() == [6] and by_kind == {"clean": 5.0, "band": 1.0}
    assert pk.events_needed(table, 1) == 2 * len(pk.TILE_SCOPES) + 8
    from pallas_kernels import MosaicGpuConfig  # the compiled kernel's scratch at head_dim 128: 196 608 bytes
    from pallas_kernels.mosaic_gpu import smem_bytes
    assert smem_bytes(MosaicGpuConfig(), 128) == 196_608 and pk.profile_smem_bytes(100) == 4_800

    def scope(name, t0, t1, tid):
        return [dict(name=name, ph="B", ts=t0, tid=tid), dict(name=name, ph="E", ts=t1, tid=tid)]

    events = []
    for tid in (1, 2):  # ts in units of 1000 cycles
        begin, end = (dict(name="c_steps", ph=ph, tid=tid) for ph in "BE")
        events += scope("c_info", 0, 1, tid) + [dict(begin, ts=1)]
        events += scope("c_clean", 1, 7, tid) + scope("c_band", 7, 9, tid) + [dict(end, ts=9)]
        events += scope("c_out", 9, 10, tid) + scope("c_info", 10, 11, tid) + [dict(begin, ts=11)]
        events += scope("c_clean", 11, 15, tid) + [dict(end, ts=15)]
        events += scope("c_out", 15, 16 + (tid - 1), tid)
    events += scope("m_kv", 0, 40, 3)
    summary = pk.phase_summary(events, tiles, by_kind)
    assert summary["cycles_per_step"] == {"clean": 2000.0, "band": 2000.0}
    assert summary["span_cycles"] == 16500.0 and summary["fixed_per_tile"] == 2250.0
    assert summary["span_max_over_mean"] == 17000.0 / 16500.0
    assert summary["phases_per_tile"]["c_info"] == 1000.0 and summary["phases_per_tile"]["c_out"] == 1250.0


def test_bench_e2e_smoke(tmp_path):
    """Both families (FLUX guidance embedding, SD3 CFG): ours dense, three plans and the stand-in, and diffusers'
    eager loop; the torch.compile worker is the eager worker's code under torch.compile (its compile on the CPU is
    covered by the transformer smoke test)."""
    out = _run("bench_e2e.py", "--smoke", "--runs", "1", "--frameworks", "jax,torch", "--out", str(tmp_path),
               cwd=tmp_path, timeout=900)
    res = json.loads((tmp_path / "e2e.json").read_text())
    assert not res["errors"], res["errors"]
    for case in ("flux-1024", "sd3-1024"):
        rows = {(r["framework"], r["variant"]): r for r in res["results"][case]["rows"]}
        assert {("jax", "dense"), ("jax", "plan-43"), ("jax", "plan-56"), ("jax", "plan-68"),
                ("jax", "no-attention")} <= set(rows) and any(f == "torch" for f, _ in rows), rows.keys()
        assert all(r["finite"] for r in rows.values())
        assert rows[("jax", "plan-68")]["speedup_vs_diffusers"] is not None, rows[("jax", "plan-68")]
        assert res["meta"][f"jax:{case}"]["arrow_impl"] == "xla"  # "auto" on a CPU: the jnp reference
    assert "(a) diffusers" in out


def test_bench_scale_small(tmp_path):
    out = _run("bench_scale.py", "--small", "--attn", "plan", "--out", str(tmp_path), cwd=tmp_path, devices=2)
    result = json.loads((tmp_path / "scale.json").read_text())
    rows = {(r["mode"], r["devices"]): r for r in result["rows"]}
    assert set(rows) == {("none", 1), ("data", 2), ("heads", 2), ("seq", 2), ("mesh1", 1)}, rows.keys()
    for r in result["rows"]:  # every mesh gives the single-device latents (float32, CPU)
        assert r["finite"] and r["rel_err"] < 1e-5, r
    assert rows[("data", 2)]["batch"] == 2 and rows[("seq", 2)]["batch"] == 1
    assert 0.2 < result["meta"]["plan_kept"] < 0.8
    assert "seq" in out and "latency s" in out


def test_bench_memory_small(tmp_path):
    out = _run("bench_memory.py", "--small", "--out", str(tmp_path), cwd=tmp_path)
    rows = {r["variant"]: r for r in json.loads((tmp_path / "memory.json").read_text())["rows"]}
    assert set(rows) == {"dense", "plan"}
    assert rows["dense"]["caches"] == 0 and rows["plan"]["caches"] > 0
    assert rows["plan"]["alias"] >= rows["plan"]["caches"]  # the caches are donated, aliased
    assert {line.split()[0] for line in out.splitlines() if line.split()[:1] in (["dense"], ["plan"])} == \
        {"dense", "plan"}


def test_bench_sampler_smoke(tmp_path):
    out = _run("bench_sampler.py", "--smoke", cwd=tmp_path)
    last = out.strip().splitlines()[-1].split()
    assert last[-1] == "True" and "overhead" in out  # finite


def test_bench_calibrate_smoke(tmp_path):
    out = _run("bench_calibrate.py", "--smoke", cwd=tmp_path)
    assert "solves" in out and "steady" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("ratio calibration / dense"))
    assert float(line.split("= ")[1].split()[0]) > 0 and "first calls" in line


def test_profile_transformer_smoke(tmp_path):
    out = _run("profile_transformer.py", "--smoke", "--models", "flux-dev", cwd=tmp_path)
    assert "no-attn ms" in out and "flux-dev" in out


def test_aot_memory_smoke(tmp_path):
    """No jax CUDA plugin here: the script's path without the H100 topology (tiny model compiled for the host
    CPU, the cuDNN stand-in registered for the CPU, the plan through the Triton kernel in interpret mode), on one
    device and on a 2-device heads mesh; one dense step's kernel traffic and the plan sampler's scan step's (one
    device only)."""
    out = _run("aot_memory.py", "--smoke", "--variants", "step,plan", "--meshes", "none;heads=2", cwd=tmp_path,
               devices=2)
    table = out[out.index("\nmesh"):out.index("\none dense step")].strip().splitlines()[1:]
    assert [line.split()[:2] for line in table] == [["none", "step"], ["none", "plan"], ["heads=2", "plan"]], out
    assert "kernel: interpret" in out
    traffic = re.search(r"one dense step, batch 1: (\d+) kernels moving ([\d.]+) GB", out)
    assert traffic and int(traffic[1]) > 10 and float(traffic[2]) > 0, out
    step = re.search(r"plan sampler, one step of its scan \(one GPU\): (\d+) kernels moving ([\d.]+) GB", out)
    assert step and int(step[1]) > 10 and float(step[2]) > 0, out


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   UIADD3 UR4, UR4, 0x1, URZ ;
.L_x_1:
        /*0020*/                   HGMMA.64x128x16.F32.BF16 gdesc[UR8], RZ, !UPT, gsb0 ;
        /*0030*/                   MUFU.EX2 R2, R3 ;
        /*0040*/                   FFMA R4, R5, R6, -R7 ;
        /*0050*/                   STL [R1+0x4], R2 ;
        /*0060*/              @!P2 BRA `(.L_x_1) ;
        /*0070*/                   FMUL R2, R2, R3 ;
.L_x_2:
        /*0080*/                   FADD R2, R2, R3 ;
        /*0090*/               @P1 BRA `(.L_x_2) ;
        /*00a0*/                   BRA `(.L_x_0) ;
        /*00b0*/                   EXIT ;
"""


def test_kernel_sass_finds_the_step_loops():
    """kernel_sass' loop finder on a hand-written disassembly: an outer loop around two inner ones, of which only
    the first issues wgmma; the predicate guards do not hide the branches' opcode."""
    spec = importlib.util.spec_from_file_location("kernel_sass", SCRIPTS / "kernel_sass.py")
    ks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ks)
    (loop,) = ks.step_loops(SASS)
    assert (loop["lo"], loop["hi"], loop["instructions"]) == (0x20, 0x60, 5)
    assert (loop["HGMMA"], loop["MUFU.EX2"], loop["FFMA"], loop["FMUL"], loop["spill"]) == (1, 1, 1, 0, 1)
    assert ks.opcode("@!P2 BRA `(.L_x_1)") == "BRA" and ks.opcode("@UP3 UIADD3 UR4, UR4, 0x1, URZ") == "UIADD3"


def test_kernel_sass_without_the_toolkit_says_what_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "kernel_sass.py"), "--cuda-bin", str(tmp_path)],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "ptxas not found" in proc.stderr and "--cuda-bin" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_aot_memory_without_plugin_says_what_is_missing(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "aot_memory.py"), "--variants", "dense"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if proc.returncode == 0:
        pytest.skip("the jax CUDA plugin is installed here")
    assert "jax CUDA plugin" in proc.stderr and "--smoke" in proc.stderr


@pytest.mark.parametrize("script", ["train_testbed.py", "train_testbed_classifier.py", "testbed_sweep.py"])
def test_long_scripts_answer_help(script, tmp_path):
    out = _run(script, "--help", cwd=tmp_path, timeout=300)
    assert "usage:" in out


def test_suite_dry_run(tmp_path):
    out = _run("bench_suite.py", "--dry-run", "--out", str(tmp_path / "o"), cwd=tmp_path)
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    scripts = {line.split()[line.split().index("python3") + 1] for line in commands}
    assert {os.path.basename(s) for s in scripts} == {
        "bench_arrow.py", "bench_transformer.py", "profile_transformer.py", "bench_sampler.py", "bench_e2e.py",
        "bench_memory.py", "bench_calibrate.py", "bench_scale.py"}
    assert all((SCRIPTS / os.path.basename(s)).is_file() for s in scripts)
    assert "--cases flux-2048 " in out and "NCCL_NVLS_ENABLE=0" in out
    assert not (tmp_path / "o").exists()  # nothing ran

    smoke = _run("bench_suite.py", "--dry-run", "--smoke", "--only", "all", cwd=tmp_path)
    assert "aot_memory.py --smoke" in smoke and smoke.count("JAX_PLATFORMS=cpu") == smoke.count("python3 ")

    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_suite.py"), "--only", "nope", "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "unknown part" in proc.stderr


def test_suite_runs_a_part(tmp_path):
    """The suite's own path: one part's smoke command, its log, suite.json and the summary table last."""
    out = _run("bench_suite.py", "--smoke", "--only", "sampler", "--out", str(tmp_path / "o"), cwd=tmp_path)
    suite = json.loads((tmp_path / "o" / "suite.json").read_text())
    (r,) = suite["results"]
    assert r["part"] == "sampler" and r["status"] == "ok", r
    assert any("overhead" in line for line in r["table"])
    assert (tmp_path / "o" / "sampler.log").is_file()
    last = out.strip().splitlines()
    assert last[-2].split()[:2] == ["part", "status"] and last[-1].split()[:2] == ["sampler", "ok"]
