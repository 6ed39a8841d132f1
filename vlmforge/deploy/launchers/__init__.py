"""Launchers: how runners are started, found and stopped (:class:`~.base.Launcher`), and the one place that chooses
between the process launcher and the container launcher."""

from __future__ import annotations

from vlmforge.deploy.launchers.base import Launcher, LaunchRequest
from vlmforge.deploy.launchers.container import ContainerLauncher, DockerRunner
from vlmforge.deploy.launchers.process import ProcessLauncher
from vlmforge.deploy.records import Deployment, LauncherKind

__all__ = [
    "ContainerLauncher",
    "DockerRunner",
    "LaunchRequest",
    "Launcher",
    "ProcessLauncher",
    "all_launchers",
    "launcher_for",
    "launcher_of",
]


def launcher_for(docker: DockerRunner | None) -> Launcher:
    """The launcher of a new deployment: a container of ``docker.image``, else a process here."""
    return ProcessLauncher() if docker is None else ContainerLauncher(docker)


def launcher_of(deployment: Deployment) -> Launcher:
    """The launcher that started ``deployment`` (to check and stop it)."""
    return ContainerLauncher() if deployment.kind is LauncherKind.DOCKER else ProcessLauncher()


def all_launchers() -> list[Launcher]:
    """Every kind of launcher, to find the runners each knows of."""
    return [ProcessLauncher(), ContainerLauncher()]
