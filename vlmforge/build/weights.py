"""Digests of parts of a checkpoint, read straight from its files (no torch, no model load).

The visual stage's fingerprint is the digest of what the visual engine is made of: the tensors under
the family's ``visual_weight_prefixes`` (name, dtype, shape and bytes, in name order, across every
safetensors file), config.json without the keys only the LLM reads, and the image processor's config.
New LLM weights leave that digest alone, so the visual engine is reused instead of exported again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlmforge.errors import SourceError

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
"""Image preprocessing settings (older checkpoints: preprocessor_config.json; transformers 5: processor_config.json)."""


class TensorInfo(BaseModel):
    """One tensor of a safetensors file: where its bytes are."""

    name: str
    file: str
    dtype: str
    shape: list[int]
    start: int
    """Absolute byte offset of the tensor's data in ``file``."""
    end: int


class PartDigest(BaseModel):
    """The digest of one part of a checkpoint and what went into it."""

    digest: str
    tensors: int
    tensor_bytes: int
    configs: list[str]
    """The config files (and, for config.json, the keys left out) that were hashed."""


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, JSON header) of a safetensors file (raises SourceError if it is not one)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length <= 0 or length > path.stat().st_size - 8:
                raise ValueError(f"header length {length} does not fit the file")
            return length, json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path.name}: not a readable safetensors file ({exc})") from None


def tensor_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of every ``*.safetensors`` file under ``model_dir``, by name."""
    index: dict[str, TensorInfo] = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        rel = path.relative_to(model_dir).as_posix()
        length, header = safetensors_header(path)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if name in index:
                raise SourceError(f"tensor {name} is in both {index[name].file} and {rel}")
            begin, end = meta["data_offsets"]
            index[name] = TensorInfo(name=name, file=rel, dtype=meta["dtype"], shape=list(meta["shape"]),
                                     start=8 + length + begin, end=8 + length + end)
    return index


def tensors_digest(model_dir: Path, prefixes: tuple[str, ...]) -> tuple[str, int, int]:
    """(sha256, tensor count, byte count) over the tensors whose names start with one of ``prefixes``.

    Each tensor adds its name, dtype, shape and the sha256 of its bytes, in name order, so the digest does
    not depend on how the tensors are sharded or ordered in the files.
    """
    index = tensor_index(model_dir)
    chosen = sorted(name for name in index if name.startswith(prefixes))
    outer = hashlib.sha256()
    total = 0
    handles: dict[str, Any] = {}
    try:
        for name in chosen:
            info = index[name]
            handle = handles.get(info.file) or handles.setdefault(info.file, (model_dir / info.file).open("rb"))
            handle.seek(info.start)
            inner = hashlib.sha256()
            remaining = info.end - info.start
            while remaining:
                chunk = handle.read(min(CHUNK, remaining))
                if not chunk:
                    raise SourceError(f"{info.file} is truncated inside tensor {name}")
                inner.update(chunk)
                remaining -= len(chunk)
            total += info.end - info.start
            outer.update(f"{name}\t{info.dtype}\t{info.shape}\t{inner.hexdigest()}\n".encode())
    finally:
        for handle in handles.values():
            handle.close()
    return outer.hexdigest(), len(chosen), total


def config_without(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """config.json as a mapping, without the top-level ``keys``."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"unreadable {path.name}: {exc}") from None
    if not isinstance(config, dict):
        raise SourceError(f"{path.name} is not a JSON object")
    return {key: value for key, value in config.items() if key not in keys}


def visual_inputs_digest(model_dir: Path, weight_prefixes: tuple[str, ...], llm_config_keys: tuple[str, ...],
                         config_files: tuple[str, ...] = ()) -> PartDigest | None:
    """The digest of everything the visual engine is built from, or None when it cannot be told apart.

    ``config_files``: more files (paths relative to ``model_dir``) hashed when present, e.g. the configs in a
    checkpoint's sub-folders.

    None (the caller then falls back to the whole checkpoint) when the family declares no prefixes or no
    tensor matches them (weights in another format, or a naming this code does not know).
    """
    if not weight_prefixes:
        return None
    digest, count, size = tensors_digest(model_dir, weight_prefixes)
    if count == 0:
        log.warning("no tensor in %s starts with %s: the visual engine's fingerprint falls back to the whole "
                    "checkpoint", model_dir, ", ".join(weight_prefixes))
        return None
    outer = hashlib.sha256(f"tensors {digest}\n".encode())
    configs = []
    config = config_without(model_dir / "config.json", llm_config_keys)
    outer.update(b"config.json " + json.dumps(config, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    configs.append("config.json" + (f" (without {', '.join(llm_config_keys)})" if llm_config_keys else ""))
    for name in (*PROCESSOR_CONFIGS, *config_files):
        path = model_dir / name
        if path.is_file():
            outer.update(f"{name} ".encode() + hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
            configs.append(name)
    return PartDigest(digest=outer.hexdigest(), tensors=count, tensor_bytes=size, configs=configs)
