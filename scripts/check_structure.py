"""Check the house limits on code shape (issue 21's acceptance).

Fails (exit 1, listing every offender) when, in ``moonprune/``, ``cli/`` or
``exporters/``:

- a module is over 300 lines;
- a function or method is over 80 lines (``def`` line to last line, decorators
  excluded);
- the module-level imports form a cycle. Imports inside functions and inside an
  ``if TYPE_CHECKING:`` block are not edges: the first run when called, the second
  never. Importing ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages
  ``a`` and ``a.b`` that Python also initialises on the way, so a package
  ``__init__`` that re-exports its submodules is not a cycle by itself.

``cli/`` and ``exporters/`` are installed as ``moonprune.cli`` and
``moonprune.exporters`` (pyproject.toml), and are named so here.

Usage: ``python scripts/check_structure.py`` from anywhere; prints what it finds.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the dotted package it is installed as
PACKAGES = {"moonprune": "moonprune", "cli": "moonprune.cli", "exporters": "moonprune.exporters"}
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 80


def discover(root: Path) -> dict[str, Path]:
    """Every module under the checked folders, by its installed dotted name."""
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: top level, and inside top-level
    ``if``/``try``/``with`` blocks, except the body of ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from module_level_imports(block)
            for handler in node.handlers:
                yield from module_level_imports(handler.body)
        elif isinstance(node, ast.With):
            yield from module_level_imports(node.body)


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies inside, if any."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_modules(module: str, tree: ast.Module, modules: dict[str, Path]) -> set[str]:
    """The checked modules that ``module`` imports at module level."""
    is_package = modules[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str | None] = set()
    for node in module_level_imports(tree.body):
        if isinstance(node, ast.Import):
            targets.update(resolve(alias.name, modules) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            # ``from a import b``: b is the submodule a.b when there is one
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in modules else resolve(base, modules))
    return {t for t in targets if t is not None and t != module}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycle_path(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One import cycle through the first module of ``component`` (a strongly
    connected component): the shortest path back to it, by breadth-first search."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return component


def long_functions(tree: ast.Module) -> Iterator[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function over the limit."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    yield name, child.lineno, length
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def main() -> int:
    modules = discover(ROOT)
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        shown = path.relative_to(ROOT)
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"module  {shown}: {lines} lines (max {MAX_MODULE_LINES})")
        for name, line, length in long_functions(tree):
            problems.append(
                f"function {shown}:{line} {name}: {length} lines (max {MAX_FUNCTION_LINES})"
            )
        graph[module] = imported_modules(module, tree, modules)
    for component in find_cycles(graph):
        problems.append(
            f"cycle   {' -> '.join(cycle_path(component, graph))}"
            f" (modules in the cycle: {', '.join(component)})"
        )
    for problem in problems:
        print(problem)
    print(
        f"{len(modules)} modules checked: "
        + (f"{len(problems)} problem(s)" if problems else "no problems")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
