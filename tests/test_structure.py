"""The shape of the code base (issue 12): no import cycles, no production file over 500 lines, one namespace.

* The import graph of the production packages has no cycle. Every ``import`` counts, inside functions too: a
  lazy import hides a cycle from Python, not from the design.
* No production file has more than 500 lines.
* Only ``pretrain`` is installed at the top level, and a user's ``data/`` or ``parallel/`` folder in the
  working directory cannot shadow ``pretrain.data`` or ``pretrain.parallel``.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> the package it is imported as (pyproject.toml's package-dir; pretrain/__init__.py in a checkout).
PACKAGES = {"pretrain": "pretrain", "data": "pretrain.data", "parallel": "pretrain.parallel",
            "launch": "pretrain.launch", "evals": "pretrain.evals"}
MAX_LINES = 500


def production_files() -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under the production folders."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute module names one import statement names (``from a import b`` names ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against this module's package
        base = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the production modules it imports, anywhere in the file (functions included)."""
    files = production_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                # The most specific production module each name refers to: `import a.b.c` -> a.b.c if it is a
                # module, else the package a.b; not the packages above it (as pylint's cyclic-import counts).
                for name in _imported(node, module, path.name == "__init__.py"):
                    while name and name not in files:
                        name = name.rpartition(".")[0]
                    if name and name != module:
                        edges.add(name)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest import chain from ``start`` back to itself, staying inside one component."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & within):
            if child == start:
                chain = [node]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                return [start, *reversed(chain[:-1]), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a component but on no cycle")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For every module on a cycle, the shortest cycle through it (duplicates removed)."""
    cycles, seen = [], set()
    for component in strongly_connected(graph):
        for module in component:
            cycle = shortest_cycle(graph, module, set(component))
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def test_the_cycle_finder_finds_cycles_through_function_level_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e", "f"]]
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]  # one per distinct cycle
    tree = ast.parse("def f():\n    from ..data import loader\n    from . import x\nimport pretrain.cli\n")
    names = [n for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for n in _imported(node, "pretrain.parallel.engine", False)]
    assert sorted(names) == ["pretrain.cli", "pretrain.data", "pretrain.data.loader", "pretrain.parallel",
                             "pretrain.parallel.x"]
    assert production_files()["pretrain.data.loader"] == REPO / "data" / "loader.py"


def test_no_import_cycles():
    graph = import_graph()
    assert sum(len(edges) for edges in graph.values()) > 100  # the parser sees the real imports
    cycles = import_cycles(graph)
    assert not cycles, (f"{len(strongly_connected(graph))} groups of modules import each other; the shortest "
                        f"cycle through each module on one ({len(cycles)}):\n"
                        + "\n".join(" -> ".join(cycle) for cycle in cycles))


def test_no_production_file_over_500_lines():
    sizes = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in production_files().values()}
    assert len(sizes) > 50
    over = sorted(((n, str(p.relative_to(REPO))) for p, n in sizes.items() if n > MAX_LINES), reverse=True)
    assert not over, f"files over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for n, p in over)


def test_only_pretrain_is_installed_at_the_top_level():
    dist = importlib.metadata.distribution("pretrain")
    assert (dist.read_text("top_level.txt") or "pretrain").split() == ["pretrain"]
    # Every finder Python consults, less the directories this test run put on sys.path (the checkout, the
    # working directory): none finds a top-level data/parallel/launch/evals.
    path = [p for p in sys.path if p and Path(p).resolve() not in (REPO, Path.cwd().resolve())]
    for name in ("data", "parallel", "launch", "evals"):
        assert name not in sys.modules, f"something imported a top-level {name!r}"
        assert importlib.machinery.PathFinder.find_spec(name, path) is None, name
        for finder in sys.meta_path:
            if finder is not importlib.machinery.PathFinder and hasattr(finder, "find_spec"):
                assert finder.find_spec(name, None) is None, (name, finder)


def test_a_users_data_folder_cannot_shadow_the_project(tmp_path):
    for name in ("data", "parallel", "launch", "evals"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise RuntimeError('the user\\'s {name}/ was imported')\n")
    modules = sorted(production_files())  # every production module, so every import in them is exercised
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "."}  # even with the working directory on the path
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "print('imported', len(sys.argv) - 1)")
    run = subprocess.run([sys.executable, "-c", code, *modules], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and f"imported {len(modules)}" in run.stdout, run.stderr[-3000:]
    script = Path(sys.executable).with_name("pretrain")
    for cmd in ([str(script), "--help"], [sys.executable, "-m", "pretrain.cli", "--help"],
                [sys.executable, "-m", "pretrain.cli", "prepare", "--help"]):
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "usage: pretrain" in run.stdout, (cmd, run.stderr[-3000:])


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists the packages by hand (package-dir maps the top-level folders into ``pretrain``): a
    new folder with an ``__init__.py`` (a new model family) must be listed, or an installed wheel misses it."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in production_files().items() if path.name == "__init__.py"}
    assert found == listed, f"add to (or drop from) pyproject.toml [tool.setuptools] packages: {found ^ listed}"
