"""The shape of the code: no import circle among our modules, short functions, small services.

Read from the source with ``ast`` (nothing is imported), so every import counts: at module
level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "models", "index", "collection", "training", "bench")
MAX_FUNCTION_LINES = 60
MAX_SERVICE_LINES = 300
# Functions allowed to run longer, and why.
_ARGPARSE = "argparse declarations: one command group's options, read top to bottom"
_PARALLEL = "its file is being changed by another branch (issue 13); split it after that merge"
LONG_FUNCTIONS: dict[str, str] = {
    "app.cli.collection:register": _ARGPARSE,
    "app.cli.regions:register": _ARGPARSE,
    "app.cli.train:register": _ARGPARSE,
    "collection.importers:import_thesis": _PARALLEL,
    "collection.importers:import_csv": _PARALLEL,
    "collection.importers:import_scan_features": _PARALLEL,
    "training.detector:train_detector": _PARALLEL,
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*package, *([base] if base else [])])
            # "from a.b import c": c is a module a.b.c, or a name inside a.b
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        targets.update(name for name in names if name in known and name != module)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imported(module, path, known) for module, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def functions() -> Iterator[tuple[str, int]]:
    """("module:qualified name", lines) of every function and method."""
    for module, path in modules().items():
        for name, lines in _functions_in(ast.parse(path.read_text(encoding="utf-8")), ""):
            yield f"{module}:{name}", lines


def _functions_in(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
    for child in ast.iter_child_nodes(node):
        name = prefix
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}{child.name}", child.end_lineno - child.lineno + 1
            name = f"{prefix}{child.name}."
        elif isinstance(child, ast.ClassDef):
            name = f"{prefix}{child.name}."
        yield from _functions_in(child, name)


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_graph_sees_imports_inside_functions_and_type_checking() -> None:
    graph = import_graph()
    assert "app.services.retrieval" in graph["app.main"] | graph["app.runtime"]
    assert "training.evaluate" in graph["app.cli.train"]


def test_no_import_circle_among_our_modules() -> None:
    assert cycles(import_graph()) == []


def test_no_function_over_the_line_limit() -> None:
    long = {name: lines for name, lines in functions()
            if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS}
    assert long == {}, f"over {MAX_FUNCTION_LINES} lines (split them, or say why in LONG_FUNCTIONS)"


def test_no_service_module_over_the_line_limit() -> None:
    long = {path.name: n for path in (REPO / "app" / "services").glob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_SERVICE_LINES}
    assert long == {}
