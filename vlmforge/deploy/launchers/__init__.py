"""Launchers: how runners are started, found and stopped (:class:`~.base.Launcher`), and the one place that chooses
between the process launcher, the container launcher and the trtllm-serve launcher."""

from __future__ import annotations

from vlmforge.deploy.launchers.base import Launcher, LaunchRequest
from vlmforge.deploy.launchers.container import ContainerLauncher, DockerRunner
from vlmforge.deploy.launchers.process import ProcessLauncher
from vlmforge.deploy.launchers.trtllm import TrtllmServeLauncher, TrtllmServeRunner
from vlmforge.deploy.records import Deployment, LauncherKind, ServeBackend

__all__ = [
    "ContainerLauncher",
    "DockerRunner",
    "LaunchRequest",
    "Launcher",
    "ProcessLauncher",
    "TrtllmServeLauncher",
    "TrtllmServeRunner",
    "all_launchers",
    "launcher_for",
    "launcher_of",
]


def launcher_for(docker: DockerRunner | None, trtllm: TrtllmServeRunner | None = None) -> Launcher:
    """The launcher of a new deployment: trtllm-serve's container (``trtllm``), a runner container of
    ``docker.image``, else a process here."""
    if trtllm is not None:
        return TrtllmServeLauncher(trtllm)
    return ProcessLauncher() if docker is None else ContainerLauncher(docker)


def launcher_of(deployment: Deployment) -> Launcher:
    """The launcher that started ``deployment`` (to check and stop it)."""
    if deployment.backend is ServeBackend.TRTLLM_SERVE:
        return TrtllmServeLauncher()
    return ContainerLauncher() if deployment.kind is LauncherKind.DOCKER else ProcessLauncher()


def all_launchers() -> list[Launcher]:
    """Every kind of launcher, to find the runners each knows of."""
    return [ProcessLauncher(), ContainerLauncher()]
