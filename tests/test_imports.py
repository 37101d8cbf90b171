"""No two modules of reuse_lens import each other, not even lazily inside a function.

A circle of two files means neither can be read, tested or moved without the other. The
top-level package, a lazy facade that re-exports the public API, is left out; imports
under ``if TYPE_CHECKING:`` never run and are left out too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import reuse_lens

ROOT = Path(reuse_lens.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The reuse_lens modules that ``path`` imports at run time, anywhere in it."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from package import submodule`` imports the submodule (its parents run
            # anyway); ``from module import name`` imports the module.
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            submodules = names & modules
            found |= submodules or {node.module}
            if len(submodules) < len(names):
                found.add(node.module)
    return {name for name in found if name in modules}


def test_no_two_modules_import_each_other() -> None:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths) - {"reuse_lens"}
    graph = {name: _imports(paths[name], modules) - {name} for name in modules}
    circles = sorted(
        {tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph[b]}
    )
    assert circles == []
