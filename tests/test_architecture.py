"""The house rules, read from the code (ast, nothing imported): no import loop between library modules, the
kernel package stands alone, the library never imports the command line, scripts use public names only,
and no library code reads an environment variable to choose behaviour."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dfa2_jax", "pallas_kernels", "converters")
# Environment variables the library may read: paths only (documented in the README).
PATH_SETTINGS = {"DFA2_CACHE_DIR", "DFA2_ARROW_TUNE_CACHE", "DFA2_METRICS_DIR", "XDG_CACHE_HOME", "HF_HUB_CACHE",
                 "HUGGINGFACE_HUB_CACHE", "HF_HOME"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``path`` imports (at any depth: lazy imports inside functions count too), resolving
    ``from pkg import sub`` to the submodule when ``sub`` is one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a package attribute: its module
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if colour.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in colour and (found := visit(n)):
                return found
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if m not in colour and (found := visit(m)):
            return found
    return None


def test_no_import_loop():
    cycle = _cycle(_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_loop():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernel_package_stands_alone():
    bad = {m: sorted(d for d in deps if not d.startswith("pallas_kernels"))
           for m, deps in _graph().items() if m.startswith("pallas_kernels")}
    assert not {m: d for m, d in bad.items() if d}, "pallas_kernels imports the project"


def test_library_never_imports_the_command_line():
    bad = {m: sorted(d for d in deps if d.startswith("dfa2_jax.cli"))
           for m, deps in _graph().items() if not m.startswith("dfa2_jax.cli")}
    assert not {m: d for m, d in bad.items() if d}


def test_models_import_neither_solver_nor_sampler():
    for m, deps in _graph().items():
        if m.startswith("dfa2_jax.models"):
            assert not any(d.startswith(("dfa2_jax.calibrate", "dfa2_jax.sample", "dfa2_jax.runtime",
                                         "dfa2_jax.parallel.sharded")) for d in deps), (m, deps)
        if m.startswith("dfa2_jax.plan"):
            assert not any(d.startswith(("dfa2_jax.calibrate", "dfa2_jax.sample", "dfa2_jax.runtime")) for d in deps), \
                (m, deps)


def test_jax_private_api_only_in_the_adapter():
    users = [m for m, p in _modules().items() if "jax._src" in p.read_text()]
    assert users == ["pallas_kernels._jax_compat"], users


def test_no_private_names_across_modules():
    """``from x import _name`` between project modules (tests and scripts included) is a private entry point."""
    modules = _modules()
    offenders = []
    for path in [*modules.values(), *sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "_jax_compat"]  # the adapter's own test
    assert not offenders, offenders


def test_scripts_use_the_installed_package():
    for path in sorted((ROOT / "scripts").glob("*.py")):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"


_ENV_READ = re.compile(r"os\.environ(?:\.get)?\s*[\[(]\s*[\"']([A-Z0-9_]+)[\"']|os\.getenv\(\s*[\"']([A-Z0-9_]+)[\"']")


@pytest.mark.parametrize("pkg", PACKAGES)
def test_library_reads_only_path_settings(pkg):
    found = set()
    for path in (ROOT / pkg).rglob("*.py"):
        text = path.read_text()
        found |= {a or b for a, b in _ENV_READ.findall(text)}
        hidden = re.findall(r"os\.environ(?:\.get)?\s*[\[(]\s*(?![\"'])[^)\]]*", text)
        assert not hidden, f"{path.relative_to(ROOT)}: an environment read not named by a literal: {hidden}"
        names = {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}
        assert "environ" not in names or "os" in names  # nothing hides os.environ behind another name
    assert found <= PATH_SETTINGS, sorted(found - PATH_SETTINGS)
    readme = (ROOT / "README.md").read_text()
    assert all(name in readme for name in found), "every path setting is documented in the README"


def test_tests_and_scripts_do_not_steer_the_library_through_the_environment():
    steer = re.compile(r"DFA2_(?!CACHE_DIR|ARROW_TUNE_CACHE|METRICS_DIR)[A-Z_]+")
    for path in [*sorted((ROOT / "scripts").glob("*")), *sorted((ROOT / "tests").glob("*.py"))]:
        if path.is_file() and path.name != Path(__file__).name:
            assert not steer.search(path.read_text()), f"{path.name}: {steer.search(path.read_text()).group()}"
