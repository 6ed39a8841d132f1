"""The deploy flow: choose the build that fits this machine, pull it, start the runner, and leave an artifact
with its endpoint, engine id and TP.

With ``launcher="process"`` it runs where the runner should run (the flow run's machine starts `mpirun` in a
session of its own, which outlives the flow run). With ``launcher="docker"`` (prefect.yaml's deploy-runner
deployments) the flow run's own container is short-lived: the runner is a container of the runner image,
started through the host's Docker daemon, and the build is chosen for what that image and host offer.

The runner's API key is never a flow parameter (parameters are stored and shown in clear): ``api_key_secret`` names
a Prefect Secret block, loaded when the flow runs; without one, ``VLMFORGE_API_KEY`` of the flow run's environment is
used, if set. The key goes to the runner's environment only; the artifacts show its fingerprint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from pydantic import SecretStr
from vlmforge_tasks import deploy as t

from vlmforge.deploy.auth import API_KEY_ENV
from vlmforge.deploy.launchers import DockerRunner
from vlmforge.deploy.records import Deployment
from vlmforge.deploy.service import DeployPlan, runner_tune_store, serve_args
from vlmforge.deploy.sources import LocalEngineSource, StoreSource
from vlmforge.errors import DeployError
from vlmforge.runner import CompileMode, DecodeMode


def _key(name: str) -> str:
    return "deploy-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())


def deployment_markdown(deployment: Deployment, plan: DeployPlan) -> str:
    rows = [("endpoint", f"[{deployment.endpoint}/v1]({deployment.endpoint}/v1/models)"),
            ("engine", f"`{deployment.ref}`"), ("tensor parallel", str(deployment.tp)),
            ("toolchain", plan.build.toolchain), ("engine directory", f"`{deployment.engine_dir}`"),
            ("source", deployment.source), ("deployment", f"`{deployment.name}`"), ("log", f"`{deployment.log}`"),
            ("authentication", f"{deployment.auth.value}" + (f" (key `{deployment.key_fingerprint}`)"
                                                             if deployment.key_fingerprint else "")),
            *([("container", f"`{deployment.container[:12]}` of `{deployment.image}`")] if deployment.container else []),
            ("launched", f"`{' '.join(deployment.argv)}`")]
    lines = [f"# {deployment.model} is serving", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Why this build", "", plan.selection.reason]
    if plan.selection.skipped:
        lines += ["", "| skipped build | why |", "| --- | --- |"]
        lines += [f"| `{ref}` | {'; '.join(problems)} |" for ref, problems in plan.selection.skipped]
    if plan.replaces is not None:
        lines += ["", f"Replaced `{plan.replaces.ref}` (drained first)."]
    return "\n".join(lines) + "\n"


def api_key(secret_block: str | None) -> SecretStr | None:
    """The runner's key: the Prefect Secret block named ``secret_block``, else ``VLMFORGE_API_KEY`` of this
    process's environment, else None."""
    if not secret_block:
        value = os.environ.get(API_KEY_ENV)
        return SecretStr(value) if value else None
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(secret_block).get()
    except ValueError as exc:
        raise DeployError(f"no Prefect Secret block {secret_block!r} ({exc}): create it with `python -c \"from "
                          "prefect.blocks.system import Secret; import os; Secret(value=os.environ['VLMFORGE_API_KEY'])"
                          f".save('{secret_block}', overwrite=True)\"`, or pass another api_key_secret") from None
    if not isinstance(value, str):
        raise DeployError(f"the Prefect Secret block {secret_block!r} holds a {type(value).__name__}; the runner's API "
                          "key must be a string")
    return SecretStr(value)


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    what = params.get("model") or Path(params.get("engine_dir") or "engine").name
    return f"deploy-{what}-{params.get('port', 8000)}"


@flow(name="deploy-runner", flow_run_name=_run_name, validate_parameters=True)
def deploy_runner(model: str = "", store: str | None = None, engine_dir: str | None = None, tp: int | None = None,
                  host: str = "127.0.0.1", port: int = 8000, hostfile: str | None = None, replace: bool = True,
                  max_batch_size: int | None = None, decode: DecodeMode = DecodeMode.AUTO,
                  compile_mode: CompileMode = CompileMode.MAX_AUTOTUNE, warmup: bool = True, wait_s: float = 600.0,
                  state_dir: str | None = None, cache_dir: str | None = None,
                  launcher: Literal["process", "docker"] = "process", image: str | None = None,
                  volumes: list[str] | None = None, network: str | None = None,
                  api_key_secret: str | None = None) -> dict[str, Any]:
    """Deploy MODEL (the newest build that fits), MODEL@ALIAS or MODEL#BUILD_ID from the store, or a local
    engine directory; replaces (drains) a running deployment of the same name. ``launcher="docker"`` starts the
    runner as a container of ``image`` (with ``volumes`` mounted: the cache volume the flow pulls into).
    ``api_key_secret``: the Prefect Secret block holding the runner's API key (needed unless ``host`` is loopback
    and the launcher a process)."""
    secret = api_key(api_key_secret)
    source = LocalEngineSource(Path(engine_dir)) if engine_dir else StoreSource(store)
    state = Path(state_dir) if state_dir else None
    docker = None
    if launcher == "docker":
        if not image:
            raise ValueError("launcher docker needs image (the runner image, e.g. vlmforge-runner:local)")
        docker = DockerRunner(image=image, volumes=volumes or [], network=network)
    plan = t.choose(model, source, tp=tp, host=host, port=port, hostfile=Path(hostfile) if hostfile else None,
                    state_dir=state, replace=replace, docker=docker, api_key=secret)
    engine = t.pull(plan, source, Path(cache_dir) if cache_dir else None)
    args = serve_args(decode=decode.value, compile_mode=compile_mode.value, warmup=warmup, max_batch_size=max_batch_size,
                      tune_store=runner_tune_store(store, from_store=engine_dir is None, container=docker is not None))
    deployment = t.start(plan, engine, source, state_dir=state, serve_args=args, wait_s=wait_s, api_key=secret)
    key = _key(deployment.name)
    create_link_artifact(key=key, link=f"{deployment.endpoint}/v1/models", link_text=f"{deployment.ref} (TP {deployment.tp})",
                         description=f"{deployment.model}: OpenAI-compatible endpoint")
    create_markdown_artifact(deployment_markdown(deployment, plan), key=f"{key}-report",
                             description=f"{deployment.model}: deployment")
    return {"name": deployment.name, "endpoint": deployment.endpoint, "engine": deployment.ref,
            "build_id": deployment.build_id, "tp": deployment.tp, "engine_dir": str(deployment.engine_dir),
            "selection": plan.selection.reason, "auth": deployment.auth.value,
            "key_fingerprint": deployment.key_fingerprint}
