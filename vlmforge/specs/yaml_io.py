"""Safe YAML for specs and the catalog: one document, aliases bounded, every key's line kept for error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vlmforge.errors import SpecError


def _line_index(node: yaml.Node, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    lines: dict[tuple[Any, ...], int] = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[prefix + (key,)] = key_node.start_mark.line + 1
            for sub, line in _line_index(value_node, prefix + (key,)).items():
                lines.setdefault(sub, line)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_index(item, prefix + (index,)))
    return lines


MAX_YAML_NODES = 10_000
"""Most values a spec document may hold once its aliases are expanded (a real spec holds under 100): a few lines of
anchors that refer to anchors ("billion laughs") expand exponentially, into gigabytes, when walked or validated."""


def _expanded_size(root: yaml.Node, limit: int) -> int | None:
    """The number of nodes of ``root`` with every alias expanded, or None once it exceeds ``limit`` or an alias
    refers to itself; linear in the distinct nodes (each shared node is sized once)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int | None:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:  # a recursive alias (&a [*a]): infinite when expanded
            return None
        open_nodes.add(key)
        total = 1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        for child in children:
            sub = size(child)
            if sub is None:
                return None
            total += sub
            if total > limit:
                return None
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def load_yaml(text: str, location: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document safely: the data and its composed node tree (for line numbers).

    Aliases are allowed while the expanded document stays under :data:`MAX_YAML_NODES` values; an alias bomb
    or a recursive alias is refused before anything walks or validates the expanded data.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, MAX_YAML_NODES) is None:
            raise SpecError(f"YAML aliases expand to more than {MAX_YAML_NODES} values, or refer to themselves (an "
                            "alias bomb?): write the values out, or use anchors only for small repeated sections",
                            location=location)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    """Read a YAML mapping and its key-to-line index; malformed YAML names the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec file: {exc.strerror}", location=str(path)) from None
    try:
        data, node = load_yaml(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"malformed YAML: {problem}", location=where) from None
    if not isinstance(data, dict):
        raise SpecError("a spec must be a YAML mapping (key: value lines), not " + type(data).__name__, location=f"{path}:1")
    return data, (_line_index(node) if node is not None else {})
