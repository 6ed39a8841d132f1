"""Deterministic fingerprints of build inputs, with an explicit list of what they ignore.

A fingerprint is the sha256 of a canonical JSON encoding. Only plain JSON types (and the few types
listed in ``_canonical``) are accepted: anything else is refused rather than hashed by ``repr``,
so two different inputs can never collide through a lossy encoding.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

from vlmforge.specs.schema import BuildSpec

SPEC_IGNORED_FIELDS: frozenset[str] = frozenset({
    "validation.min_token_agreement",
    "validation.max_logit_error",
    "dialect",
})
"""Spec fields that never change what is built: thresholds only gate publishing, and the dialect only
changes how trtllm argv are written (the trtllm toolchain adds its release to the fingerprint itself)."""


def _canonical(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Enum):
        return _canonical(value.value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"fingerprint keys must be strings, got {sorted(map(type, value), key=str)}")
        return {key: _canonical(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    raise TypeError(f"cannot fingerprint a {type(value).__name__}: convert it to JSON types first")


def fingerprint(*parts: Any) -> str:
    """sha256 hex of the canonical JSON of ``parts``."""
    encoded = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode()).hexdigest()


def spec_for_fingerprint(spec: BuildSpec, *, ignore: frozenset[str] = SPEC_IGNORED_FIELDS) -> dict[str, Any]:
    """The spec as JSON with the ignored dotted fields removed."""
    data = spec.model_dump(mode="json")
    for dotted in ignore:
        *parents, leaf = dotted.split(".")
        target = data
        for parent in parents:
            target = target.get(parent, {})
        target.pop(leaf, None)
    return data
