"""Where deploy finds builds: the artifact store (:class:`StoreSource`, the only code of deploy that calls it) or a
local engine directory deployed as it is (:class:`LocalEngineSource`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from vlmforge.deploy.machine import BuildInfo
from vlmforge.errors import DeployError


class BuildSource(Protocol):
    """Where deploy finds builds and gets their engine directories."""

    def candidates(self, ref: str) -> list[BuildInfo]: ...

    def pull(self, build: BuildInfo, cache_dir: Path, *, exclude: frozenset[str] = frozenset()) -> Path:
        """The build's directory; ``exclude``: top-level folders of it the backend never reads (a store pull leaves
        them out; a local directory is taken as it is)."""
        ...

    def describe(self) -> str: ...


def is_exact(ref: str) -> bool:
    """``MODEL@ALIAS`` and ``MODEL#BUILD_ID`` name one build; a bare ``MODEL`` lets deploy choose."""
    return "@" in ref or "#" in ref


class StoreSource:
    """The artifact store (``vlmforge.store``): the only code here that calls it."""

    def __init__(self, url: str | None) -> None:
        self.url = url

    def describe(self) -> str:
        return f"store {self.url or '(default)'}"

    def _open(self) -> Any:
        from vlmforge.store import open_store

        return open_store(self.url)

    def candidates(self, ref: str) -> list[BuildInfo]:
        with self._open() as store:
            if is_exact(ref):
                return [BuildInfo.from_manifest(store.resolve(ref))]
            manifests = store.manifests(ref)
            if not manifests:
                raise DeployError(f"no builds of {ref!r} in {store.url}: `vlmforge store ls` lists what is there")
            return [BuildInfo.from_manifest(manifest) for manifest in manifests]

    def pull(self, build: BuildInfo, cache_dir: Path, *, exclude: frozenset[str] = frozenset()) -> Path:
        dest = cache_dir / build.model / build.build_id
        with self._open() as store:  # verified and atomic; a no-op when dest holds what is needed of this build
            store.pull(build.ref, dest, exclude=exclude)
        return dest


class LocalEngineSource:
    """An engine directory on this machine, deployed as it is (no store, nothing pulled)."""

    def __init__(self, engine_dir: Path) -> None:
        self.engine_dir = Path(engine_dir).resolve()

    def describe(self) -> str:
        return f"engine directory {self.engine_dir}"

    def candidates(self, ref: str) -> list[BuildInfo]:
        build = BuildInfo.from_engine_dir(self.engine_dir)
        model = ref.split("@")[0].split("#")[0]
        if model and model != build.model:
            raise DeployError(f"{self.engine_dir} holds an engine of {build.model}, not {model}")
        return [build]

    def pull(self, build: BuildInfo, cache_dir: Path, *, exclude: frozenset[str] = frozenset()) -> Path:
        return self.engine_dir


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLMFORGE_CACHE", "~/.cache/vlmforge")).expanduser() / "engines"

