"""Runners in containers: ``vlmforge deploy --launcher docker`` starts the runner through a Docker daemon.

The process launcher (:func:`vlmforge.deploy.service.launch`) starts ``mpirun ... vlmforge serve`` as a child of
whoever deploys, which is right on a host and wrong inside a flow run's own container (the runner would
die with it). Here the runner is a long-lived container of its own, started and stopped through the
daemon (the flow's container reaches it through ``/var/run/docker.sock``):

- what can run is asked of the image, not of the deploying process: a throwaway container of the
  runner image describes its toolchains and the GPUs it is given (:func:`describe_image_machine`), so the
  build selection and refusals of :func:`vlmforge.deploy.service.plan_deploy` apply to where the runner will run;
- the container runs the same argv as the process launcher (``mpirun -n TP ...`` or ``python -m vlmforge
  serve`` for TP 1), with the engine directory mounted read-only at the same path (or the volumes given,
  e.g. the named cache volume a flow container shares), the port published, GPUs requested for TP > 1
  ranks, and ``init`` so signals reach the runner;
- health is probed at the container's own address (reachable from the host and from sibling containers),
  the endpoint recorded is the published ``host:port``;
- stopping drains as the process launcher does: SIGTERM to rank 0 (its pid file inside the container),
  then the daemon's stop after the timeout, then the container is removed;
- the deployment record is also a label of the container, so ``vlmforge deployments`` and ``undeploy`` on
  the host find runners that a flow run started from its own (short-lived) container.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from vlmforge.errors import DeployError

log = logging.getLogger(__name__)

RANK0_PID_FILE = Path("/tmp/vlmforge-rank0.pid")
"""Where rank 0 writes its pid inside the runner container."""
LABEL = "vlmforge.deployment"
RECORD_LABEL = "vlmforge.record"
"""The deployment record, kept on the container too: a flow run's container records the deployment in its own
state directory, which goes with it; the daemon still knows (``vlmforge deployments`` and ``undeploy`` ask it)."""


class DockerRunner(BaseModel):
    """How runner containers are made (``vlmforge deploy --launcher docker``, the ``deploy-runner`` flow)."""

    image: str = Field(min_length=1)
    """The runner image (containers/runner: vlmforge-runner:TAG on GPUs, vlmforge-runner-cpu:TAG on CPUs)."""
    volumes: list[str] = Field(default_factory=list)
    """Mounts as ``SOURCE:TARGET[:MODE]`` (a host path or a named volume). None given: the engine directory
    is bind-mounted read-only at its own path, which is right when deploying from the host; from a flow
    run's container, give the named cache volume it mounts (``vlmforge-cache:/var/cache/vlmforge``)."""
    network: str | None = None
    """A Docker network to attach the runner to (default: the daemon's bridge)."""
    shm_size: str = "2g"
    """Shared memory (NCCL between ranks uses it)."""


def docker_client() -> Any:
    try:
        import docker
    except ImportError:
        raise DeployError("--launcher docker needs the docker package: pip install 'vlmforge[docker]'") from None
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise DeployError(f"no Docker daemon answers ({exc}); start dockerd or set DOCKER_HOST") from None
    return client


def _require_image(client: Any, image: str) -> None:
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise DeployError(f"the runner image {image} is not on the Docker daemon: build it (infra/build-images.sh "
                          "runner, or runner-cpu) or pull it") from None


def _device_requests(gpus: int) -> list[Any]:
    import docker

    return [docker.types.DeviceRequest(count=gpus, capabilities=[["gpu"]])] if gpus else []


def describe_image_machine(runner: DockerRunner, gpus: int = -1, client: Any = None) -> Any:
    """The :class:`~vlmforge.deploy.service.Machine` a runner container sees: the image's toolchains and the GPUs the
    daemon gives it (``gpus``: -1 all, 0 none), asked of a throwaway container of the image."""
    from vlmforge.deploy.service import Machine

    client = client or docker_client()
    _require_image(client, runner.image)
    import docker

    code = "from vlmforge.deploy.service import describe_machine; print(describe_machine().model_dump_json())"
    try:
        out = client.containers.run(runner.image, ["python", "-c", code], remove=True, stdout=True, stderr=False,
                                    device_requests=_device_requests(gpus), environment={"PYTHONWARNINGS": "ignore"})
    except (docker.errors.ContainerError, docker.errors.APIError) as exc:  # the image cannot run vlmforge here
        raise DeployError(f"the runner image {runner.image} could not describe itself: {exc}") from None
    lines = out.decode().strip().splitlines()
    try:
        return Machine.model_validate_json(lines[-1])
    except (IndexError, ValueError):
        raise DeployError(f"the runner image {runner.image} printed no machine description: {out[-500:]!r}") from None


def container_name(name: str) -> str:
    return f"vlmforge-{name}"


def _address(container: Any, network: str | None) -> str:
    networks = container.attrs["NetworkSettings"].get("Networks") or {}
    if network and network in networks:
        return networks[network]["IPAddress"] or "127.0.0.1"
    for settings in networks.values():
        if settings.get("IPAddress"):
            return settings["IPAddress"]
    return "127.0.0.1"  # host networking


def _logs(container: Any, lines: int = 40) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace")
    except Exception:  # the container may be gone already
        return "(no logs)"


def _exited(container: Any) -> str | None:
    container.reload()
    if container.status in ("exited", "dead"):
        return f"the runner container {container.name} exited ({container.attrs['State'].get('ExitCode')})"
    return None


def launch_container(build: Any, engine_dir: Path, *, runner: DockerRunner, tp: int, host: str, port: int, name: str,
                     state_dir: Path, selection: str, source: str, serve_args: Sequence[str] = (),
                     wait_s: float = 600.0, gpus: bool = False, client: Any = None) -> Any:
    """Start the runner container, wait until it is healthy, and record the deployment."""
    import docker

    from vlmforge.deploy.service import Deployment, endpoint_url, launch_argv, record_path, wait_healthy

    client = client or docker_client()
    _require_image(client, runner.image)
    argv = launch_argv(engine_dir, tp=tp, host="0.0.0.0", port=port, model_name=build.model, pid_file=RANK0_PID_FILE,
                       gpus=gpus, serve_args=serve_args, python="python", env={}, master_port=29500)
    cname = container_name(name)
    try:
        stale = client.containers.get(cname)
    except docker.errors.NotFound:
        stale = None
    if stale is not None:
        if stale.status == "running":
            raise DeployError(f"a container {cname} is already running: `vlmforge undeploy {name}` or `docker rm -f "
                              f"{cname}`")
        stale.remove(force=True)
    volumes = runner.volumes or [f"{engine_dir}:{engine_dir}:ro"]
    endpoint = endpoint_url(host, port)
    record = Deployment(name=name, model=build.model, build_id=build.build_id, engine_dir=engine_dir,
                        endpoint=endpoint, host=host, port=port, tp=tp, pid=0, pid_file=RANK0_PID_FILE,
                        log=Path(f"docker logs {cname}"), argv=argv, source=source, selection=selection,
                        started_at=datetime.now(UTC), image=runner.image)
    log.info("starting container %s from %s: %s", cname, runner.image, " ".join(argv))
    try:
        container = client.containers.run(
            runner.image, argv, name=cname, detach=True, init=True, volumes=volumes,
            ports={f"{port}/tcp": ("0.0.0.0" if host in ("0.0.0.0", "") else host, port)},
            network=runner.network, shm_size=runner.shm_size, device_requests=_device_requests(tp if gpus else 0),
            environment={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
            labels={LABEL: name, "vlmforge.engine": build.ref, RECORD_LABEL: record.model_dump_json()})
    except docker.errors.APIError as exc:
        raise DeployError(f"the Docker daemon refused to start {cname}: {exc.explanation or exc}") from None
    container.reload()
    probe = f"http://{_address(container, runner.network)}:{port}"
    try:
        wait_healthy(probe, wait_s, died=lambda: _exited(container),
                     log_tail=lambda: f"(docker logs {cname})\n{_logs(container)}")
    except BaseException:
        container.remove(force=True)
        raise
    deployment = record.model_copy(update={"container": container.id, "probe": probe})
    state_dir.mkdir(parents=True, exist_ok=True)
    record_path(state_dir, name).write_text(deployment.model_dump_json(indent=2))
    return deployment


def container_deployments(client: Any = None) -> list[Any]:
    """The deployments recorded on this daemon's runner containers (none where no daemon answers)."""
    from vlmforge.deploy.service import Deployment

    try:
        client = client or docker_client()
    except DeployError:
        return []
    found = []
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        try:
            record = Deployment.model_validate_json(container.labels[RECORD_LABEL])
        except (KeyError, ValueError):
            log.warning("container %s has no readable vlmforge record", container.name)
            continue
        found.append(record.model_copy(update={"container": container.id, "probe": record.probe or
                                               f"http://{_address(container, None)}:{record.port}"}))
    return found


def _container(container_id: str, client: Any = None) -> Any:
    import docker

    client = client or docker_client()
    try:
        return client.containers.get(container_id)
    except docker.errors.NotFound:
        return None


def container_running(container_id: str) -> bool:
    container = _container(container_id)
    return container is not None and container.status == "running"


def stop_container(container_id: str, timeout: float) -> str:
    """SIGTERM to rank 0 inside the container (it drains and every rank exits), the daemon's stop if it is still
    running after ``timeout``; the container is removed. Returns what happened."""
    import requests

    container = _container(container_id)
    if container is None:
        return "was not running"
    how = "was not running"
    if container.status == "running":
        container.exec_run(["sh", "-c", f"kill -TERM $(cat {RANK0_PID_FILE}) 2>/dev/null || kill -TERM 1"])
        try:
            result = container.wait(timeout=timeout)
            how = "drained and stopped" if result.get("StatusCode") == 0 else \
                f"stopped (exit code {result.get('StatusCode')})"
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):  # still running
            container.stop(timeout=5)
            how = f"killed after {timeout:.0f}s without draining"
    container.remove(force=True)
    return how
