"""Model family registry: each family module registers itself where it is defined.

Every module in this package is imported on first lookup, so adding a family means adding
one module here (and its catalog entries) and touching nothing else. :func:`resolve` joins a
spec to its family and the values derived from both (:func:`vlmforge.specs.derived.derive`).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache

from vlmforge.errors import SpecError
from vlmforge.families.base import ModelFamily
from vlmforge.specs.derived import Derived, derive
from vlmforge.specs.schema import BuildSpec

NOT_FAMILIES = frozenset({"base", "contract", "release_llm", "tinykit", "vila_config", "vila_model", "vila_tiny"})
"""Modules of this package that hold no family (shared code)."""

_REGISTRY: dict[str, type[ModelFamily]] = {}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family known under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"model family {cls.name!r} registered twice ({_REGISTRY[cls.name]} and {cls})")
    _REGISTRY[cls.name] = cls
    return cls


@cache
def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in NOT_FAMILIES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def family_names() -> list[str]:
    """Names of all registered families, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; an unknown name is a :class:`SpecError` listing the known ones."""
    _load_all()
    try:
        return _REGISTRY[name]()
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise SpecError(
            f"unknown model family {name!r}: {hint}known families: {', '.join(sorted(_REGISTRY))}", path="family"
        ) from None


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec with its family and derived values."""

    spec: BuildSpec
    family: ModelFamily
    derived: Derived


def resolve(spec: BuildSpec, *, visual_builder_default_batch: int = 4) -> ResolvedSpec:
    """The spec's family and derived values, every rule checked; a :class:`SpecError` names path and fix."""
    family = get_family(spec.family)
    derived = derive(spec, family, visual_builder_default_batch=visual_builder_default_batch)
    return ResolvedSpec(spec=spec, family=family, derived=derived)


__all__ = ["ModelFamily", "ResolvedSpec", "family_names", "get_family", "register_family", "resolve"]
