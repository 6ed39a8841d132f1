"""The house rules, checked on the source: the core imports no Prefect layer, imports run downward through the
layers of docs/architecture.md, no import circles, no big modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.net import ROOT

CORE = ROOT / "vlmforge"
MAX_LINES = 500

LAYERS: list[set[str]] = [
    {"errors", "system"},
    {"specs", "artifacts", "plans", "modeling"},
    {"families"},
    {"sources", "store"},
    {"runner"},
    {"toolchains"},
    {"build", "deploy"},
    {"cli", "__main__"},
]
"""vlmforge's subpackages from the bottom up (docs/architecture.md): a package imports only from its own layer's
packages that sit beside it in no circle, and from the layers below."""
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def modules() -> dict[str, Path]:
    found = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports, at the top or lazily inside functions (TYPE_CHECKING included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            out.add(target)
    return out


MODULES = modules()
GRAPH = {name: imports_of(name, path, set(MODULES)) for name, path in MODULES.items()}


def internal(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_the_core_imports_no_prefect_layer() -> None:
    banned = ("prefect", "prefect_docker", "vlmforge_flows", "vlmforge_tasks", "flows", "tasks")
    found = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
                   if target.split(".")[0] in banned)
    assert not found, found


def test_no_import_circles() -> None:
    graph = {name: {t for t in map(internal, targets) if t and t != name} for name, targets in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    assert not circles, circles


def test_imports_run_downward_through_the_layers() -> None:
    upward = []
    for name, targets in GRAPH.items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        here = LEVEL.get(parts[1])
        assert here is not None, f"{name}: vlmforge.{parts[1]} is in no layer of LAYERS (docs/architecture.md)"
        for target in map(internal, targets):
            if target is None or target.count(".") < 1:
                continue
            there = LEVEL.get(target.split(".")[1])
            if there is not None and there > here:
                upward.append(f"{name} -> {target}")
    assert not upward, upward


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_big_modules(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (> {MAX_LINES}): split it by concern"
