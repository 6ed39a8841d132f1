"""The deploy flow: choose the build that fits this machine, pull it, start the runner, and leave an artifact
with its endpoint, engine id and TP.

With ``launcher="process"`` it runs where the runner should run (the flow run's machine starts `mpirun` in a
session of its own, which outlives the flow run). With ``launcher="docker"`` (prefect.yaml's deploy-runner
deployments) the flow run's own container is short-lived: the runner is a container of the runner image,
started through the host's Docker daemon, and the build is chosen for what that image and host offer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from vlmforge_tasks import deploy as t
from vlmforge.deploy.docker import DockerRunner
from vlmforge.deploy.service import Deployment, DeployPlan, LocalEngineSource, StoreSource, serve_args
from vlmforge.runner import CompileMode, DecodeMode


def _key(name: str) -> str:
    return "deploy-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())


def deployment_markdown(deployment: Deployment, plan: DeployPlan) -> str:
    rows = [("endpoint", f"[{deployment.endpoint}/v1]({deployment.endpoint}/v1/models)"),
            ("engine", f"`{deployment.ref}`"), ("tensor parallel", str(deployment.tp)),
            ("toolchain", plan.build.toolchain), ("engine directory", f"`{deployment.engine_dir}`"),
            ("source", deployment.source), ("deployment", f"`{deployment.name}`"), ("log", f"`{deployment.log}`"),
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
                  volumes: list[str] | None = None, network: str | None = None) -> dict[str, Any]:
    """Deploy MODEL (the newest build that fits), MODEL@ALIAS or MODEL#BUILD_ID from the store, or a local
    engine directory; replaces (drains) a running deployment of the same name. ``launcher="docker"`` starts the
    runner as a container of ``image`` (with ``volumes`` mounted: the cache volume the flow pulls into)."""
    source = LocalEngineSource(Path(engine_dir)) if engine_dir else StoreSource(store)
    state = Path(state_dir) if state_dir else None
    docker = None
    if launcher == "docker":
        if not image:
            raise ValueError("launcher docker needs image (the runner image, e.g. vlmforge-runner:local)")
        docker = DockerRunner(image=image, volumes=volumes or [], network=network)
    plan = t.choose(model, source, tp=tp, host=host, port=port, hostfile=Path(hostfile) if hostfile else None,
                    state_dir=state, replace=replace, docker=docker)
    engine = t.pull(plan, source, Path(cache_dir) if cache_dir else None)
    args = serve_args(decode=decode.value, compile_mode=compile_mode.value, warmup=warmup, max_batch_size=max_batch_size)
    deployment = t.start(plan, engine, source, state_dir=state, serve_args=args, wait_s=wait_s)
    key = _key(deployment.name)
    create_link_artifact(key=key, link=f"{deployment.endpoint}/v1/models", link_text=f"{deployment.ref} (TP {deployment.tp})",
                         description=f"{deployment.model}: OpenAI-compatible endpoint")
    create_markdown_artifact(deployment_markdown(deployment, plan), key=f"{key}-report",
                             description=f"{deployment.model}: deployment")
    return {"name": deployment.name, "endpoint": deployment.endpoint, "engine": deployment.ref,
            "build_id": deployment.build_id, "tp": deployment.tp, "engine_dir": str(deployment.engine_dir),
            "selection": plan.selection.reason}
