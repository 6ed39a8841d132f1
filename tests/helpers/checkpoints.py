"""Checkpoints and builds for the watch tests and benchmark: new LLM weights with the vision part kept, or
broken LLM weights, written in place (safetensors kept); uploads to an s3:// source prefix; specs, and
published builds for revision checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmforge.build.pipeline import engine_manifest
from vlmforge.families import resolve
from vlmforge.families.base import ModelFamily
from vlmforge.sources import hash_tree
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import BuildSpec, spec_from_dict
from vlmforge.store import open_store


def rewrite_llm_tensors(model_dir: Path, family: ModelFamily, edit: Callable[[str, torch.Tensor], torch.Tensor]) -> int:
    """Apply ``edit`` to every tensor outside the family's visual prefixes, in every safetensors file of the checkpoint
    (sub-folders too: VILA1.5 keeps its LLM in llm/); the number of tensors edited."""
    edited = 0
    for path in sorted(model_dir.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            if not name.startswith(family.visual_weight_prefixes):
                tensors[name] = edit(name, tensor).contiguous()
                edited += 1
        save_file(tensors, str(path), metadata=metadata)
    return edited


def new_llm_weights(model_dir: Path, family: ModelFamily, seed: int, scale: float = 0.002) -> int:
    """A fine-tuned-looking LLM: small noise on every LLM float tensor (the vision tensors are left byte-identical).

    Small: the random tiny models have near-ties that float16 may break the other way, and larger noise makes
    new ones (with 0.01, seed 101 failed validation on tiny-llava: token agreement 0.75)."""
    generator = torch.Generator().manual_seed(seed)

    def edit(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        return tensor + (scale * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype)

    return rewrite_llm_tensors(model_dir, family, edit)


def broken_llm_weights(model_dir: Path, family: ModelFamily) -> int:
    """Loadable weights that fail validation: an LM head beyond float16's range (the fp16 engine's logits overflow)."""
    return rewrite_llm_tensors(model_dir, family, lambda name, t: t * 1e5 if "lm_head" in name else t)


def upload(model_dir: Path, bucket: str, prefix: str) -> list[str]:
    """Upload every file of ``model_dir`` under s3://bucket/prefix/ (replacing what is there); the keys."""
    import boto3

    client = boto3.client("s3")
    keys = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(model_dir).as_posix()}"
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def directory_checkpoint(root: Path, content: str = "v1") -> Path:
    """A directory source: file:// revisions are content digests, so any file will do for revision checks."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"model_type": "llava"}')
    (root / "weights.bin").write_text(content)
    return root


def tiny_llava_spec(name: str, source: str) -> BuildSpec:
    data = catalog_entry("tiny-llava")
    data.update(name=name, source=source)
    return spec_from_dict(data)


def spec_file(path: Path, name: str, source: str) -> Path:
    path.write_text(yaml.safe_dump(tiny_llava_spec(name, source).model_dump(mode="json")))
    return path


def publish_build(store_url: str, spec: BuildSpec, revision: str, tmp_path: Path, source: str | None = None) -> str:
    """Publish a build of ``spec`` from ``revision`` (a one-file engine: revision checks read only manifests)."""
    engine = tmp_path / f"engine-{revision[-8:]}"
    engine.mkdir()
    (engine / "engine.json").write_text(revision)
    if source is not None:
        spec = spec.model_copy(update={"source": source})
    manifest = engine_manifest(spec, resolve(spec).derived, toolchain="hf", source_revision=revision,
                               files=hash_tree(engine), validation={"passed": True})
    with open_store(store_url) as store:
        return store.publish(engine, manifest).manifest.build_id
