"""Errors a user can act on; everything else is a bug and keeps its traceback."""

from __future__ import annotations


class VlmforgeError(Exception):
    """Base for errors a user can act on; the CLI prints the message and exits with code 2."""


class SpecError(VlmforgeError):
    """A build spec is invalid: names the dotted YAML path, the bad value and the fix."""

    def __init__(self, message: str, *, path: str | None = None, location: str | None = None) -> None:
        self.path = path
        self.location = location
        prefix = ""
        if location:
            prefix += f"{location}: "
        if path:
            prefix += f"{path}: "
        super().__init__(prefix + message)
        self.message = message


class UnknownModel(SpecError):
    """A catalog name that does not exist."""


class PlanError(VlmforgeError):
    """The spec is valid but the chosen dialect or toolchain cannot build it."""


class SourceError(VlmforgeError):
    """A model source cannot be resolved, downloaded or verified."""


class SourceMoved(SourceError):
    """The source no longer holds the revision the build resolved (it moved on between resolve and fetch)."""


class BuildError(VlmforgeError):
    """A build stage failed (the message names the stage and the cause)."""


class ValidationFailed(BuildError):
    """A built engine did not meet the spec's validation thresholds; nothing is published."""


class ToolchainUnavailable(VlmforgeError):
    """The requested toolchain (e.g. TensorRT-LLM) is not installed where this runs."""


class StoreError(VlmforgeError):
    """The artifact store refused or failed an operation."""


class StoreConflict(StoreError):
    """A compare-and-swap on an alias lost to another writer."""


class IntegrityError(StoreError):
    """A file or manifest failed verification (sha256, size, unsafe path)."""


class NotFound(StoreError):
    """A model, build or alias is not in the store."""


class DeployError(VlmforgeError):
    """An engine cannot be deployed on this machine (the message says why)."""
