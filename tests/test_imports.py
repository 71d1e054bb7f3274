"""The package's import graph: no cycle, whether an import sits at the top of a module or inside a
function, and every module imports first in a fresh interpreter state (so no module works only because
another one happened to be imported before it)."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> Dict[str, Path]:
    """Module name -> file, for mixbench and its methods (installed as mixbench.methods from methods/)."""
    found = {}
    for base, prefix in ((ROOT / "mixbench", "mixbench"), (ROOT / "methods", "mixbench.methods")):
        for path in sorted(base.rglob("*.py")):
            if path.name == "__main__.py":
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def imports_of(name: str, path: Path, modules: Set[str]) -> Set[str]:
    """The package modules ``name`` imports anywhere in its file (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: Set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # `from a.b import c` where c is not a module: a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                add(full if full in modules else source)
    return out


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as a list of nodes (empty when there is none)."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_module_graph_has_no_cycle():
    modules = package_modules()
    assert len(modules) > 40 and "mixbench.methods.puzzlemix" in modules and "mixbench.data.loaders" in modules
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    # A package importing its own submodules (re-exports) is the one dependency allowed upward.
    graph = {name: {t for t in targets if not (name.startswith(t + ".") and modules[t].name == "__init__.py")}
             for name, targets in graph.items()}
    assert {"mixbench.data", "mixbench.checkpoint", "mixbench.methods"} <= graph["mixbench.train"]  # edges are read
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_every_package_is_installed():
    """setup.cfg lists its packages by hand: a package missing there is missing from a wheel install."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mixbench").rglob("__init__.py")}
    assert packages - listed == set(), "add to setup.cfg's packages: " + ", ".join(sorted(packages - listed))
    assert "mixbench.methods" in listed


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_state():
    """One interpreter; before each module, every mixbench module is dropped from sys.modules, so each one
    is the first of the package to be imported (torch and the other libraries stay loaded: only the
    package's own order is under test). Every module being first, the order of the list does not matter."""
    names = sorted(package_modules())
    code = textwrap.dedent("""
        import importlib, sys, traceback
        names = sys.argv[1:]
        failed = []
        for name in names:
            for loaded in [m for m in sys.modules if m == "mixbench" or m.startswith("mixbench.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception:
                failed.append(name + ": " + traceback.format_exc(limit=3).strip().splitlines()[-1])
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
