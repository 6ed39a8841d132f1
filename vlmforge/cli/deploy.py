"""CLI: `deploy` (start a runner for a model from the store, or an engine directory), `deployments`, `undeploy`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr

from vlmforge.cli.app import app, console, err_console, print_json
from vlmforge.deploy.auth import API_KEY_ENV
from vlmforge.deploy.launchers import DockerRunner
from vlmforge.deploy.records import LauncherKind, ServeBackend
from vlmforge.errors import DeployError
from vlmforge.runner import CompileMode, DecodeMode

StateOpt = Annotated[Path | None, typer.Option("--state-dir", help="Where deployments are recorded (default: $VLMFORGE_STATE/deployments or ~/.local/state/vlmforge/deployments).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _summary(deployment: Any, status: str | None = None) -> dict[str, Any]:
    data = deployment.model_dump(mode="json", exclude={"argv", "selection"})
    data["ref"] = deployment.ref
    data["rank0_pid"] = deployment.rank0_pid()
    if status is not None:
        data["status"] = status
    return data


@app.command("deploy")
def deploy_cmd(
    ref: Annotated[str | None, typer.Argument(help="MODEL (the newest build that fits this machine), MODEL@ALIAS or MODEL#BUILD_ID.")] = None,
    store: Annotated[str | None, typer.Option("--store", help="Artifact store URL (default: $VLMFORGE_STORE).")] = None,
    engine_dir: Annotated[Path | None, typer.Option("--engine-dir", help="Deploy this local engine directory instead of a store build.")] = None,
    tp: Annotated[int | None, typer.Option("--tp", min=1, help="Tensor-parallel ranks (must equal the build's world size; default: it).")] = None,
    host: Annotated[str, typer.Option(help="Address the runner listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the runner listens on.")] = 8000,
    hostfile: Annotated[Path | None, typer.Option("--hostfile", help="Open MPI hostfile: ranks across hosts (rank 0 on the first).")] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name (default: MODEL-PORT).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="Requests decoded together (default: the engine's).")] = None,
    image_root: Annotated[Path | None, typer.Option(help="Let requests name images under this directory with file:// URLs.")] = None,
    decode: Annotated[DecodeMode, typer.Option(help="The runner's decode path: auto, static or dynamic (vlmforge serve --decode).")] = DecodeMode.AUTO,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="Compile the static decode path before reporting healthy.")] = True,
    compile_mode: Annotated[CompileMode, typer.Option(help="torch.compile mode of the static decode step (vlmforge serve --compile-mode).")] = CompileMode.MAX_AUTOTUNE,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the runner to be healthy.")] = 600.0,
    replace: Annotated[bool, typer.Option("--replace", help="Stop (drain) a running deployment of the same name first.")] = False,
    foreground: Annotated[bool, typer.Option("--foreground", help="Stay attached: SIGTERM/SIGINT here drain the runner (containers).")] = False,
    launcher: Annotated[LauncherKind, typer.Option(help="process: mpirun/the runner as a child of this command; docker: a runner container through the Docker daemon.")] = LauncherKind.PROCESS,
    image: Annotated[str | None, typer.Option(help="--launcher docker: the runner image (vlmforge-runner:TAG, vlmforge-runner-cpu:TAG); --backend trtllm-serve: the TensorRT-LLM image (default: $VLMFORGE_TRTLLM_SERVE_IMAGE, else the pinned release).")] = None,
    volume: Annotated[list[str] | None, typer.Option("--volume", help="--launcher docker: a mount SOURCE:TARGET[:MODE] (default: the engine dir, read-only).")] = None,
    network: Annotated[str | None, typer.Option(help="--launcher docker: the Docker network of the runner.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar=API_KEY_ENV, show_default=False, help=f"The key clients must send (Authorization: Bearer KEY); required unless --host is loopback, and always for --launcher docker. Prefer ${API_KEY_ENV}: an option shows in `ps`. It reaches rank 0 through its environment; records keep only its fingerprint.")] = None,
    backend: Annotated[ServeBackend, typer.Option(help="vlmforge: vlmforge's runner on a build's engine; trtllm-serve: TensorRT-LLM's own server on a build's Hugging Face model folder (hf/), in NVIDIA's release container (--image overrides the pinned one).")] = ServeBackend.VLMFORGE,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help="--backend trtllm-serve: deploy this Hugging Face model folder instead of a store build.")] = None,
    max_seq_len: Annotated[int | None, typer.Option(min=2, help="--backend trtllm-serve: prompt + output tokens per request (default: the build's).")] = None,
    kv_cache_fraction: Annotated[float | None, typer.Option(help="--backend trtllm-serve: share of the GPU memory left after the weights that the KV cache takes (default 0.9).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="--backend trtllm-serve: print the container's command and the options file; start nothing.")] = False,
    state_dir: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a runner: pick or check the build (toolchain, TensorRT versions, GPU architecture and count, TP), pull
    and verify it into the local cache, start `mpirun -n TP ... vlmforge serve`, wait until healthy, record it.
    With --backend trtllm-serve: TensorRT-LLM's server on the build's Hugging Face model folder instead."""
    from vlmforge.deploy.service import deploy, runner_tune_store, serve_args
    from vlmforge.deploy.sources import LocalEngineSource, StoreSource

    if backend is ServeBackend.TRTLLM_SERVE:
        if engine_dir is not None or launcher is not LauncherKind.PROCESS or volume or network or image_root:
            raise DeployError("--backend trtllm-serve runs NVIDIA's container itself on a Hugging Face model folder: "
                              "--engine-dir, --launcher, --volume, --network and --image-root go with --backend vlmforge")
        if foreground:
            raise DeployError("--foreground goes with --backend vlmforge (trtllm-serve runs as a container: stop it "
                              "with `vlmforge undeploy`)")
        _trtllm_serve(ref, store=store, checkpoint_dir=checkpoint_dir, tp=tp, host=host, port=port, hostfile=hostfile,
                      name=name, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                      kv_cache_fraction=kv_cache_fraction, image=image, wait=wait, replace=replace, dry_run=dry_run,
                      api_key=SecretStr(api_key) if api_key else None, state_dir=state_dir, as_json=as_json)
        return
    if checkpoint_dir is not None or max_seq_len is not None or kv_cache_fraction is not None or dry_run:
        raise DeployError("--checkpoint-dir, --max-seq-len, --kv-cache-fraction and --dry-run go with --backend "
                          "trtllm-serve")
    if engine_dir is None and ref is None:
        raise DeployError("name a model (MODEL, MODEL@ALIAS or MODEL#BUILD_ID) or an --engine-dir")
    if engine_dir is not None and store is not None:
        raise DeployError("--store and --engine-dir exclude each other")
    source = LocalEngineSource(engine_dir) if engine_dir is not None else StoreSource(store)
    docker = None
    if launcher is LauncherKind.DOCKER:
        if not image:
            raise DeployError("--launcher docker needs --image (the runner image, e.g. vlmforge-runner:local from "
                              "infra/build-images.sh runner)")
        if foreground:
            raise DeployError("--foreground stays attached to a runner process; with --launcher docker the container "
                              "is the long-lived process (stop it with `vlmforge undeploy`)")
        docker = DockerRunner(image=image, volumes=volume or [], network=network)
    elif image or volume or network:
        raise DeployError("--image, --volume and --network go with --launcher docker")
    if docker is not None and image_root is not None and not any(
            image_root.resolve().is_relative_to(mount.split(":")[1]) for mount in docker.volumes if ":" in mount):
        raise DeployError(f"--image-root {image_root} is a path here; with --launcher docker give a --volume that mounts "
                          "it in the runner container too")
    args = serve_args(decode=decode.value, compile_mode=compile_mode.value, warmup=warmup, max_batch_size=max_batch_size,
                      image_root=image_root,
                      tune_store=runner_tune_store(store, from_store=engine_dir is None, container=docker is not None))
    deployment = deploy(ref or "", source, tp=tp, host=host, port=port, hostfile=hostfile, name=name,
                        state_dir=state_dir, serve_args=args, wait_s=wait, replace=replace, docker=docker,
                        api_key=SecretStr(api_key) if api_key else None)
    if as_json:
        print_json({**_summary(deployment, "serving"), "selection": deployment.selection})
    else:
        console.print(deployment.selection, highlight=False)
        console.print(f"[bold green]serving[/] {deployment.ref} at {deployment.endpoint}/v1 (TP {deployment.tp}, "
                      f"deployment {deployment.name}, "
                      + (f"container {deployment.container[:12]}: `{deployment.log}`)" if deployment.container
                         else f"log {deployment.log})"), highlight=False)
    if foreground:
        raise typer.Exit(_attach(deployment, state_dir))


def _trtllm_serve(ref: str | None, *, store: str | None, checkpoint_dir: Path | None, state_dir: Path | None,
                  as_json: bool, dry_run: bool, wait: float, **options: Any) -> None:
    """`deploy --backend trtllm-serve`: plan (every refusal first), then print the dry run or start and record."""
    from vlmforge.deploy.sources import StoreSource
    from vlmforge.deploy.trtllm_deploy import LocalCheckpointSource, deploy_trtllm_serve, plan_trtllm_serve
    from vlmforge.deploy.trtllm_deploy import dry_run as make_dry_run

    if checkpoint_dir is None and ref is None:
        raise DeployError("name a model (MODEL, MODEL@ALIAS or MODEL#BUILD_ID) or a --checkpoint-dir")
    if checkpoint_dir is not None and store is not None:
        raise DeployError("--store and --checkpoint-dir exclude each other")
    source: Any = LocalCheckpointSource(checkpoint_dir, ref) if checkpoint_dir is not None else StoreSource(store)
    plan = plan_trtllm_serve(ref or "", source, state_dir=state_dir, check_port=not dry_run, **options)
    if dry_run:
        shown = make_dry_run(plan, source, state_dir=state_dir)
        if as_json:
            print_json(shown.model_dump(mode="json"))
        else:
            console.print(shown.render(), highlight=False, markup=False, soft_wrap=True)
        return
    deployment = deploy_trtllm_serve(plan, source, state_dir=state_dir, wait_s=wait)
    if as_json:
        print_json({**_summary(deployment, "serving"), "selection": deployment.selection})
    else:
        console.print(deployment.selection, highlight=False)
        console.print(f"[bold green]serving[/] {deployment.ref} with trtllm-serve at {deployment.endpoint}/v1 (TP "
                      f"{deployment.tp}, deployment {deployment.name}, container {(deployment.container or '')[:12]}: "
                      f"`{deployment.log}`)", highlight=False)


def _attach(deployment: Any, state_dir: Path | None) -> int:
    """Wait for the runner; SIGTERM/SIGINT here go to rank 0, which drains. The runner's exit code."""
    import os

    from vlmforge.deploy.records import default_state_dir, remove_record
    from vlmforge.system.processes import same_process

    def forward(signum: int, frame: Any) -> None:
        rank0 = deployment.rank0_identity()  # the launcher is our child: its pid is not reused before we reap it
        os.kill(rank0.pid if rank0 is not None and same_process(rank0) else deployment.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = deployment._proc.wait()
    remove_record(state_dir or default_state_dir(), deployment.name)
    return code


@app.command("deployments")
def deployments_cmd(state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """The runners deployed from this machine and whether they serve."""
    from vlmforge.cli.tables import Col, fit_table
    from vlmforge.deploy.service import list_deployments

    found = list_deployments(state_dir)
    if as_json:
        print_json([_summary(d, status) for d, status in found])
        return
    if not found:
        console.print("no deployments")
        return
    columns = (Col("name", keep=True), Col("build", keep=True), Col("endpoint", keep=True),
               Col("tp", drop=1, justify="right"), Col("status", whole_words=True), Col("started", drop=0))
    rows = [(d.name, d.ref, d.endpoint, str(d.tp), status, f"{d.started_at:%Y-%m-%d %H:%M:%S}") for d, status in found]
    console.print(fit_table(console, columns, rows))


@app.command("undeploy")
def undeploy_cmd(
    name: Annotated[str, typer.Argument(help="Deployment name (see `vlmforge deployments`).")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for running requests before killing.")] = 180.0,
    state_dir: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drain and stop a runner: SIGTERM to rank 0 (running requests finish), SIGKILL after --timeout."""
    from vlmforge.deploy.records import default_state_dir
    from vlmforge.deploy.service import list_deployments, read_deployment, stop_deployment

    directory = state_dir or default_state_dir()
    deployment = read_deployment(directory, name)
    if deployment is None:
        known = ", ".join(d.name for d, _ in list_deployments(directory)) or "none"
        raise DeployError(f"no deployment {name} (deployments: {known})")
    how = stop_deployment(deployment, state_dir=directory, timeout=timeout)
    if as_json:
        print_json({"name": name, "ref": deployment.ref, "result": how})
    else:
        err_console.print(f"{name} ({deployment.ref}): {how}", highlight=False)
