"""``deploy --backend trtllm-serve`` from the store, on real tiny builds: with ``artifacts.hf_checkpoint`` the hf
build's engine directory carries the whole model as a Hugging Face folder (``hf/``, hard links to the convert stage's
checkpoint), the build is published to a local store and to S3 (moto), the dry run points at where the pull puts
``hf/``, a real deploy pulls it (and not the runner's llm/ and vision/) and checks it before any container starts (no
GPU, no TensorRT-LLM image here), and the pulled folder loads with transformers (or VILA's own loader) holding the
built model's weights. A vlmforge-runner deploy of the same build leaves ``hf/`` out of its pull. Builds without the
folder (the default, earlier versions) or of an architecture trtllm-serve does not serve multimodal are refused
before anything is pulled, naming the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.deploy import cli
from tests.helpers.net import free_port
from tests.helpers.runners import build_tiny, publish_tiny
from tests.helpers.store import new_manifest
from vlmforge.artifacts.engine_config import HF_CHECKPOINT_DIR, HF_CHECKPOINT_EXTRA, EngineConfig
from vlmforge.deploy.service import RUNNER_LEAVES_OUT, fetch_engine, plan_deploy
from vlmforge.deploy.sources import StoreSource
from vlmforge.deploy.trtllm_deploy import SERVE_LEAVES_OUT
from vlmforge.deploy.trtllm_serve import ServeLimits, check_checkpoint
from vlmforge.errors import DeployError
from vlmforge.families import get_family
from vlmforge.sources.base import DigestCache, hash_tree
from vlmforge.store import open_store
from vlmforge.store.keys import SUBSET

pytestmark = pytest.mark.slow
ON = {"artifacts": {"hf_checkpoint": True}}
"""The spec option that asks for hf/ (off by default)."""


@pytest.fixture(scope="module")
def tiny_vila_hf(build_workdir: Path, tiny_vila_engine: Path) -> Path:
    """tiny-vila with artifacts.hf_checkpoint (every stage but the engine's and validation reused)."""
    return build_tiny("tiny-vila", build_workdir, **ON)


def stage_dir(workdir: Path, model: str, stage: str) -> Path:
    (found,) = (workdir / model).glob(f"{stage}-*")
    return found


def assert_holds_the_built_weights(model: Any, source_dir: Path, family: Any, dtype: str) -> None:
    """Every tensor of ``model`` (loaded from hf/ in float32) is the source model's, stored in the spec's dtype."""
    import torch

    reference = family.load_model(source_dir, torch.float32).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        expected = value.to(getattr(torch, dtype)).float() if value.is_floating_point() else value
        assert torch.equal(loaded[key].float() if loaded[key].is_floating_point() else loaded[key], expected), key


def test_the_engine_directory_holds_the_whole_model_as_hard_links_hashed_once(tiny_vila_hf: Path,
                                                                            tiny_vila_engine: Path,
                                                                            build_workdir: Path) -> None:
    assert EngineConfig.read(tiny_vila_engine).hf_checkpoint is None and not (tiny_vila_engine / "hf").exists()
    config = EngineConfig.read(tiny_vila_hf)
    assert config.hf_checkpoint is not None and config.hf_checkpoint.path == HF_CHECKPOINT_DIR
    assert (config.hf_checkpoint.architecture, config.hf_checkpoint.dtype) == ("LlavaLlamaModel", "float16")
    checkpoint = stage_dir(build_workdir, "tiny-vila", "convert") / "checkpoint"
    folder = tiny_vila_hf / HF_CHECKPOINT_DIR
    files = sorted(p.relative_to(checkpoint) for p in checkpoint.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert all((folder / f).stat().st_ino == (checkpoint / f).stat().st_ino for f in files)  # links: no extra bytes
    digests = DigestCache()
    hash_tree(checkpoint, digests=digests)
    read = digests.hashed_bytes
    hash_tree(tiny_vila_hf, digests=digests)  # what the engine stage's record hashes after convert's
    assert digests.reused_bytes == sum((checkpoint / f).stat().st_size for f in files) and read > 0


def test_a_store_build_is_dry_run_then_pulled_checked_and_loaded_from_its_hf_folder(
        store_url: str, build_workdir: Path, tiny_vila_hf: Path, tmp_path: Path) -> None:
    engine, published = publish_tiny("tiny-vila", build_workdir, store_url, **ON)
    manifest = published.manifest
    paths = {f.path: f for f in manifest.files}
    assert f"{HF_CHECKPOINT_DIR}/config.json" in paths and manifest.extra[HF_CHECKPOINT_EXTRA]["path"] == "hf"
    unique = {f.sha256: f.size for f in manifest.files}  # hf/ repeats processor/'s tokenizer: one blob, sent once
    assert len(unique) < len(manifest.files) and published.uploaded_bytes == sum(unique.values())
    state, cache = tmp_path / "state", tmp_path / "cache"
    base = ("deploy", "tiny-vila", "--backend", "trtllm-serve", "--store", store_url)
    shown = cli(*base, "--dry-run", "--json", state=state, cache=cache)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    folder = cache / "engines" / "tiny-vila" / manifest.build_id / HF_CHECKPOINT_DIR
    assert f"{folder}:/models/tiny-vila:ro" in data["docker_run"]
    serve = data["command"][data["command"].index("trtllm-serve"):]
    assert data["command"][:3] == ["mpirun", "-n", "1"] and serve[1:3] == ["serve", "/models/tiny-vila"]
    assert serve[serve.index("--config") + 1] == "/etc/vlmforge/llm_api_options.yaml"
    options = yaml.safe_load(data["options_yaml"])
    assert (options["max_batch_size"], options["max_seq_len"]) == (manifest.spec["limits"]["max_batch_size"],
                                                                    manifest.derived["max_seq_len"])
    assert "LlavaLlamaModel" in data["checked"] and not folder.exists() and not state.exists()  # nothing pulled

    # A real deploy pulls (verified) and checks the folder before any container: VILA1.5 keeps its chat template in
    # code (conv_mode), not in the tokenizer, and trtllm-serve takes images through the chat API only.
    refused = cli(*base, state=state, cache=cache, env={"PATH": "/usr/bin:/bin"})
    assert refused.returncode == 2 and "has no chat template" in refused.stderr and "Traceback" not in refused.stderr
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == \
        {p.removeprefix("hf/") for p in paths if p.startswith("hf/")}
    root = folder.parent  # trtllm-serve's pull took hf/ and left the runner's llm/ and vision/ out
    assert not (root / "llm").exists() and not (root / "vision").exists() and SERVE_LEAVES_OUT == {"llm", "vision"}
    assert json.loads((root / SUBSET).read_text()) == ["llm", "vision"]
    with open_store(store_url) as store:  # the marker is respected: the next trtllm-serve pull reuses it
        again = store.pull_engine(manifest.ref, root, exclude=SERVE_LEAVES_OUT)
    assert again.reused and again.downloaded_files == 0
    with pytest.raises(DeployError, match="has no chat template"):
        check_checkpoint(folder, ServeLimits(max_batch_size=1, max_seq_len=512))
    family = get_family("vila")
    import torch

    model = family.load_model(folder, torch.float32)  # VILA1.5's layout: no transformers class, its own loader
    fetched = stage_dir(build_workdir, "tiny-vila", "fetch") / "model"
    assert_holds_the_built_weights(model, fetched, family, manifest.spec["dtype"])
    llm = family.llm_class().from_pretrained(engine / "llm", dtype=torch.float32)  # the validated LLM engine's
    for key, value in llm.state_dict().items():
        assert torch.equal(family.extract_llm(model).state_dict()[key], value), key


def test_a_transformers_family_folder_loads_with_auto_config_but_is_refused_before_the_pull(
        store_url: str, build_workdir: Path, tiny_engine: Path, tmp_path: Path) -> None:
    """tiny-llava (LLaVA-1.5) is no architecture of trtllm-serve's multimodal matrix: its hf/ is a whole
    transformers folder, and deploy refuses it from the manifest's record, before pulling anything."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    engine, published = publish_tiny("tiny-llava", build_workdir, store_url, **ON)
    manifest = published.manifest
    folder = engine / HF_CHECKPOINT_DIR
    assert AutoConfig.from_pretrained(folder).architectures == ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    fetched = stage_dir(build_workdir, "tiny-llava", "fetch") / "model"
    assert_holds_the_built_weights(model, fetched, get_family("llava"), manifest.spec["dtype"])
    done = cli("deploy", "tiny-llava", "--backend", "trtllm-serve", "--store", store_url, "--dry-run",
               state=tmp_path / "state", cache=tmp_path / "cache")
    assert done.returncode == 2 and "'LlavaForConditionalGeneration', which TensorRT-LLM" in done.stderr
    assert not (tmp_path / "cache").exists()


def test_a_build_without_the_folder_is_refused_naming_the_option(
        store_url: str, tiny_engine: Path, tmp_path: Path) -> None:
    """The default (artifacts.hf_checkpoint off) engine directory, as every earlier version wrote it."""
    assert EngineConfig.read(tiny_engine).hf_checkpoint is None and not (tiny_engine / HF_CHECKPOINT_DIR).exists()
    assert "hf_checkpoint" not in json.loads((tiny_engine / "engine.json").read_text())
    manifest = new_manifest("tiny-llava").model_copy(update={
        "toolchain": "hf", "spec": {"limits": {"max_batch_size": 2}, "parallel": {"tp": 1, "pp": 1}},
        "derived": {"max_seq_len": 512, "world_size": 1}})
    with open_store(store_url) as store:
        build_id = store.publish(tiny_engine, manifest).manifest.build_id
    done = cli("deploy", "tiny-llava", "--backend", "trtllm-serve", "--store", store_url, "--dry-run",
               state=tmp_path / "state", cache=tmp_path / "cache")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    said = " ".join(done.stderr.split())
    assert f"tiny-llava#{build_id} was built without it" in said
    assert "set artifacts.hf_checkpoint: true in the spec" in said and "and rebuild it" in said
    assert "--checkpoint-dir" in said and not (tmp_path / "cache").exists()


def test_a_vlmforge_runner_deploy_leaves_hf_out_of_its_pull(store_url: str, build_workdir: Path,
                                                          tiny_engine: Path, tmp_path: Path) -> None:
    _, published = publish_tiny("tiny-llava", build_workdir, store_url, **ON)
    manifest = published.manifest
    hf_files = [f for f in manifest.files if f.path.startswith("hf/")]
    assert hf_files and RUNNER_LEAVES_OUT == {HF_CHECKPOINT_DIR}
    source, cache = StoreSource(store_url), tmp_path / "cache"
    plan = plan_deploy(manifest.ref, source, port=free_port(), state_dir=tmp_path / "state")
    engine_dir = fetch_engine(plan, source, cache)  # what `deploy` (process or container launcher) pulls
    assert engine_dir == cache / "tiny-llava" / manifest.build_id and not (engine_dir / HF_CHECKPOINT_DIR).exists()
    assert (engine_dir / "llm").is_dir() and (engine_dir / "vision").is_dir()
    assert json.loads((engine_dir / SUBSET).read_text()) == [HF_CHECKPOINT_DIR]
    assert fetch_engine(plan, source, cache) == engine_dir  # the marker is respected: reused, not pulled again
    with open_store(store_url) as store:
        assert store.pull_engine(manifest.ref, engine_dir, exclude=RUNNER_LEAVES_OUT).reused
        (engine_dir / "llm" / "config.json").unlink()  # a missing needed file is repaired; hf/ still left out
        repaired = store.pull_engine(manifest.ref, engine_dir, exclude=RUNNER_LEAVES_OUT)
        assert repaired.repaired == ["llm/config.json is missing"] and repaired.excluded == [HF_CHECKPOINT_DIR]
        whole = store.pull_engine(manifest.ref, engine_dir)  # then trtllm-serve's needs: only hf/ is fetched
    fetched = {f.sha256: f.size for f in hf_files}
    assert whole.downloaded_bytes == sum(fetched.values())
    assert whole.downloaded_files == sum(1 for f in manifest.files if f.sha256 in fetched)  # shared blobs: all paths
    assert whole.resumed_files == len(manifest.files) - whole.downloaded_files
