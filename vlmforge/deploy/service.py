"""Deploying runners: choose a build that fits this machine, pull it, check it, start
``mpirun -n TP ... vlmforge serve ENGINE_DIR``, wait until it is healthy, and record it.

The pieces are separate so each can be checked alone:

- :class:`BuildInfo` is what deploy needs of a published build (from a store manifest, or from a
  local engine directory's engine.json); :class:`Machine` is what this machine offers.
- :func:`check_build` lists why a build cannot run here (toolchain, TensorRT and TensorRT-LLM
  versions, GPU architecture and count, TP against the build's world size); :func:`select_build`
  picks the newest build that fits and says which and why, like NIM's profile selection.
- :class:`StoreSource` is the one place that touches the artifact store; :class:`LocalEngineSource`
  deploys an engine directory as it is.
- :func:`deploy` runs them in order and refuses a mismatch before anything is pulled or started;
  :func:`launch` starts the runner; records live in a state directory (:func:`list_deployments`,
  :func:`stop_deployment`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, PrivateAttr

from vlmforge.artifacts.engine_config import EngineConfig
from vlmforge.deploy.docker import DockerRunner
from vlmforge.errors import DeployError
from vlmforge.system.processes import pid_alive

log = logging.getLogger(__name__)

ENV_PREFIXES = ("VLMFORGE_", "HF_", "TRANSFORMERS_", "CUDA_", "NCCL_", "OMP_", "MKL_", "TORCH_", "AWS_")
ENV_NAMES = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "HOME", "PYTHONWARNINGS", "TOKENIZERS_PARALLELISM")


# --- what a build needs, what this machine has --------------------------------------------------


class BuildInfo(BaseModel):
    """What deploy needs to know of one build."""

    model: str
    build_id: str
    created_at: datetime
    toolchain: Literal["hf", "trtllm"]
    world_size: int = Field(default=1, ge=1)
    gpu_name: str | None = None
    compute_capability: str | None = None
    gpu_count: int = 0
    versions: dict[str, str] = Field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.model}#{self.build_id}"

    @classmethod
    def from_manifest(cls, manifest: Any) -> BuildInfo:
        """From a store manifest (``vlmforge.artifacts.manifest.EngineManifest``)."""
        hw = manifest.hardware
        return cls(model=manifest.model, build_id=manifest.build_id, created_at=manifest.created_at,
                   toolchain=manifest.toolchain, world_size=manifest.world_size, gpu_name=hw.gpu_name,
                   compute_capability=hw.compute_capability, gpu_count=hw.gpu_count, versions=dict(manifest.versions))

    @classmethod
    def from_engine_dir(cls, engine_dir: Path) -> BuildInfo:
        """From a local engine directory's engine.json (its build id: ``local``)."""
        config = EngineConfig.read(engine_dir)
        versions = {k: v for k, v in (("tensorrt", config.tensorrt_version),
                                      ("tensorrt_llm", config.tensorrt_llm_version)) if v}
        created = datetime.fromtimestamp((Path(engine_dir) / "engine.json").stat().st_mtime, UTC)
        return cls(model=config.name, build_id="local", created_at=created, toolchain=config.toolchain,
                   world_size=config.world_size, compute_capability=config.compute_capability, versions=versions)


class Machine(BaseModel):
    """What this machine offers runners."""

    toolchains: dict[str, str] = Field(default_factory=dict)
    """Toolchains whose runner can start here, with the version that matters (hf: transformers,
    trtllm: tensorrt_llm)."""
    tensorrt: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    gpu_count: int = 0
    cpu_count: int = 1
    mpirun: bool = False

    def summary(self) -> str:
        gpus = (f"{self.gpu_count} x {self.gpu_name} (compute capability {self.compute_capability})"
                if self.gpu_count else "no GPU")
        tools = ", ".join(f"{k} {v}" for k, v in sorted(self.toolchains.items())) or "no runner toolchain"
        return f"{gpus}, {self.cpu_count} CPU cores, {tools}" + ("" if self.mpirun else ", no mpirun")


def describe_machine() -> Machine:
    """This machine: installed runner toolchains, TensorRT, GPUs (asked through torch), cores, mpirun."""
    from vlmforge.system.env import hardware, versions

    found = versions(("transformers", "tensorrt_llm", "tensorrt"))
    toolchains: dict[str, str] = {}
    if "transformers" in found and all(importlib.util.find_spec(m) is not None for m in ("torch", "onnxruntime")):
        toolchains["hf"] = found["transformers"]
    if "tensorrt_llm" in found:
        toolchains["trtllm"] = found["tensorrt_llm"]
    hw = hardware()
    return Machine(toolchains=toolchains, tensorrt=found.get("tensorrt"), cpu_count=hw.cpu_count,
                   mpirun=shutil.which("mpirun") is not None, gpu_name=hw.gpu_name, gpu_count=hw.gpu_count,
                   compute_capability=hw.compute_capability)


# --- fitting builds to the machine ------------------------------------------------------------------


def check_build(build: BuildInfo, machine: Machine, tp: int | None = None, *, multi_host: bool = False) -> list[str]:
    """Why ``build`` cannot run here with ``tp`` ranks (default: its world size); an empty list if it can.

    ``multi_host``: the ranks are spread by a hostfile, so this machine's GPU count does not bound them.
    """
    problems: list[str] = []
    ranks = tp if tp is not None else build.world_size
    if ranks != build.world_size:
        problems.append(f"it was built and validated for {build.world_size} rank(s) (world size "
                        f"{build.world_size}), not TP {ranks}")
    if build.toolchain not in machine.toolchains:
        needs = {"hf": "torch, transformers and onnxruntime (pip install 'vlmforge[hf]')",
                 "trtllm": "TensorRT-LLM (NVIDIA's TensorRT-LLM container)"}[build.toolchain]
        problems.append(f"its {build.toolchain} runner needs {needs}, which this machine lacks")
    if build.toolchain == "trtllm":
        if not machine.gpu_count:
            problems.append("a TensorRT engine needs an NVIDIA GPU; this machine has none")
        elif build.compute_capability and build.compute_capability != machine.compute_capability:
            problems.append(f"it was built for GPU compute capability {build.compute_capability}"
                            f"{f' ({build.gpu_name})' if build.gpu_name else ''}; this GPU ({machine.gpu_name}) is "
                            f"{machine.compute_capability}, and TensorRT engines run only on the architecture that "
                            "built them")
        for package, have in (("tensorrt", machine.tensorrt), ("tensorrt_llm", machine.toolchains.get("trtllm"))):
            built = build.versions.get(package)
            if built and have and built != have:
                problems.append(f"it was built with {package} {built}; this machine has {have}")
    if machine.gpu_count and not multi_host and ranks > machine.gpu_count:
        problems.append(f"TP {ranks} needs {ranks} GPUs; this machine has {machine.gpu_count} (or pass --hostfile)")
    if ranks > 1 and not machine.mpirun:
        problems.append(f"TP {ranks} runs under mpirun, which is not installed (apt-get install openmpi-bin)")
    return problems


class Selection(BaseModel):
    """The build deploy chose, why, and why each newer or other build was passed over."""

    build: BuildInfo
    reason: str
    skipped: list[tuple[str, list[str]]] = Field(default_factory=list)

    def explain(self) -> str:
        lines = [self.reason]
        lines += [f"  skipped {ref}: {'; '.join(problems)}" for ref, problems in self.skipped]
        return "\n".join(lines)


def _fits(build: BuildInfo, machine: Machine, tp: int | None) -> str:
    where = (f"{machine.gpu_count} x {machine.gpu_name} (compute capability {machine.compute_capability})"
             if machine.gpu_count else "the CPU")
    ranks = tp if tp is not None else build.world_size
    parts = [f"toolchain {build.toolchain} is here ({machine.toolchains[build.toolchain]})",
             f"TP {ranks} = its world size", f"runs on {where}"]
    if build.toolchain == "trtllm":
        parts.insert(1, f"built for compute capability {build.compute_capability} with TensorRT-LLM "
                        f"{build.versions.get('tensorrt_llm', '?')}")
    return ", ".join(parts)


def select_build(builds: Sequence[BuildInfo], machine: Machine, tp: int | None = None, *,
                 multi_host: bool = False) -> Selection:
    """The newest build that fits this machine (and ``tp``, if given); DeployError naming every build's misfit."""
    if not builds:
        raise DeployError("no published builds to choose from")
    ordered = sorted(builds, key=lambda b: (b.created_at, b.build_id), reverse=True)
    skipped: list[tuple[str, list[str]]] = []
    for build in ordered:
        problems = check_build(build, machine, tp, multi_host=multi_host)
        if not problems:
            newest = "the newest build" if not skipped else f"the newest of {len(ordered)} builds that fits"
            return Selection(build=build, skipped=skipped,
                             reason=f"selected {build.ref} ({build.created_at:%Y-%m-%d %H:%M} UTC), {newest}: "
                                    f"{_fits(build, machine, tp)}")
        skipped.append((build.ref, problems))
    lines = "\n".join(f"  {ref}: {'; '.join(problems)}" for ref, problems in skipped)
    asked = f" with TP {tp}" if tp is not None else ""
    raise DeployError(f"no build of {ordered[0].model} can run on this machine{asked} ({machine.summary()}):\n{lines}")


# --- where builds come from --------------------------------------------------------------------------


class BuildSource(Protocol):
    """Where deploy finds builds and gets their engine directories."""

    def candidates(self, ref: str) -> list[BuildInfo]: ...

    def pull(self, build: BuildInfo, cache_dir: Path) -> Path: ...

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

    def pull(self, build: BuildInfo, cache_dir: Path) -> Path:
        dest = cache_dir / build.model / build.build_id
        with self._open() as store:
            store.pull(build.ref, dest)  # verified and atomic; a no-op when dest holds this build already
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

    def pull(self, build: BuildInfo, cache_dir: Path) -> Path:
        return self.engine_dir


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLMFORGE_CACHE", "~/.cache/vlmforge")).expanduser() / "engines"


def default_state_dir() -> Path:
    base = os.environ.get("VLMFORGE_STATE") or os.path.join(os.environ.get("XDG_STATE_HOME", "~/.local/state"),
                                                            "vlmforge")
    return Path(base).expanduser() / "deployments"


# --- launching ------------------------------------------------------------------------------------


class Deployment(BaseModel):
    """A started runner, as recorded in the state directory."""

    name: str
    model: str
    build_id: str
    engine_dir: Path
    endpoint: str
    host: str
    port: int
    tp: int
    pid: int
    """The launcher: mpirun, or the runner itself for TP 1 on one host."""
    pid_file: Path
    """Where rank 0 wrote its pid: SIGTERM there drains the runner."""
    log: Path
    argv: list[str]
    source: str
    selection: str
    started_at: datetime
    container: str | None = None
    """The runner's container id, when it was started through a Docker daemon (``--launcher docker``; ``pid`` is
    then 0 and ``pid_file`` a path inside the container)."""
    image: str | None = None
    """The runner image of a container deployment."""
    probe: str | None = None
    """Where health is asked from here, when not at ``endpoint`` (a container's own address)."""
    _proc: subprocess.Popen | None = PrivateAttr(default=None)
    """The launcher process, when this process started it."""

    @property
    def ref(self) -> str:
        return f"{self.model}#{self.build_id}"

    def rank0_pid(self) -> int | None:
        """Rank 0's pid on this machine (None for a container deployment: its pid lives in the container)."""
        if self.container is not None:
            return None
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def first_host(hostfile: Path) -> str:
    """The first host an Open MPI hostfile names (rank 0 runs there, so MASTER_ADDR is it)."""
    for line in Path(hostfile).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line.split()[0]
    raise DeployError(f"{hostfile} names no host")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError:
            return True
    return False


def launch_argv(engine_dir: Path, *, tp: int, host: str, port: int, model_name: str, pid_file: Path,
                hostfile: Path | None = None, gpus: bool = False, serve_args: Sequence[str] = (),
                master_port: int | None = None, env: dict[str, str] | None = None,
                python: str = sys.executable) -> list[str]:
    """``mpirun -n TP ... python -m vlmforge serve ENGINE_DIR ...`` (the runner alone for TP 1 on one host)."""
    serve = [python, "-m", "vlmforge", "serve", str(engine_dir), "--host", host, "--port", str(port),
             "--model-name", model_name, "--pid-file", str(pid_file), *serve_args]
    if tp == 1 and hostfile is None:
        return serve
    env = dict(os.environ if env is None else env)
    master = first_host(hostfile) if hostfile else "127.0.0.1"
    argv = ["mpirun", "-n", str(tp), "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    if not gpus:
        argv.append("--oversubscribe")  # CPU ranks share the cores (each takes its share of threads)
    if hostfile:
        argv += ["--hostfile", str(hostfile)]
    argv += ["-x", f"MASTER_ADDR={master}", "-x", f"MASTER_PORT={master_port or free_port()}"]
    for name in sorted(env):
        if name in ENV_NAMES or name.startswith(ENV_PREFIXES):
            argv += ["-x", name]
    return argv + serve


def wait_healthy(url: str, timeout: float, *, died: Callable[[], str | None], log_tail: Callable[[], str]) -> None:
    """Poll ``url``/health until it says ok; DeployError with the log's tail if the runner dies (``died`` says how)
    or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        how = died()
        if how is not None:
            raise DeployError(f"{how} before it was healthy; the end of its log:\n{log_tail()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200 and json.loads(response.read()).get("status") == "ok":
                    return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.25)
    raise DeployError(f"the runner was not healthy within {timeout:.0f}s; the end of its log:\n{log_tail()}")


def endpoint_url(host: str, port: int) -> str:
    """Where clients on this host reach a runner listening on ``host`` (all interfaces: loopback)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def launch(build: BuildInfo, engine_dir: Path, *, tp: int, host: str, port: int, name: str, state_dir: Path,
           selection: str, source: str, hostfile: Path | None = None, serve_args: Sequence[str] = (),
           wait_s: float = 600.0, gpus: bool = False) -> Deployment:
    """Start the runner in a session of its own, wait until it is healthy, and record it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"{name}.log"
    pid_file = state_dir / f"{name}.rank0.pid"
    pid_file.unlink(missing_ok=True)
    argv = launch_argv(engine_dir, tp=tp, host=host, port=port, model_name=build.model, pid_file=pid_file,
                       hostfile=hostfile, gpus=gpus, serve_args=serve_args)
    log.info("starting %s", " ".join(argv))
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    endpoint = endpoint_url(host, port)
    deployment = Deployment(name=name, model=build.model, build_id=build.build_id, engine_dir=engine_dir,
                            endpoint=endpoint, host=host, port=port, tp=tp, pid=proc.pid, pid_file=pid_file,
                            log=log_path, argv=argv, source=source, selection=selection,
                            started_at=datetime.now(UTC))
    try:
        wait_healthy(endpoint, wait_s, log_tail=lambda: f"({log_path})\n{_tail(log_path)}",
                     died=lambda: None if proc.poll() is None else f"the runner exited with code {proc.returncode}")
    except BaseException:
        _kill_group(proc.pid)
        raise
    record_path(state_dir, name).write_text(deployment.model_dump_json(indent=2))
    deployment._proc = proc
    return deployment


def record_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def running(deployment: Deployment) -> bool:
    """Whether the deployment's launcher (process or container) is still there."""
    if deployment.container is not None:
        from vlmforge.deploy.docker import container_running

        return container_running(deployment.container)
    return pid_alive(deployment.pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# --- the whole deploy -------------------------------------------------------------------------------


class DeployPlan(BaseModel):
    """What deploy will start, decided (and every refusal made) before anything is pulled or started."""

    ref: str
    selection: Selection
    tp: int
    host: str
    port: int
    name: str
    hostfile: Path | None = None
    replaces: Deployment | None = None
    gpus: bool = False
    docker: DockerRunner | None = None
    """Start the runner as a container of this image (None: a process here)."""

    @property
    def build(self) -> BuildInfo:
        return self.selection.build


def plan_deploy(ref: str, source: BuildSource, *, tp: int | None = None, host: str = "127.0.0.1", port: int = 8000,
                hostfile: Path | None = None, name: str | None = None, machine: Machine | None = None,
                state_dir: Path | None = None, replace: bool = False, docker: DockerRunner | None = None) -> DeployPlan:
    """Choose the build (the newest that fits, for a bare MODEL) or check the one asked for, and the port. With
    ``docker`` the runner will be a container of that image: what can run is asked of the image."""
    if docker is not None and hostfile is not None:
        raise DeployError("a hostfile spreads mpirun's ranks over hosts; a runner container runs on one host (use "
                          "the process launcher for several hosts)")
    machine = machine or (image_machine(docker) if docker is not None else describe_machine())
    state_dir = state_dir or default_state_dir()
    multi_host = hostfile is not None
    candidates = source.candidates(ref)
    if is_exact(ref) or isinstance(source, LocalEngineSource):
        build = candidates[0]
        problems = check_build(build, machine, tp, multi_host=multi_host)
        if problems:
            raise DeployError(f"{build.ref} cannot be deployed here ({machine.summary()}): " + "; ".join(problems))
        asked = f"as asked ({ref})" if is_exact(ref) else f"from {source.describe()}"
        selection = Selection(build=build, reason=f"deploying {build.ref} {asked}: {_fits(build, machine, tp)}")
    else:
        selection = select_build(candidates, machine, tp, multi_host=multi_host)
    build = selection.build
    name = name or f"{build.model}-{port}"
    existing = read_deployment(state_dir, name)
    replaces = None
    if existing is not None and running(existing):
        if not replace:
            raise DeployError(f"deployment {name} is running ({existing.ref} at {existing.endpoint}); stop it with "
                              f"`vlmforge undeploy {name}` or deploy with --replace")
        replaces = existing
    elif port_in_use(host, port):
        raise DeployError(f"port {port} on {host} is in use: pass another --port")
    return DeployPlan(ref=ref, selection=selection, tp=tp if tp is not None else build.world_size, host=host,
                      port=port, name=name, hostfile=hostfile, replaces=replaces, gpus=machine.gpu_count > 0,
                      docker=docker)


def fetch_engine(plan: DeployPlan, source: BuildSource, cache_dir: Path | None = None) -> Path:
    """Pull (and verify) the chosen build into the cache; check that its engine.json is what was published."""
    build = plan.build
    engine_dir = source.pull(build, cache_dir or default_cache_dir())
    config = EngineConfig.read(engine_dir)
    if (config.toolchain, config.world_size) != (build.toolchain, build.world_size):
        raise DeployError(f"{engine_dir}/engine.json says a {config.toolchain} engine for world size "
                          f"{config.world_size}, but {build.ref} was published as {build.toolchain} for world size "
                          f"{build.world_size}")
    return engine_dir


def start_runner(plan: DeployPlan, engine_dir: Path, *, source: str, state_dir: Path | None = None,
                 serve_args: Sequence[str] = (), wait_s: float = 600.0) -> Deployment:
    """Stop the deployment this one replaces (draining it), start the runner (a process, or the plan's container),
    wait until healthy, record it."""
    state_dir = state_dir or default_state_dir()
    if plan.replaces is not None and running(plan.replaces):
        log.info("replacing %s (%s)", plan.replaces.name, plan.replaces.ref)
        stop_deployment(plan.replaces, state_dir=state_dir)
        if port_in_use(plan.host, plan.port):
            raise DeployError(f"port {plan.port} on {plan.host} is still in use after stopping {plan.name}")
    if plan.docker is not None:
        from vlmforge.deploy.docker import launch_container

        return launch_container(plan.build, engine_dir, runner=plan.docker, tp=plan.tp, host=plan.host, port=plan.port,
                                name=plan.name, state_dir=state_dir, selection=plan.selection.explain(),
                                source=source, serve_args=serve_args, wait_s=wait_s, gpus=plan.gpus)
    return launch(plan.build, engine_dir, tp=plan.tp, host=plan.host, port=plan.port, name=plan.name,
                  state_dir=state_dir, selection=plan.selection.explain(), source=source, hostfile=plan.hostfile,
                  serve_args=serve_args, wait_s=wait_s, gpus=plan.gpus)


def deploy(ref: str, source: BuildSource, *, tp: int | None = None, host: str = "127.0.0.1", port: int = 8000,
           hostfile: Path | None = None, name: str | None = None, machine: Machine | None = None,
           cache_dir: Path | None = None, state_dir: Path | None = None, serve_args: Sequence[str] = (),
           wait_s: float = 600.0, replace: bool = False, docker: DockerRunner | None = None) -> Deployment:
    """Plan (every refusal before anything is pulled or started), pull, start; the recorded deployment. With
    ``docker`` the runner is a container of that image."""
    plan = plan_deploy(ref, source, tp=tp, host=host, port=port, hostfile=hostfile, name=name, machine=machine,
                       state_dir=state_dir, replace=replace, docker=docker)
    log.info("%s", plan.selection.explain())
    engine_dir = fetch_engine(plan, source, cache_dir)
    return start_runner(plan, engine_dir, source=source.describe(), state_dir=state_dir, serve_args=serve_args,
                        wait_s=wait_s)


def serve_args(*, decode: str = "auto", compile_mode: str = "max-autotune-no-cudagraphs", warmup: bool = True,
               max_batch_size: int | None = None, image_root: Path | None = None) -> list[str]:
    """``vlmforge serve`` options of a deployment (the CLI's and the deploy-runner flow's)."""
    args = ["--decode", decode, "--compile-mode", compile_mode] + (["--warmup"] if warmup else [])
    if max_batch_size is not None:
        args += ["--max-batch-size", str(max_batch_size)]
    if image_root is not None:
        args += ["--image-root", str(image_root.resolve())]
    return args


def image_machine(docker: DockerRunner) -> Machine:
    """What a runner container of ``docker.image`` sees (its toolchains; this host's GPUs, if it has any)."""
    from vlmforge.deploy.docker import describe_image_machine

    return describe_image_machine(docker, gpus=-1 if shutil.which("nvidia-smi") else 0)


# --- deployments on this machine ---------------------------------------------------------------------


def read_deployment(state_dir: Path, name: str) -> Deployment | None:
    """The deployment ``name``: its record in ``state_dir``, else a runner container of that name on the Docker
    daemon (started from elsewhere, e.g. a flow run's container)."""
    path = record_path(state_dir, name)
    if not path.is_file():
        return next((d for d in _daemon_deployments() if d.name == name), None)
    try:
        return Deployment.model_validate_json(path.read_text())
    except ValueError:
        log.warning("ignoring unreadable deployment record %s", path)
        return None


def deployment_status(deployment: Deployment) -> str:
    """``serving``, ``draining``, ``unhealthy`` (the process lives, /health does not say ok) or ``stopped``."""
    if not running(deployment):
        return "stopped"
    try:
        with urllib.request.urlopen(f"{deployment.probe or deployment.endpoint}/health", timeout=2) as response:
            return "serving" if response.status == 200 else "unhealthy"
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError, OSError):
            if json.loads(exc.read()).get("status") == "draining":
                return "draining"
        return "unhealthy"
    except (OSError, urllib.error.URLError):
        return "unhealthy"


def _daemon_deployments() -> list[Deployment]:
    """Runner containers on the Docker daemon, where the docker package is installed and a daemon answers."""
    if importlib.util.find_spec("docker") is None:
        return []
    from vlmforge.deploy.docker import container_deployments

    return container_deployments()


def list_deployments(state_dir: Path | None = None) -> list[tuple[Deployment, str]]:
    """The deployments recorded in ``state_dir`` and the runner containers on the Docker daemon, with their status."""
    state_dir = state_dir or default_state_dir()
    found: dict[str, Deployment] = {}
    for path in sorted(state_dir.glob("*.json")) if state_dir.is_dir() else []:
        deployment = read_deployment(state_dir, path.stem)
        if deployment is not None:
            found[deployment.container or deployment.name] = deployment
    for deployment in _daemon_deployments():
        found.setdefault(deployment.container or deployment.name, deployment)
    return [(d, deployment_status(d)) for d in sorted(found.values(), key=lambda d: d.name)]


def stop_deployment(deployment: Deployment, *, state_dir: Path | None = None, timeout: float = 180.0) -> str:
    """Drain and stop: SIGTERM to rank 0 (running requests finish, the other ranks are released), SIGKILL to the
    whole process group if it is still there after ``timeout``. Removes the record. Returns what happened."""
    state_dir = state_dir or default_state_dir()
    how = "was not running"
    if deployment.container is not None:
        from vlmforge.deploy.docker import stop_container

        how = stop_container(deployment.container, timeout)
    elif pid_alive(deployment.pid):
        rank0 = deployment.rank0_pid()
        target = rank0 if rank0 is not None and pid_alive(rank0) else deployment.pid
        os.kill(target, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(deployment.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(deployment.pid):
            _kill_group(deployment.pid)
            how = f"killed after {timeout:.0f}s without draining"
        else:
            how = "drained and stopped"
    record_path(state_dir, deployment.name).unlink(missing_ok=True)
    return how
