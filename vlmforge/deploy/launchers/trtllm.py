"""The trtllm-serve launcher: TensorRT-LLM's own server in NVIDIA's release container, through a Docker daemon
(``vlmforge deploy --backend trtllm-serve``).

What it starts is computed in :mod:`vlmforge.deploy.trtllm_serve` (the options file, the command) and laid out here
as one :class:`ContainerSpec`, which both starts the container (Docker SDK) and prints as the equivalent ``docker
run`` line (``--dry-run``):

- host networking, ``--ipc host`` and the memlock/stack limits NVIDIA's docs give for the image, one GPU per rank;
- the model folder and the options file mounted read-only; a new environment (:func:`~vlmforge.deploy.environment.
  container_environment`: offline, tuning knobs only, never the deployer's paths or secrets);
- **no API key**: trtllm-serve has no client authentication (its ``internal_request_auth_key`` signs disaggregated
  serving's internal payloads only). What protects it is the address: it listens on loopback only (host
  networking, ``--host 127.0.0.1``), so only this host's users reach it; deploy refuses another ``--host`` and a
  key it could not enforce. Expose it through an authenticating proxy;
- health: ``GET /health`` answers 200 (empty body) once the model is loaded;
- stop: only the recorded container, and only while its labels still name this deployment and its image is the
  recorded one; the daemon's stop (SIGTERM through the container's init to mpirun and its ranks, SIGKILL after the
  timeout), then the container and the options file are removed;
- the deployment record is also a label of the container, so ``vlmforge deployments`` finds it like any runner
  container.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field

from vlmforge.deploy.auth import AuthMode
from vlmforge.deploy.environment import container_environment
from vlmforge.deploy.launchers.base import LaunchRequest, endpoint_url, wait_healthy
from vlmforge.deploy.launchers.container import (
    LABEL,
    RECORD_LABEL,
    DockerLauncher,
    _logs,
    container_name,
    docker_client,
)
from vlmforge.deploy.machine import Machine
from vlmforge.deploy.records import Deployment, ServeBackend, write_record
from vlmforge.deploy.trtllm_serve import (
    MODELS_DIR,
    OPTIONS_PATH,
    LlmApiOptions,
    ServeLimits,
    serve_argv,
)
from vlmforge.errors import DeployError

log = logging.getLogger(__name__)

MEMLOCK, STACK = -1, 67108864
"""``--ulimit memlock=-1 --ulimit stack=67108864``: what NVIDIA's docs run the release image with."""
LogLevel = Literal["internal_error", "error", "warning", "info", "verbose", "debug", "trace"]


def trtllm_ok(status: int, body: bytes) -> bool:
    """trtllm-serve is healthy: ``/health`` answers 200 (its body is empty)."""
    del body
    return status == 200


class TrtllmServeRunner(BaseModel):
    """How a trtllm-serve container is made: the image, what it is sized for, and the options file."""

    image: str = Field(min_length=1)
    limits: ServeLimits
    options: LlmApiOptions
    log_level: LogLevel = "info"


class ContainerSpec(BaseModel):
    """One trtllm-serve container: what the launcher starts, and what ``--dry-run`` prints as ``docker run``."""

    name: str
    image: str
    command: list[str]
    model_dir: Path
    model_target: PurePosixPath
    options_file: Path
    gpus: int = Field(ge=1)
    environment: dict[str, str]
    labels: dict[str, str] = Field(default_factory=dict)

    def mounts(self) -> list[tuple[Path, PurePosixPath]]:
        return [(self.model_dir, self.model_target), (self.options_file, OPTIONS_PATH)]

    def docker_run_argv(self) -> list[str]:
        """The same container as a ``docker run`` command line (labels but the deployment's name left out)."""
        argv = ["docker", "run", "--detach", "--init", "--name", self.name, "--network", "host", "--ipc", "host",
                "--ulimit", f"memlock={MEMLOCK}", "--ulimit", f"stack={STACK}", "--gpus", str(self.gpus)]
        for source, target in self.mounts():
            argv += ["--volume", f"{source}:{target}:ro"]
        for name, value in self.environment.items():
            argv += ["--env", f"{name}={value}"]
        if LABEL in self.labels:
            argv += ["--label", f"{LABEL}={self.labels[LABEL]}"]
        return [*argv, self.image, *self.command]

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the Docker SDK's ``containers.run`` for the same container."""
        import docker

        return {"image": self.image, "command": self.command, "name": self.name, "detach": True, "init": True,
                "network_mode": "host", "ipc_mode": "host",
                "ulimits": [docker.types.Ulimit(name="memlock", soft=MEMLOCK, hard=MEMLOCK),
                            docker.types.Ulimit(name="stack", soft=STACK, hard=STACK)],
                "device_requests": [docker.types.DeviceRequest(count=self.gpus, capabilities=[["gpu"]])],
                "volumes": {str(source): {"bind": str(target), "mode": "ro"} for source, target in self.mounts()},
                "environment": dict(self.environment), "labels": dict(self.labels)}


def options_path(state_dir: Path, name: str) -> Path:
    """Where a deployment's options file is written (the record names it; undeploy removes it)."""
    return state_dir / f"{name}.llm_api.yaml"


def container_spec(request: LaunchRequest, runner: TrtllmServeRunner, *, env: dict[str, str] | None = None,
                   record: Deployment | None = None) -> ContainerSpec:
    """The container for ``request``: the build's model folder served under the model's name."""
    model = request.build.model
    command = serve_argv(model_name=model, ranks=runner.limits.ranks, host=request.host, port=request.port,
                         log_level=runner.log_level)
    labels = {LABEL: request.name, "vlmforge.engine": request.build.ref}
    if record is not None:
        labels[RECORD_LABEL] = record.model_dump_json()
    return ContainerSpec(name=container_name(request.name), image=runner.image, command=command,
                         model_dir=request.engine_dir.resolve(), model_target=MODELS_DIR / model,
                         options_file=options_path(request.state_dir, request.name).resolve(), gpus=runner.limits.ranks,
                         environment=container_environment(os.environ if env is None else env), labels=labels)


def host_gpus() -> int:
    """NVIDIA GPUs ``nvidia-smi -L`` lists on this host (0 without it)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def preflight(image: str, ranks: int, *, client: Any = None, gpus: int | None = None) -> Any:
    """Refuse (DeployError, saying what to do) where trtllm-serve cannot start: no docker package, no daemon, no
    image on the daemon, no NVIDIA runtime, fewer GPUs than ranks. Returns the Docker client."""
    gpus = host_gpus() if gpus is None else gpus
    if gpus < ranks:
        raise DeployError(f"trtllm-serve needs {ranks} NVIDIA GPU(s) (one per rank); this host has {gpus}"
                          f"{' (nvidia-smi not found)' if shutil.which('nvidia-smi') is None else ''}")
    client = client or docker_client()
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise DeployError(f"the TensorRT-LLM image {image} is not on the Docker daemon: `docker pull {image}` (or pass "
                          "--image with a mirror's copy)") from None
    runtimes = (client.info() or {}).get("Runtimes") or {}
    if "nvidia" not in runtimes:
        raise DeployError("the Docker daemon has no nvidia runtime, so a container cannot reach the GPUs: install the "
                          "NVIDIA Container Toolkit (nvidia-ctk runtime configure --runtime=docker)")
    return client


class TrtllmServeLauncher(DockerLauncher["TrtllmServeRunner"]):
    """trtllm-serve containers (``runner`` may be None to check and stop them)."""

    def _runner(self) -> TrtllmServeRunner:
        if self.runner is None:
            raise DeployError("starting trtllm-serve needs its image and options")
        return self.runner

    def machine(self) -> Machine:
        return Machine(gpu_count=host_gpus(), cpu_count=os.cpu_count() or 1)

    def check(self, *, hostfile: Path | None) -> None:
        if hostfile is not None:
            raise DeployError("--hostfile spreads ranks over hosts; trtllm-serve runs in one container on one host here")

    def command(self, request: LaunchRequest) -> ContainerSpec:
        return container_spec(request, self._runner())

    def start(self, request: LaunchRequest) -> Deployment:
        runner = self._runner()
        client = preflight(runner.image, runner.limits.ranks, client=self._client)
        self._client = client
        import docker

        request.state_dir.mkdir(parents=True, exist_ok=True)
        options_file = options_path(request.state_dir, request.name)
        options_file.write_text(runner.options.to_yaml())
        endpoint = endpoint_url(request.host, request.port)
        draft = container_spec(request, runner)
        record = Deployment(name=request.name, model=request.build.model, build_id=request.build.build_id,
                            engine_dir=request.engine_dir, endpoint=endpoint, host=request.host, port=request.port,
                            tp=runner.limits.tp, pid=0, log=Path(f"docker logs {draft.name}"), argv=draft.command,
                            source=request.source, selection=request.selection, started_at=datetime.now(UTC),
                            image=runner.image, probe=endpoint, auth=AuthMode.NONE,
                            backend=ServeBackend.TRTLLM_SERVE, options_file=options_file.resolve())
        spec = container_spec(request, runner, record=record)
        self._clear_stale(client, spec.name, request.name)
        log.info("starting %s", " ".join(spec.docker_run_argv()))
        try:
            container = client.containers.run(**spec.run_kwargs())
        except docker.errors.APIError as exc:
            raise DeployError(f"the Docker daemon refused to start {spec.name}: {exc.explanation or exc}") from None

        def exited() -> str | None:
            container.reload()
            if container.status in ("exited", "dead"):
                return f"trtllm-serve's container {spec.name} exited ({container.attrs['State'].get('ExitCode')})"
            return None

        try:
            wait_healthy(endpoint, request.wait_s, died=exited, healthy=trtllm_ok,
                         log_tail=lambda: f"(docker logs {spec.name})\n{_logs(container)}")
        except BaseException:
            container.remove(force=True)
            raise
        deployment = record.model_copy(update={"container": container.id})
        write_record(deployment, request.state_dir)
        return deployment

    @staticmethod
    def _clear_stale(client: Any, cname: str, name: str) -> None:
        """Remove a stopped container of this deployment's name; refuse a running one or one that is not ours."""
        import docker

        try:
            stale = client.containers.get(cname)
        except docker.errors.NotFound:
            return
        if stale.labels.get(LABEL) != name:
            raise DeployError(f"a container named {cname} exists and is not vlmforge's deployment {name}: remove or "
                              "rename it, or deploy with another --name")
        if stale.status == "running":
            raise DeployError(f"deployment {name}'s container {cname} is running: `vlmforge undeploy {name}` first")
        stale.remove(force=True)

    def _recorded(self, deployment: Deployment) -> tuple[Any, str | None]:
        """The recorded container and None, or None and why it is not (gone, or no longer this deployment's)."""
        import docker

        try:
            container = self._docker().containers.get(deployment.container or "")
        except docker.errors.NotFound:
            return None, "was not running"
        image = (container.attrs.get("Config") or {}).get("Image")
        if container.labels.get(LABEL) != deployment.name or image != deployment.image:
            return None, (f"container {(deployment.container or '')[:12]} no longer holds deployment {deployment.name} "
                          f"(its labels or image changed): nothing was stopped")
        return container, None

    def running(self, deployment: Deployment) -> bool:
        container, _ = self._recorded(deployment)
        return container is not None and container.status == "running"

    def stop(self, deployment: Deployment, timeout: float) -> str:
        container, why = self._recorded(deployment)
        if container is None:
            return why or "was not running"
        how = "was not running"
        if container.status == "running":
            container.stop(timeout=max(1, round(timeout)))  # SIGTERM through init to mpirun; SIGKILL after timeout
            container.reload()
            code = container.attrs["State"].get("ExitCode")
            how = f"killed after {timeout:.0f}s" if code == 137 else f"stopped (exit code {code})"
        container.remove(force=True)
        if deployment.options_file is not None:
            deployment.options_file.unlink(missing_ok=True)
        return how

    def logs(self, deployment: Deployment) -> str:
        return f"docker logs {container_name(deployment.name)}"

    def discover(self) -> list[Deployment]:
        """None of its own: its containers carry the runner label, so the container launcher lists them."""
        return []
