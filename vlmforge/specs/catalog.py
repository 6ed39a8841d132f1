"""The model catalog: named, ready-to-build specs (catalog.yaml) and the MODEL_OR_SPEC lookup."""

from __future__ import annotations

import difflib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from vlmforge.errors import SpecError, UnknownModel
from vlmforge.specs.schema import BuildSpec, load_spec_file, merge_overrides, spec_from_dict
from vlmforge.specs.yaml_io import load_yaml, read_yaml


@cache
def _entries() -> dict[str, dict[str, Any]]:
    text = resources.files("vlmforge.specs").joinpath("catalog.yaml").read_text(encoding="utf-8")
    entries, _ = load_yaml(text, "vlmforge/specs/catalog.yaml")
    entries = entries or []
    return {entry["name"]: entry for entry in entries}


def catalog_names() -> list[str]:
    """Every catalog model name, in catalog order."""
    return list(_entries())


def catalog_entry(name: str) -> dict[str, Any]:
    """A copy of one catalog entry's spec mapping; an unknown name lists the closest ones."""
    entries = _entries()
    if name not in entries:
        lowered = {key.lower(): key for key in entries}
        if name.lower() in lowered:
            name = lowered[name.lower()]
        else:
            close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.4)
            hint = f"closest: {', '.join(close)}" if close else f"known models: {', '.join(entries)}"
            raise UnknownModel(f"unknown model {name!r}; {hint} (or pass a spec file path; `vlmforge models` lists all)")
    return merge_overrides(entries[name], {})


def catalog_specs() -> list[BuildSpec]:
    """Every catalog entry as a validated spec."""
    return [spec_from_dict(entry, origin=f"catalog:{name}") for name, entry in _entries().items()]


def load_model_or_spec(model_or_spec: str, overrides: dict[str, Any] | None = None) -> BuildSpec:
    """A catalog name or a YAML spec path, with dotted-key overrides applied, validated."""
    overrides = overrides or {}
    path = Path(model_or_spec)
    looks_like_file = path.suffix in (".yaml", ".yml", ".json") or "/" in model_or_spec
    if looks_like_file or path.is_file():
        if not path.is_file():
            raise SpecError(f"spec file not found: {path}", location=str(path))
        if not overrides:
            return load_spec_file(path)
        data, lines = read_yaml(path)
        return spec_from_dict(merge_overrides(data, overrides), origin=str(path), lines=lines)
    data = catalog_entry(model_or_spec)
    return spec_from_dict(merge_overrides(data, overrides), origin=f"catalog:{data['name']}")
