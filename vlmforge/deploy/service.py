"""Deploying runners, the whole path: choose a build that fits where the runner will run, pull it, check it, start
it through a launcher, wait until it is healthy, and record it; then list, check and stop deployments.

The pieces, each checkable alone:

- :mod:`vlmforge.deploy.machine`: what a build needs and a machine offers; the choice between builds;
- :mod:`vlmforge.deploy.sources`: the store, or a local engine directory;
- :mod:`vlmforge.deploy.auth` and :mod:`vlmforge.deploy.environment`: the API key, and what runners get of the
  deployer's environment;
- :mod:`vlmforge.deploy.records`: the deployment records of the state directory;
- :mod:`vlmforge.deploy.launchers`: the process and the container launcher, chosen in one place.

Here: :func:`plan_deploy` makes every refusal before anything is pulled or started; :func:`fetch_engine`,
:func:`start_runner` and :func:`deploy` run the steps; :func:`list_deployments`, :func:`deployment_status` and
:func:`stop_deployment` look after what runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, SecretStr

from vlmforge.artifacts.engine_config import HF_CHECKPOINT_DIR, EngineConfig
from vlmforge.deploy.auth import AuthMode, fingerprint, require_key
from vlmforge.deploy.launchers import DockerRunner, Launcher, LaunchRequest, all_launchers, launcher_for, launcher_of
from vlmforge.deploy.launchers.base import port_in_use
from vlmforge.deploy.machine import BuildInfo, Machine, Selection, check_build, fits, select_build
from vlmforge.deploy.records import (
    Deployment,
    LauncherKind,
    check_deployment_name,
    default_state_dir,
    read_record,
    recorded_names,
    remove_record,
)
from vlmforge.deploy.sources import BuildSource, LocalEngineSource, default_cache_dir, is_exact
from vlmforge.errors import DeployError
from vlmforge.system.processes import pid_alive

RUNNER_LEAVES_OUT = frozenset({HF_CHECKPOINT_DIR})
"""What a pull for the vlmforge runner leaves out: the whole-model folder of ``artifacts.hf_checkpoint`` (trtllm-serve's
artifact, as large as the model again); the runner reads engine.json, vision/, llm/ and processor/."""

log = logging.getLogger(__name__)


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
    auth: AuthMode = AuthMode.NONE
    """Whether the runner will ask clients for an API key (the key is handed to :func:`start_runner`, never kept
    in a plan)."""
    key_fingerprint: str | None = None

    @property
    def build(self) -> BuildInfo:
        return self.selection.build

    @property
    def launcher(self) -> Launcher:
        return launcher_for(self.docker)


def plan_deploy(ref: str, source: BuildSource, *, tp: int | None = None, host: str = "127.0.0.1", port: int = 8000,
                hostfile: Path | None = None, name: str | None = None, machine: Machine | None = None,
                state_dir: Path | None = None, replace: bool = False, docker: DockerRunner | None = None,
                api_key: SecretStr | None = None) -> DeployPlan:
    """Choose the build (the newest that fits, for a bare MODEL) or check the one asked for, and the port. With
    ``docker`` the runner will be a container of that image: what can run is asked of the image. A runner that
    others can reach (a non-loopback ``host``, any container) needs ``api_key``."""
    if name is not None:
        check_deployment_name(name)
    launcher = launcher_for(docker)
    launcher.check(hostfile=hostfile)
    auth = require_key(host, api_key, container=launcher.kind is LauncherKind.DOCKER)
    machine = machine or launcher.machine()
    state_dir = state_dir or default_state_dir()
    multi_host = hostfile is not None
    candidates = source.candidates(ref)
    if is_exact(ref) or isinstance(source, LocalEngineSource):
        build = candidates[0]
        problems = check_build(build, machine, tp, multi_host=multi_host)
        if problems:
            raise DeployError(f"{build.ref} cannot be deployed here ({machine.summary()}): " + "; ".join(problems))
        asked = f"as asked ({ref})" if is_exact(ref) else f"from {source.describe()}"
        selection = Selection(build=build, reason=f"deploying {build.ref} {asked}: {fits(build, machine, tp)}")
    else:
        selection = select_build(candidates, machine, tp, multi_host=multi_host)
    build = selection.build
    name = check_deployment_name(name or f"{build.model}-{port}")
    existing = read_deployment(state_dir, name)
    replaces = replaced_deployment(existing, name, replace=replace)
    if replaces is None:
        if existing is not None and existing.kind is LauncherKind.PROCESS and pid_alive(existing.pid):
            log.warning("the recorded runner of %s is gone; pid %d now belongs to another process, which is left "
                        "alone", name, existing.pid)
        if port_in_use(host, port):
            raise DeployError(f"port {port} on {host} is in use: pass another --port")
    return DeployPlan(ref=ref, selection=selection, tp=tp if tp is not None else build.world_size, host=host,
                      port=port, name=name, hostfile=hostfile, replaces=replaces, gpus=machine.gpu_count > 0,
                      docker=docker, auth=auth, key_fingerprint=fingerprint(api_key) if api_key is not None else None)


def fetch_engine(plan: DeployPlan, source: BuildSource, cache_dir: Path | None = None) -> Path:
    """Pull (and verify) the chosen build into the cache; check that its engine.json is what was published."""
    build = plan.build
    engine_dir = source.pull(build, cache_dir or default_cache_dir(), exclude=RUNNER_LEAVES_OUT)
    config = EngineConfig.read(engine_dir)
    if (config.toolchain, config.world_size) != (build.toolchain, build.world_size):
        raise DeployError(f"{engine_dir}/engine.json says a {config.toolchain} engine for world size "
                          f"{config.world_size}, but {build.ref} was published as {build.toolchain} for world size "
                          f"{build.world_size}")
    return engine_dir


def start_runner(plan: DeployPlan, engine_dir: Path, *, source: str, state_dir: Path | None = None,
                 serve_args: Sequence[str] = (), wait_s: float = 600.0,
                 api_key: SecretStr | None = None) -> Deployment:
    """Stop the deployment this one replaces (draining it), start the runner through the plan's launcher, wait
    until healthy, record it. ``api_key``: the key the plan was made with."""
    if (fingerprint(api_key) if api_key is not None else None) != plan.key_fingerprint:
        raise DeployError("the API key given to start the runner is not the one its plan was checked with")
    state_dir = state_dir or default_state_dir()
    if plan.replaces is not None and running(plan.replaces):
        log.info("replacing %s (%s)", plan.replaces.name, plan.replaces.ref)
        stop_deployment(plan.replaces, state_dir=state_dir)
        if port_in_use(plan.host, plan.port):
            raise DeployError(f"port {plan.port} on {plan.host} is still in use after stopping {plan.name}")
    request = LaunchRequest(build=plan.build, engine_dir=engine_dir, name=plan.name, tp=plan.tp, host=plan.host,
                            port=plan.port, state_dir=state_dir, selection=plan.selection.explain(), source=source,
                            hostfile=plan.hostfile, gpus=plan.gpus, serve_args=list(serve_args), wait_s=wait_s,
                            api_key=api_key)
    return plan.launcher.start(request)


def deploy(ref: str, source: BuildSource, *, tp: int | None = None, host: str = "127.0.0.1", port: int = 8000,
           hostfile: Path | None = None, name: str | None = None, machine: Machine | None = None,
           cache_dir: Path | None = None, state_dir: Path | None = None, serve_args: Sequence[str] = (),
           wait_s: float = 600.0, replace: bool = False, docker: DockerRunner | None = None,
           api_key: SecretStr | None = None) -> Deployment:
    """Plan (every refusal before anything is pulled or started), pull, start; the recorded deployment. With
    ``docker`` the runner is a container of that image; ``api_key`` goes to rank 0 through its environment."""
    plan = plan_deploy(ref, source, tp=tp, host=host, port=port, hostfile=hostfile, name=name, machine=machine,
                       state_dir=state_dir, replace=replace, docker=docker, api_key=api_key)
    log.info("%s", plan.selection.explain())
    engine_dir = fetch_engine(plan, source, cache_dir)
    return start_runner(plan, engine_dir, source=source.describe(), state_dir=state_dir, serve_args=serve_args,
                        wait_s=wait_s, api_key=api_key)


def serve_args(*, decode: str = "auto", compile_mode: str = "max-autotune-no-cudagraphs", warmup: bool = True,
               max_batch_size: int | None = None, image_root: Path | None = None,
               tune_store: str | None = None) -> list[str]:
    """``vlmforge serve`` options of a deployment (the CLI's and the deploy-runner flow's). ``tune_store``: the store
    the build was pulled from, where the runner looks for its tune artifacts (vlmforge.runner.tune)."""
    args = ["--decode", decode, "--compile-mode", compile_mode] + (["--warmup"] if warmup else [])
    if tune_store is not None:
        args += ["--tune-store", tune_store]
    if max_batch_size is not None:
        args += ["--max-batch-size", str(max_batch_size)]
    if image_root is not None:
        args += ["--image-root", str(image_root.resolve())]
    return args


def runner_tune_store(store: str | None, *, from_store: bool, container: bool) -> str | None:
    """The store a runner looks in for its tune artifacts (``serve --tune-store``): the one a deployment pulls from,
    a local path made absolute (the runner may start in another directory). None for a local engine directory (no
    store) and for a container runner (the store is not mounted in it: it compiles, as without a tune artifact)."""
    if not from_store or container:
        return None
    from vlmforge.store import default_store_url

    url = store or default_store_url()
    return url if "://" in url else str(Path(url).resolve())


# --- deployments on this machine ---------------------------------------------------------------------


def replaced_deployment(existing: Deployment | None, name: str, *, replace: bool) -> Deployment | None:
    """The running deployment of this name that a new one replaces (None if none runs); refused without --replace."""
    if existing is None or not running(existing):
        return None
    if not replace:
        raise DeployError(f"deployment {name} is running ({existing.ref} at {existing.endpoint}); stop it with "
                          f"`vlmforge undeploy {name}` or deploy with --replace")
    return existing


def running(deployment: Deployment) -> bool:
    """Whether the deployment's runner (the recorded process, or its container) is still there."""
    return launcher_of(deployment).running(deployment)


def read_deployment(state_dir: Path, name: str) -> Deployment | None:
    """The deployment ``name``: its record in ``state_dir``, else a runner container of that name on the Docker
    daemon (started from elsewhere, e.g. a flow run's container). A DeployError for a name that is none."""
    check_deployment_name(name)
    recorded = read_record(state_dir, name)
    if recorded is not None:
        return recorded
    return next((d for launcher in all_launchers() for d in launcher.discover() if d.name == name), None)


def deployment_status(deployment: Deployment) -> str:
    """``serving``, ``draining``, ``unhealthy`` (the runner is there, /health does not say ok) or ``stopped``."""
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


def list_deployments(state_dir: Path | None = None) -> list[tuple[Deployment, str]]:
    """The deployments recorded in ``state_dir`` and those the launchers find (runner containers on the Docker
    daemon), with their status."""
    state_dir = state_dir or default_state_dir()
    found: dict[str, Deployment] = {}
    for name in recorded_names(state_dir):
        deployment = read_record(state_dir, name)
        if deployment is not None:
            found[deployment.container or deployment.name] = deployment
    for launcher in all_launchers():
        for deployment in launcher.discover():
            found.setdefault(deployment.container or deployment.name, deployment)
    return [(d, deployment_status(d)) for d in sorted(found.values(), key=lambda d: d.name)]


def stop_deployment(deployment: Deployment, *, state_dir: Path | None = None, timeout: float = 180.0) -> str:
    """Drain and stop through the launcher that started it (SIGTERM to rank 0, running requests finish; killed if
    still there after ``timeout``), signalling nothing that is not provably the recorded runner. Removes the
    record. Returns what happened."""
    how = launcher_of(deployment).stop(deployment, timeout)
    remove_record(state_dir or default_state_dir(), deployment.name)
    return how
