"""The wheel carries every non-Python file of the packages (the testbed assets, the kernel tuning table).

1. fast, no build: every such file in the tree is matched by ``[tool.setuptools.package-data]`` of pyproject.toml,
   with setuptools' rule (globs relative to the package folder, ``**`` recursive, ``*`` not matching dotfiles);
2. a real build (about 10 s: ``pip wheel --no-deps --no-build-isolation`` from a copy of the sources in tmp_path,
   pip told not to reach any index) lists every one of them in the wheel.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _top_packages() -> list[str]:
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(p.rstrip("*").rstrip(".") for p in include)


def _data_files() -> list[str]:
    """Every file under the packages that is not Python source or bytecode, relative to the repo root."""
    out = []
    for pkg in _top_packages():
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            out += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files if not f.endswith((".py", ".pyc"))]
    return sorted(out)


def _matched_by_package_data() -> set[str]:
    """The files setuptools' package-data globs select (package key -> its folder; "*" applies to every package)."""
    data = _pyproject()["tool"]["setuptools"].get("package-data", {})
    matched = set()
    for key, patterns in data.items():
        folders = ([dp for pkg in _top_packages() for dp, _, _ in os.walk(os.path.join(ROOT, pkg))]
                   if key in ("*", "") else [os.path.join(ROOT, *key.split("."))])
        for folder in folders:
            for pat in patterns:
                matched |= {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(folder, pat), recursive=True)
                            if os.path.isfile(p)}
    return matched


def test_package_data_covers_every_data_file():
    files = _data_files()
    assert any(f.startswith(os.path.join("dfa2_jax", "assets", "testbed_flux") + os.sep) for f in files)
    assert os.path.join("pallas_kernels", "arrow_tuned.json") in files
    missing = [f for f in files if f not in _matched_by_package_data()]
    assert not missing, f"pyproject.toml [tool.setuptools.package-data] leaves out of the wheel: {missing}"


def test_built_wheel_lists_every_data_file(tmp_path):
    pytest.importorskip("setuptools")

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for pkg in _top_packages():
        shutil.copytree(os.path.join(ROOT, pkg), src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _data_files() if f.replace(os.sep, "/") not in names]
    assert not missing, f"{os.path.basename(wheel)} lacks {missing}"
    assert {f"{pkg}/__init__.py" for pkg in _top_packages()} <= names
