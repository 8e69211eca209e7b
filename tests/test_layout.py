"""The source tree keeps its shape: no private name imported across packages, no module over 500
lines, no import cycle between modules (the layers themselves are import-linter's contract, run by
`make test`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "jacket"
MAX_LINES = 500


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield path, name, path.name == "__init__.py"


def _imports(path: Path, name: str, is_package: bool):
    """(imported module, imported name or None) for every `from ... import` of jacket."""
    tree = ast.parse(path.read_text())
    here = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "jacket":
                continue
            for alias in node.names:
                yield module, alias.name, node.lineno


def _package(module: str) -> str:
    """The top-level package or module of jacket a module belongs to (`jacket.engine`, ...)."""
    return ".".join(module.split(".")[:2])


def test_no_private_name_is_imported_across_packages():
    found = []
    for path, name, is_package in _modules():
        for module, imported, line in _imports(path, name, is_package):
            target = f"{module}.{imported}"
            if _package(module) == _package(name) or module == "jacket":
                continue
            private = [part for part in target.split(".")[2:] if part.startswith("_")] + (
                [imported] if imported.startswith("_") else []
            )
            if private:
                found.append(f"{path.relative_to(SRC)}:{line}: {target}")
    assert not found, "private names imported across packages:\n" + "\n".join(found)


@pytest.mark.parametrize("path", [p for p, _, _ in _modules()], ids=lambda p: str(p.name))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines (at most {MAX_LINES})"


def test_no_import_cycle_between_modules():
    import grimp

    graph = grimp.build_graph("jacket", exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        for other in graph.find_modules_directly_imported_by(module):
            if other != module and graph.chain_exists(importer=other, imported=module):
                chain = graph.find_shortest_chain(importer=other, imported=module)
                cycles.append(f"{module} -> " + " -> ".join(chain))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:20])
