"""The container launcher: the runner as a container of its own, through a Docker daemon (``vlmforge deploy
--launcher docker``, prefect.yaml's deploy-runner deployments).

The process launcher (:mod:`.process`) starts ``mpirun ... vlmforge serve`` as a child of whoever deploys, which is
right on a host and wrong inside a flow run's own container (the runner would die with it). Here the runner is a
long-lived container of its own, started and stopped through the daemon (the flow's container reaches it through
``/var/run/docker.sock``):

- what can run is asked of the image, not of the deploying process: a throwaway container of the runner image
  describes its toolchains and the GPUs it is given (:func:`describe_image_machine`), so build selection and
  refusals apply to where the runner will run;
- the container runs the same argv as the process launcher (``mpirun -n TP ...`` or ``python -m vlmforge serve``
  for TP 1), with the engine directory mounted read-only at the same path (or the volumes given, e.g. the named
  cache volume a flow container shares), the port published, GPUs requested for TP > 1 ranks, and ``init`` so
  signals reach the runner;
- the API key is in the container's environment (``docker inspect`` shows it to whoever may use the daemon, who
  is root on the host anyway); under mpirun only rank 0 keeps it; the record and labels keep its fingerprint only;
- health is probed at the container's own address (reachable from the host and from sibling containers), the
  endpoint recorded is the published ``host:port``;
- stopping drains as the process launcher does: SIGTERM to rank 0 (its pid file inside the container), then the
  daemon's stop after the timeout, then the container is removed;
- the deployment record is also a label of the container, so ``vlmforge deployments`` and ``undeploy`` on the host
  find runners that a flow run started from its own (short-lived) container.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

from vlmforge.deploy.auth import API_KEY_ENV
from vlmforge.deploy.launchers.base import LaunchRequest, endpoint_url, wait_healthy
from vlmforge.deploy.launchers.process import launch_argv
from vlmforge.deploy.machine import Machine
from vlmforge.deploy.records import Deployment, LauncherKind, write_record
from vlmforge.errors import DeployError

R = TypeVar("R")

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



class DockerLauncher(Generic[R]):
    """A launcher over the Docker daemon: ``runner`` says what to start (None to find, check and stop only);
    the client is made on first use (``client``: one given, for tests)."""

    kind = LauncherKind.DOCKER

    def __init__(self, runner: R | None = None, client: Any = None) -> None:
        self.runner = runner
        self._client = client

    def _docker(self) -> Any:
        if self._client is None:
            self._client = docker_client()
        return self._client


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


def describe_image_machine(runner: DockerRunner, gpus: int = -1, client: Any = None) -> Machine:
    """The :class:`~vlmforge.deploy.machine.Machine` a runner container sees: the image's toolchains and the GPUs
    the daemon gives it (``gpus``: -1 all, 0 none), asked of a throwaway container of the image."""
    client = client or docker_client()
    _require_image(client, runner.image)
    import docker

    code = "from vlmforge.deploy.machine import describe_machine; print(describe_machine().model_dump_json())"
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
    except Exception:  # noqa: BLE001 - the container may be gone already
        return "(no logs)"


def _exited(container: Any) -> str | None:
    container.reload()
    if container.status in ("exited", "dead"):
        return f"the runner container {container.name} exited ({container.attrs['State'].get('ExitCode')})"
    return None


def container_deployments(client: Any = None) -> list[Deployment]:
    """The deployments recorded on this daemon's runner containers (none where no daemon answers)."""
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


class ContainerLauncher(DockerLauncher["DockerRunner"]):
    """Runners as containers of ``runner.image`` (``runner`` may be None to find, check and stop them)."""

    def _image(self) -> DockerRunner:
        if self.runner is None:
            raise DeployError("starting a runner container needs its image (--image)")
        return self.runner

    def machine(self) -> Machine:
        return describe_image_machine(self._image(), gpus=-1 if shutil.which("nvidia-smi") else 0,
                                      client=self._docker())

    def check(self, *, hostfile: Path | None) -> None:
        if hostfile is not None:
            raise DeployError("a hostfile spreads mpirun's ranks over hosts; a runner container runs on one host (use "
                              "the process launcher for several hosts)")

    def start(self, request: LaunchRequest) -> Deployment:
        """Start the runner container, wait until it is healthy, and record the deployment."""
        import docker

        runner, client, build = self._image(), self._docker(), request.build
        _require_image(client, runner.image)
        keyed = request.api_key is not None
        argv = launch_argv(request.engine_dir, tp=request.tp, host="0.0.0.0", port=request.port,
                           model_name=build.model, pid_file=RANK0_PID_FILE, gpus=request.gpus,
                           serve_args=request.serve_args, python="python", env={}, master_port=29500,
                           rank0_only=(API_KEY_ENV,) if keyed else (), instance=request.instance)
        cname = container_name(request.name)
        try:
            stale = client.containers.get(cname)
        except docker.errors.NotFound:
            stale = None
        if stale is not None:
            if stale.status == "running":
                raise DeployError(f"a container {cname} is already running: `vlmforge undeploy {request.name}` or "
                                  f"`docker rm -f {cname}`")
            stale.remove(force=True)
        volumes = runner.volumes or [f"{request.engine_dir}:{request.engine_dir}:ro"]
        endpoint = endpoint_url(request.host, request.port)
        record = Deployment(name=request.name, model=build.model, build_id=build.build_id,
                            engine_dir=request.engine_dir, endpoint=endpoint, host=request.host, port=request.port,
                            tp=request.tp, pid=0, pid_file=RANK0_PID_FILE, log=Path(f"docker logs {cname}"), argv=argv,
                            source=request.source, selection=request.selection, started_at=datetime.now(UTC),
                            image=runner.image, auth=request.auth, key_fingerprint=request.key_fingerprint,
                            instance=request.instance)
        environment = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if request.api_key is not None:
            environment[API_KEY_ENV] = request.api_key.get_secret_value()
        log.info("starting container %s from %s: %s", cname, runner.image, " ".join(argv))
        try:
            container = client.containers.run(
                runner.image, argv, name=cname, detach=True, init=True, volumes=volumes,
                ports={f"{request.port}/tcp": ("0.0.0.0" if request.host in ("0.0.0.0", "") else request.host,
                                               request.port)},
                network=runner.network, shm_size=runner.shm_size,
                device_requests=_device_requests(request.tp if request.gpus else 0), environment=environment,
                labels={LABEL: request.name, "vlmforge.engine": build.ref, RECORD_LABEL: record.model_dump_json()})
        except docker.errors.APIError as exc:
            raise DeployError(f"the Docker daemon refused to start {cname}: {exc.explanation or exc}") from None
        container.reload()
        probe = f"http://{_address(container, runner.network)}:{request.port}"
        try:
            wait_healthy(probe, request.wait_s, died=lambda: _exited(container), api_key=request.api_key,
                         instance=request.instance,
                         log_tail=lambda: f"(docker logs {cname})\n{_logs(container)}")
        except BaseException:
            container.remove(force=True)
            raise
        deployment = record.model_copy(update={"container": container.id, "probe": probe})
        write_record(deployment, request.state_dir)
        return deployment

    def running(self, deployment: Deployment) -> bool:
        container = _container(deployment.container or "", self._docker())
        return container is not None and container.status == "running"

    def stop(self, deployment: Deployment, timeout: float) -> str:
        """SIGTERM to rank 0 inside the container (it drains and every rank exits), the daemon's stop if it is
        still running after ``timeout``; the container is removed."""
        import requests

        container = _container(deployment.container or "", self._docker())
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

    def logs(self, deployment: Deployment) -> str:
        return f"docker logs {container_name(deployment.name)}"

    def discover(self) -> list[Deployment]:
        """Runner containers on the daemon, where the docker package is installed and a daemon answers."""
        if importlib.util.find_spec("docker") is None:
            return []
        return container_deployments(self._client)
