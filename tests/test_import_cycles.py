"""No import cycle inside `r3rl/`: every import counts, those inside functions and under
`TYPE_CHECKING` too (a cycle hidden in a function is still a loop in the design).

The graph is read from the source with `ast` (nothing is imported): an edge A -> B for every
`import B` / `from B import x` in A, where `from P import m` means module P.m when P.m is a
module, and importing P.m also imports the package P (its `__init__`) unless A lives in P.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `root`."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def _resolve(module: str, level: int, importer: str, files: dict[str, Path]) -> str:
    if not level:
        return module
    base = importer.split(".")
    if not _is_package(importer, files):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports anywhere in its source."""
    files = module_files(root, package)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(node.module or "", node.level, name, files)
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    targets.add(sub if sub in files else mod)
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a.b's __init__ first
                dep = ".".join(parts[:i])
                inside = name == dep or name.startswith(dep + ".")
                if dep in files and dep != name and (dep == target or not inside):
                    graph[name].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_r3rl_has_no_import_cycle() -> None:
    graph = import_graph(ROOT, "r3rl")
    assert "r3rl.trainer" in graph and graph["r3rl.trainer"]  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_cli_imports_the_trainer() -> None:
    graph = import_graph(ROOT, "r3rl")
    users = sorted(name for name, deps in graph.items() if "r3rl.trainer" in deps)
    assert users == ["r3rl.cli"], users


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import x\n")
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None  # a package importing its own module
    (pkg / "sub" / "b.py").write_text("x = 1\n\n\ndef f():\n    from pkg import a\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    (pkg / "c.py").write_text("import pkg.sub.b\n")  # imports the package pkg.sub too
    (pkg / "sub" / "__init__.py").write_text("def f():\n    from pkg import c\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.sub", "pkg.c", "pkg.sub"]
