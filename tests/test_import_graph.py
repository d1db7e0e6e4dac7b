"""No import circles in src/lmlab: each module's imports, read from its source (those inside functions
too, which is how a circle hides), form a graph without cycles, and so do its packages' imports."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(path: Path, name: str, modules: set[str]) -> set[str]:
    """The lmlab modules `path` imports anywhere in its body, but under `if TYPE_CHECKING:`. `from A import b`
    imports module A.b when there is one, else A."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, stack = set(), [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if is_type_checking(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found |= {target} if target in modules else {base} if base in modules else set()
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    paths = {module_name(p, src): p for p in (src / "lmlab").rglob("*.py")}
    return {name: imported(path, name, set(paths)) - {name} for name, path in paths.items()}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """`graph` with each module collapsed to its top-level package (lmlab.run.plan -> lmlab.run)."""

    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    packages: dict[str, set[str]] = {package(name): set() for name in graph}
    for name, targets in graph.items():
        packages[package(name)] |= {package(target) for target in targets} - {package(name)}
    return packages


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path that closes it (a depth-first search's back edges)."""
    found, state = [], {}  # state: 1 on the current path, 2 finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack, state[start] = [start], [iter(sorted(graph[start]))], 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                found.append(path[path.index(step) :] + [step])
            elif step not in state:
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(graph[step])))
    return found


def test_src_lmlab_has_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "lmlab.models.registry" in graph["lmlab.cli"]  # the walk sees the package
    assert cycles(graph) == [], "\n".join(" -> ".join(cycle) for cycle in cycles(graph))


def test_src_lmlab_packages_import_each_other_without_circles() -> None:
    """Packages form layers: a package's modules never import a package that imports it back."""
    graph = package_graph(import_graph())
    assert "lmlab.run" in graph["lmlab.cli"] and "lmlab.models" in graph["lmlab.run"]
    assert cycles(graph) == [], "\n".join(" -> ".join(cycle) for cycle in cycles(graph))


def test_a_circle_is_found_even_through_a_function_level_import(tmp_path: Path) -> None:
    package = tmp_path / "lmlab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from lmlab.b import f\n")
    (package / "b.py").write_text("def f():\n    from lmlab import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lmlab.a import f\n")
    assert cycles(import_graph(tmp_path)) == [["lmlab.a", "lmlab.b", "lmlab.a"]]
