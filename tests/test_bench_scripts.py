"""The GPU benchmark scripts of the scale-out and memory measurements run end to end on the CPU (tiny model,
fake devices), so a device call is never spent on a broken script; their checks hold on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args, devices: int, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_bench_scale_small(tmp_path):
    out = _run([str(ROOT / "scripts" / "bench_scale.py"), "--small", "--attn", "plan", "--out", str(tmp_path)], 2,
               tmp_path)
    result = json.loads((tmp_path / "scale.json").read_text())
    rows = {(r["mode"], r["devices"]): r for r in result["rows"]}
    assert set(rows) == {("none", 1), ("data", 2), ("heads", 2), ("seq", 2), ("mesh1", 1)}, rows.keys()
    for r in result["rows"]:  # every mesh gives the single-device latents (float32, CPU)
        assert r["finite"] and r["rel_err"] < 1e-5, r
    assert rows[("data", 2)]["batch"] == 2 and rows[("seq", 2)]["batch"] == 1
    assert 0.2 < result["meta"]["plan_kept"] < 0.8
    assert "seq" in out and "latency s" in out


def test_bench_memory_small(tmp_path):
    out = _run([str(ROOT / "scripts" / "bench_memory.py"), "--small"], 1, tmp_path)
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["dense"], ["plan"])}
    assert set(lines) == {"dense", "plan"}
    dense_caches, plan_caches = int(lines["dense"][1]), int(lines["plan"][1])
    plan_alias = int(lines["plan"][4])
    assert dense_caches == 0 and plan_caches > 0 and plan_alias >= plan_caches  # the caches are donated, aliased
