"""No import circles: no project module imports, directly or through others, a module that imports it.

Every import counts, at module level or inside a function (a lazy import only hides a circle until it runs).
`import a.b` is an edge to a.b; `from a import b` to a.b if that is a module, else to a. A submodule gets no
edge to its package's __init__ (Python runs it first, but that is no circle of the code's making).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmrobust", "pipelines", "stages")


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, modules: dict) -> set[str]:
    """The project modules that module `name` (file `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in out if m in modules and m != name}


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest circle per strongly connected component of more than one module, as a path a -> ... -> a."""
    out, seen = [], set()
    for start in sorted(graph):
        if start in seen:
            continue
        reach = _reachable(graph, start)
        component = {m for m in reach if start in _reachable(graph, m)}
        seen |= component | {start}
        if start in component:
            out.append(_shortest_path(graph, start, start, component))
    return out


def _reachable(graph, start) -> set[str]:
    todo, found = [start], set()
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in found:
                found.add(nxt)
                todo.append(nxt)
    return found


def _shortest_path(graph, start, goal, within) -> list[str]:
    paths, frontier = {start: [start]}, [start]
    while frontier:
        nxt_frontier = []
        for m in frontier:
            for nxt in sorted(graph[m] & within):
                if nxt == goal:
                    return paths[m] + [goal]
                if nxt not in paths:
                    paths[nxt] = paths[m] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no path from {start} to {goal}")


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub import b\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub.b import g\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nimport json\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.sub.b"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join("  " + " -> ".join(c) for c in found)
