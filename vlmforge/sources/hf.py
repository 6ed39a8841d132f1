"""hf:// sources: Hugging Face Hub repositories pinned to a commit, verified, resumable, offline-capable."""

from __future__ import annotations

import os
from pathlib import Path

from vlmforge.errors import SourceError
from vlmforge.sources.base import FetchedSource, Source


class HfSource(Source):
    """hf://org/repo@revision. The token comes from HF_TOKEN (never logged); HF_HUB_OFFLINE=1 uses the cache."""

    @property
    def repo(self) -> str:
        return self.uri.location

    @property
    def requested(self) -> str:
        return self.uri.revision or "main"

    def _offline(self) -> bool:
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")

    def _info(self, revision: str | None = None):  # noqa: ANN202
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        wanted = revision or self.requested
        try:
            return HfApi().model_info(self.repo, revision=wanted, files_metadata=True)
        except RevisionNotFoundError:
            raise SourceError(f"unknown revision {wanted!r} of {self.repo}") from None
        except RepositoryNotFoundError:
            raise SourceError(f"unknown repository {self.repo} (or it is private: set HF_TOKEN)") from None
        except Exception as exc:  # the hub unreachable or failing (its HTTP client's errors vary by release):
            # one model's error, not the whole run's; the cause is kept (tasks retry network errors)
            raise SourceError(f"the Hugging Face hub did not answer for {self.repo}@{self.requested}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _cached_snapshot(self) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(self.repo, revision=self.requested, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            raise SourceError(
                f"{self.repo}@{self.requested} is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)"
            ) from None

    def resolve_revision(self) -> str:
        if self._offline():
            return self._cached_snapshot().name
        return self._info().sha

    def fetch(self, dest: Path, revision: str | None = None) -> FetchedSource:
        """``revision``: a commit sha is fetched as it is, even after the branch moved on."""
        import shutil

        from huggingface_hub import snapshot_download

        if self._offline():
            snapshot = self._cached_snapshot()
            self._check_pinned(revision, snapshot.name)
            shutil.copytree(snapshot, dest, dirs_exist_ok=True, symlinks=False)
            return self._finish(dest, snapshot.name)
        info = self._info(revision)
        snapshot_download(self.repo, revision=info.sha, local_dir=dest)
        for sibling in info.siblings or []:
            path = dest / sibling.rfilename
            if not path.is_file():
                raise SourceError(f"download of {self.repo}@{info.sha} lacks {sibling.rfilename}")
            if sibling.size is not None and path.stat().st_size != sibling.size:
                raise SourceError(f"corrupt download {sibling.rfilename}: size differs from the hub's {sibling.size}")
            lfs = getattr(sibling, "lfs", None)
            if lfs is not None and self.digests.sha256(path)[0] != lfs.sha256:  # _finish reuses this digest
                raise SourceError(f"corrupt download {sibling.rfilename}: sha256 differs from the hub's LFS pointer")
        shutil.rmtree(dest / ".cache", ignore_errors=True)
        return self._finish(dest, info.sha)
