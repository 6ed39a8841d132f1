"""Reading the store: resolve refs, list models and builds, read manifests and alias records (validated)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from vlmforge.artifacts.manifest import EngineManifest, check_name
from vlmforge.errors import IntegrityError, NotFound
from vlmforge.store.backend import StoreBackend
from vlmforge.store.keys import DEFAULT_ALIAS, alias_key, build_key, checked_name
from vlmforge.store.records import AliasRecord
from vlmforge.store.refs import Ref
from vlmforge.store.results import BuildSummary, ModelSummary

logger = logging.getLogger(__name__)

Refused = tuple[str, str]
"""(key, reason) of a stored record that was refused."""


class StoreReader(StoreBackend):
    """Read-only operations; nothing here writes or needs a lock."""

    def resolve(self, ref: str | Ref) -> EngineManifest:
        """The manifest a ref points to; raise NotFound (with what exists) or IntegrityError (refused record)."""
        parsed = Ref.parse(ref)
        if parsed.build_id is not None:
            return self._read_manifest(parsed.model, parsed.build_id)
        alias = parsed.target_alias or DEFAULT_ALIAS
        record = self.get_alias(parsed.model, alias)
        if record is None:
            known = sorted(self._alias_targets(parsed.model))
            if not known and not self._build_ids(parsed.model):
                raise NotFound(f"model {parsed.model!r} not found in {self.url}")
            hint = f"; aliases: {', '.join(known)}" if known else "; use MODEL#BUILD_ID (see `store ls MODEL`)"
            raise NotFound(f"model {parsed.model!r} has no alias {alias!r}{hint}")
        try:
            return self._read_manifest(parsed.model, record.build_id)
        except NotFound:
            raise NotFound(
                f"alias {parsed.model}@{alias} points to build {record.build_id}, which no longer exists"
            ) from None

    def get_alias(self, model: str, alias: str) -> AliasRecord | None:
        """The alias record, or None if the alias does not exist; IntegrityError if the record is refused."""
        return self._read_alias(checked_name(model, "model name"), checked_name(alias, "alias"))[0]

    def list_models(self) -> list[ModelSummary]:
        """Every model in the store with its build count and aliases (refused alias records are skipped, logged)."""
        out = []
        for model in sorted(self._children("models/")):
            try:
                check_name(model, "model name")
            except ValueError:
                logger.warning("ignoring unexpected entry models/%s in %s", model, self.url)
                continue
            builds = len(self._build_ids(model))
            out.append(ModelSummary(model=model, builds=builds, aliases=self._alias_targets(model)))
        return out

    def list_builds(self, model: str | None = None) -> list[BuildSummary]:
        """Builds of one model (or all), newest first per model; unreadable records are skipped with a warning."""
        models = [checked_name(model, "model name")] if model is not None else [m.model for m in self.list_models()]
        out: list[BuildSummary] = []
        for name in models:
            aliases_of: dict[str, list[str]] = {}
            for alias, build_id in sorted(self._alias_targets(name).items()):
                aliases_of.setdefault(build_id, []).append(alias)
            manifests, refused = self._read_manifests(name, self._build_ids(name))
            for key, reason in refused:
                logger.warning("skipping %s: %s", key, reason)
            for m in sorted(manifests, key=EngineManifest.sort_key, reverse=True):
                out.append(
                    BuildSummary(
                        model=m.model,
                        build_id=m.build_id,
                        created_at=m.created_at,
                        toolchain=m.toolchain,
                        files=len(m.files),
                        size=m.total_size,
                        aliases=aliases_of.get(m.build_id, []),
                        gpu_name=m.hardware.gpu_name,
                        compute_capability=m.hardware.compute_capability,
                        world_size=m.world_size,
                        fingerprint=m.fingerprint,
                    )
                )
        return out

    def manifests(self, model: str) -> list[EngineManifest]:
        """Every readable manifest of ``model``, newest first (unreadable ones are skipped with a warning)."""
        ids = self._build_ids(checked_name(model, "model name"))  # one listing of this model's builds only
        if not ids:
            return []
        manifests, refused = self._read_manifests(model, ids)
        for key, reason in refused:
            logger.warning("skipping %s: %s", key, reason)
        return sorted(manifests, key=EngineManifest.sort_key, reverse=True)

    def find_by_fingerprint(self, model: str, fingerprint: str) -> EngineManifest | None:
        """The newest build of ``model`` with this fingerprint: a rebuild of the same inputs publishes nothing new."""
        return next((m for m in self.manifests(model) if m.fingerprint == fingerprint), None)

    def _read_manifest(self, model: str, build_id: str) -> EngineManifest:
        key = build_key(model, build_id)
        try:
            data, _ = self._get(key)
        except NotFound:
            raise NotFound(f"build {model}#{build_id} not found in {self.url}") from None
        manifest = EngineManifest.from_json(data, where=f"manifest {key}")
        if manifest.model != model or manifest.build_id != build_id:
            raise IntegrityError(f"refused manifest {key}: it describes {manifest.ref}, not {model}#{build_id}")
        return manifest

    def _read_manifests(self, model: str, build_ids: Iterable[str]) -> tuple[list[EngineManifest], list[Refused]]:
        def one(build_id: str) -> EngineManifest | Refused:
            try:
                return self._read_manifest(model, build_id)
            except (IntegrityError, NotFound) as exc:
                return (build_key(model, build_id), str(exc))

        ids = list(build_ids)
        if not ids:
            return [], []
        with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
            results = list(pool.map(one, ids))
        manifests = [r for r in results if isinstance(r, EngineManifest)]
        refused = [r for r in results if isinstance(r, tuple)]
        return manifests, refused

    def _build_ids(self, model: str) -> list[str]:
        """Build ids of ``model`` as listed; a key that is not a valid build id is kept, so reading it refuses it."""
        prefix = f"models/{model}/builds/"
        return sorted(
            info.key[len(prefix) : -len(".json")]
            for info in self._list(prefix)
            if info.key.endswith(".json") and "/" not in info.key[len(prefix) :]
        )

    def _aliases(self, model: str) -> tuple[dict[str, AliasRecord], list[Refused]]:
        """Every alias record of ``model`` that validates, and (key, reason) of those refused."""
        prefix = f"models/{model}/aliases/"
        records: dict[str, AliasRecord] = {}
        refused: list[Refused] = []
        for info in self._list(prefix):
            name = info.key[len(prefix) :]
            if not name.endswith(".json") or "/" in name:
                continue
            alias = name[: -len(".json")]
            try:
                check_name(alias, "alias")
                record, _ = self._read_alias(model, alias)
            except (IntegrityError, ValueError) as exc:
                refused.append((info.key, str(exc)))
                continue
            if record is not None:
                records[alias] = record
        return records, refused

    def _alias_targets(self, model: str) -> dict[str, str]:
        """alias -> build id of ``model``; refused alias records are skipped with a warning naming them."""
        records, refused = self._aliases(model)
        for key, reason in refused:
            logger.warning("skipping %s: %s", key, reason)
        return {alias: record.build_id for alias, record in records.items()}

    def _read_alias(self, model: str, alias: str) -> tuple[AliasRecord | None, str | None]:
        key = alias_key(model, alias)
        try:
            data, version = self._get(key)
        except NotFound:
            return None, None
        return AliasRecord.from_json(data, key=key, model=model, alias=alias), version
