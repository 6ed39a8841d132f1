"""The published-build check (`vlmforge build`'s no-op in seconds): a stored build is reported only when the flow
would produce exactly it, from the same spec, source revision and libraries, with the aliases asked for in place.

One real tiny LLaVA is built once (core pipeline, no Prefect) from a local checkpoint directory, then published
into a real store on each backend (a local directory, and S3 on the moto server)."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlmforge.build.pipeline import BUILD_KEY, HfPipeline
from vlmforge.build.publish import publish_engine
from vlmforge.build.published import build_keys, find_published
from vlmforge.build.revisions import RevisionMemo
from vlmforge.build.workdir import StageOutcome, Workdir
from vlmforge.errors import SourceError
from vlmforge.families import get_family
from vlmforge.sources import open_source
from vlmforge.specs.schema import BuildSpec, Toolchain, spec_from_dict
from vlmforge.store import open_store

pytestmark = pytest.mark.slow


def local_spec(source: Path, **changes: object) -> BuildSpec:
    data = {"name": "local-llava", "family": "llava", "source": f"file://{source}", "dtype": "float16",
            "limits": {"max_batch_size": 1, "max_input_len": 128, "max_output_len": 32},
            "architecture": {"num_visual_features": 16, "num_attention_heads": 4},
            "validation": {"max_new_tokens": 8, "min_token_agreement": 0.8, "max_logit_error": 0.05}}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})  # type: ignore[assignment]
        target[leaf] = value  # type: ignore[index]
    return spec_from_dict(data)


@dataclass
class Built:
    source: Path
    workdir: Path
    pipeline: HfPipeline
    fetched: StageOutcome
    engine: StageOutcome
    validation: StageOutcome

    def publish(self, store_url: str, aliases: tuple[str, ...] = ("latest",), **extra: object) -> object:
        manifest = self.pipeline.manifest(self.fetched, self.engine, self.validation)
        if extra:
            manifest = manifest.model_copy(update=extra)
        return publish_engine(store_url, self.engine.path, manifest, aliases=aliases)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("published")
    source = root / "checkpoint"
    get_family("llava").make_tiny(source)
    pipeline = HfPipeline(local_spec(source), Workdir(root / "work"), on_event=lambda line: None)
    return Built(source, root / "work", pipeline, *pipeline.run())


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    import boto3

    request.getfixturevalue("aws_env")
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/engines"


def check(built: Built, store_url: str, spec: BuildSpec | None = None, aliases: tuple[str, ...] = ("latest",)):
    return find_published(spec or built.pipeline.spec, Toolchain.HF, store_url=store_url, workdir=built.workdir,
                          aliases=aliases)


def test_the_key_known_before_the_build_is_the_one_the_build_records(built: Built, store_url: str) -> None:
    assert check(built, store_url) is None  # nothing published yet (on S3: the bucket has no store yet)
    published = built.publish(store_url).manifest
    revision = open_source(built.pipeline.spec.source).resolve_revision()
    assert published.extra[BUILD_KEY] == build_keys(built.pipeline.spec, Toolchain.HF, built.workdir)(revision)
    found = check(built, store_url)
    assert found is not None and found.manifest.build_id == published.build_id
    assert found.aliases == {"latest": published.build_id}
    summary = found.summary(Toolchain.HF)
    assert summary["created"] is False and summary["fingerprint"] == published.fingerprint
    assert summary["manifest_url"].endswith(f"models/local-llava/builds/{published.build_id}.json")


def test_an_alias_that_would_move_means_the_flow_runs(built: Built, store_url: str) -> None:
    build_id = built.publish(store_url).manifest.build_id
    assert check(built, store_url, aliases=("latest", "prod")) is None  # publishing would move prod
    built.publish(store_url, aliases=("prod",))
    assert check(built, store_url, aliases=("latest", "prod")).aliases == {"latest": build_id, "prod": build_id}


def test_an_alias_on_a_newer_build_stays_where_publishing_keeps_it(built: Built, store_url: str) -> None:
    older = built.publish(store_url).manifest
    newer = built.pipeline.manifest(built.fetched, built.engine, built.validation)
    newer = newer.model_copy(update={"fingerprint": "f" * 64, "build_id": newer.build_id[:-8] + "ffffffff",
                                     "extra": {}, "created_at": older.created_at.replace(year=older.created_at.year + 1)})
    with open_store(store_url) as store:
        store.publish(built.engine.path, newer)
    found = check(built, store_url)
    assert found is not None and found.manifest.build_id == older.build_id
    assert found.aliases == {"latest": newer.build_id}


def test_a_changed_spec_or_validation_is_not_published(built: Built, store_url: str) -> None:
    built.publish(store_url)
    recorded = built.validation.result
    assert check(built, store_url, local_spec(built.source, **{"limits.max_output_len": 16})) is None
    assert check(built, store_url, local_spec(built.source, **{"validation.max_new_tokens": 4})) is None
    assert check(built, store_url, local_spec(built.source, **{"validation.input_text": "Which city?"})) is None
    # Thresholds only gate publishing: the stored build answers for those its recorded figures meet, not the others.
    met = {"validation.min_token_agreement": recorded["token_agreement"],
           "validation.max_logit_error": recorded["max_logit_error"]}
    assert check(built, store_url, local_spec(built.source, **met)) is not None
    if recorded["max_logit_error"] > 0:
        missed = local_spec(built.source, **{"validation.max_logit_error": recorded["max_logit_error"] / 2})
        assert check(built, store_url, missed) is None
    if recorded["token_agreement"] < 1:
        missed = local_spec(built.source, **{"validation.min_token_agreement": 1.0})
        assert check(built, store_url, missed) is None


def test_a_threshold_only_change_is_validated_once_then_published(built: Built, store_url: str) -> None:
    """The defect: after a threshold-only change, every build reran the flow. The flow reused the engine and
    validated again, but publishing kept the stored build of the same engine fingerprint, whose recorded key holds
    the old thresholds, while the check looked for the key of the new ones: it never matched again."""
    first = built.publish(store_url).manifest
    stricter = local_spec(built.source, **{"validation.min_token_agreement": built.validation.result["token_agreement"]})
    assert stricter.validation != built.pipeline.spec.validation
    pipeline = HfPipeline(stricter, Workdir(built.workdir), on_event=lambda line: None)
    fetched, engine, validation = pipeline.run()  # what the flow runs: every stage reused but validate (once)
    assert engine.skipped and validation.result["passed"] is True
    outcome = publish_engine(store_url, engine.path, pipeline.manifest(fetched, engine, validation))
    assert outcome.created is False and outcome.manifest.build_id == first.build_id
    found = check(built, store_url, stricter)  # the next build of the stricter spec is a no-op
    assert found is not None and found.manifest.build_id == first.build_id
    assert found.key == build_keys(stricter, Toolchain.HF, built.workdir)(first.source.revision)
    assert check(built, store_url) is not None  # and the original spec's still is
    # The dialect only changes how TensorRT-LLM commands are written: the hf build is the same.
    assert check(built, store_url, local_spec(built.source, dialect="0.9")) is not None


def test_a_source_that_moved_on_is_not_published(built: Built, store_url: str) -> None:
    built.publish(store_url)
    config = built.source / "config.json"
    before = config.read_text()
    try:
        config.write_text(before.replace("}", ', "vlmforge_test": 1}', 1))
        assert check(built, store_url) is None
    finally:
        config.write_text(before)
    assert check(built, store_url) is not None
    moved = local_spec(built.source.parent / "elsewhere")  # the source is part of the build's fingerprint
    shutil.copytree(built.source, built.source.parent / "elsewhere", dirs_exist_ok=True)
    assert check(built, store_url, moved) is None


def test_the_source_is_resolved_only_when_a_stored_build_could_match(built: Built, store_url: str) -> None:
    missing = local_spec(built.source.parent / "missing")  # resolving this source fails
    assert check(built, store_url, missing) is None  # no store yet: nothing to resolve
    built.publish(store_url)
    assert check(built, store_url, missing) is None  # another source than the stored build's: nothing to resolve
    hidden = built.source.with_name("hidden")
    built.source.rename(hidden)
    try:
        with pytest.raises(SourceError, match="source directory not found"):
            check(built, store_url)  # a stored build could match: the source is resolved, and the failure said
    finally:
        hidden.rename(built.source)


def test_a_manifest_without_a_key_never_matches(built: Built, store_url: str) -> None:
    manifest = built.pipeline.manifest(built.fetched, built.engine, built.validation)
    with open_store(store_url) as store:
        store.publish(built.engine.path, manifest.model_copy(update={"extra": {}}))
    assert check(built, store_url) is None


def test_a_tiny_revision_is_remembered_per_installation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = open_source("tiny://llava")
    memo = RevisionMemo(tmp_path)
    assert memo.recall(source) is None
    memo.remember(source, "tiny-sha256:" + "a" * 64)
    assert memo.resolve(source) == "tiny-sha256:" + "a" * 64
    # Another vlmforge, library or machine: the generated files may differ, so the memo does not answer.
    monkeypatch.setattr("vlmforge.system.env.installation_digest", lambda: "another installation")
    assert memo.recall(source) is None
    assert open_source(f"file://{tmp_path}").revision_key() is None  # a directory is hashed every time
