"""Helpers for the store tests: fake engine directories and manifests."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vlmforge.artifacts.manifest import EngineManifest, HardwareInfo, SourceInfo

T0 = datetime(2026, 11, 26, 5, 0, 0, tzinfo=UTC)


def payload(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def make_engine(root: Path, files: dict[str, bytes]) -> Path:
    """Create an engine directory with the given relative paths and contents."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def standard_files(seed: str, *, big: int = 1024 * 1024 + 12345) -> dict[str, bytes]:
    """A small TensorRT-LLM-like engine: a big rank engine (multipart), a visual engine and configs."""
    return {
        "config.json": b'{"architecture": "Qwen2VLForConditionalGeneration", "seed": "%s"}' % seed.encode(),
        "rank0.engine": payload(f"{seed}-rank0", big),
        "visual/visual_encoder.engine": payload("visual-unchanged", 300 * 1024),
        "tokenizer/tokenizer.json": payload("tokenizer", 4096),
        "empty.txt": b"",
    }


def new_manifest(model: str = "qwen2-vl-2b", *, minutes: int = 0, seed: str = "a") -> EngineManifest:
    """A manifest without files (publish hashes the directory), created ``minutes`` after T0."""
    fingerprint = hashlib.sha256(f"{model}-{seed}-{minutes}".encode()).hexdigest()
    return EngineManifest.create(
        model=model,
        fingerprint=fingerprint,
        created_at=T0 + timedelta(minutes=minutes),
        toolchain="trtllm",
        spec={"max_batch_size": 8, "dtype": "bfloat16"},
        derived={"tp": 1, "pp": 1},
        source=SourceInfo(uri="hf://Qwen/Qwen2-VL-2B-Instruct", revision="abc123"),
        versions={"tensorrt": "10.4.0", "tensorrt_llm": "0.14.0", "torch": "2.4.1"},
        hardware=HardwareInfo(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", gpu_count=1, cpu="x86_64"),
        world_size=1,
        validation={"smoke": "passed"},
        links={"prefect": "https://prefect.example/flow-runs/123"},
    )


def read_tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below ``root`` (skipping the store marker)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".vlmforge")
    }
