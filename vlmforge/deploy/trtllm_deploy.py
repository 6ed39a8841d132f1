"""Deploying on trtllm-serve (``vlmforge deploy MODEL --backend trtllm-serve``), the whole path: choose the build
that holds a Hugging Face model folder (or take a local folder), make every refusal before anything is pulled or
started, check the folder, write the options file, start the container, wait for health, record it.

The artifact: trtllm-serve loads a Hugging Face model folder of the *whole* multimodal model. An hf build whose spec
sets ``artifacts.hf_checkpoint`` (off by default: it doubles what a build publishes) holds one as ``hf/``
(:data:`~vlmforge.deploy.trtllm_serve.HF_DIR`, hard-linked into the engine directory: the convert stage's cast
checkpoint, or for a quantized spec the quantize stage's ModelOpt unified export of the whole model) and its manifest repeats engine.json's record of it (the architecture, checked against the support matrix
before anything is pulled). The pull takes ``hf/`` and leaves the runner's llm/ and vision/ out
(:data:`SERVE_LEAVES_OUT`). Builds without one are passed over, saying why: the refusal names the fix (set
``artifacts.hf_checkpoint: true`` and rebuild, ``--checkpoint-dir``, or ``--backend vlmforge``).
``--checkpoint-dir`` deploys a folder on this machine instead (``vlmforge selftest --backend trtllm-serve`` does).
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from pydantic import BaseModel, SecretStr

from vlmforge.deploy.auth import is_loopback
from vlmforge.deploy.launchers import LaunchRequest
from vlmforge.deploy.launchers.base import port_in_use
from vlmforge.deploy.launchers.trtllm import TrtllmServeLauncher, TrtllmServeRunner, container_spec
from vlmforge.deploy.machine import BuildInfo
from vlmforge.deploy.records import Deployment, check_deployment_name, default_state_dir
from vlmforge.deploy.service import read_deployment, replaced_deployment, running, stop_deployment
from vlmforge.deploy.sources import BuildSource, default_cache_dir, is_exact
from vlmforge.deploy.trtllm_serve import (
    HF_DIR,
    RELEASE,
    ServeLimits,
    check_architecture,
    check_checkpoint,
    default_image,
    llm_api_options,
)
from vlmforge.errors import DeployError
from vlmforge.specs.derived import DEFAULT_MAX_OUTPUT_LEN
from vlmforge.specs.schema import Limits

SERVE_LEAVES_OUT = frozenset({"llm", "vision"})
"""What a pull for trtllm-serve leaves out: the vlmforge runner's language model and ONNX vision engine (it loads
``hf/`` alone)."""

log = logging.getLogger(__name__)


class LocalCheckpointSource:
    """A Hugging Face model folder on this machine, deployed as it is (``--checkpoint-dir``; nothing pulled)."""

    def __init__(self, model_dir: Path, model: str | None = None) -> None:
        self.model_dir = Path(model_dir).resolve()
        if not (self.model_dir / "config.json").is_file():
            raise DeployError(f"--checkpoint-dir {model_dir} holds no config.json: give a Hugging Face model folder")
        name = model or re.sub(r"[^A-Za-z0-9._-]", "-", self.model_dir.name).lstrip("._-") or "model"
        self.model = check_deployment_name(name[:100])

    def describe(self) -> str:
        return f"model folder {self.model_dir}"

    def candidates(self, ref: str) -> list[BuildInfo]:
        defaults = Limits()  # the spec's defaults: what a folder without a spec is sized for
        seq = defaults.max_input_len + (defaults.max_output_len or DEFAULT_MAX_OUTPUT_LEN)
        created = datetime.fromtimestamp((self.model_dir / "config.json").stat().st_mtime, UTC)
        return [BuildInfo(model=self.model, build_id="local", created_at=created, toolchain="hf",
                          spec={"limits": {"max_batch_size": defaults.max_batch_size}}, derived={"max_seq_len": seq},
                          has_hf_checkpoint=True)]

    def pull(self, build: BuildInfo, cache_dir: Path, *, exclude: frozenset[str] = frozenset()) -> Path:
        return self.model_dir


def model_folder(source: BuildSource, root: Path) -> Path:
    """The Hugging Face folder in what ``source`` pulled (a local folder is one itself)."""
    return root if isinstance(source, LocalCheckpointSource) else root / HF_DIR


class TrtllmPlan(BaseModel):
    """What a trtllm-serve deployment will be, decided (every refusal made) before anything is pulled or started."""

    ref: str
    build: BuildInfo
    selection: str
    name: str
    host: str
    port: int
    limits: ServeLimits
    image: str
    log_level: str = "info"
    replaces: Deployment | None = None


def _no_folder(ref: str, ordered: list[BuildInfo]) -> DeployError:
    """Why no build of ``ordered`` (newest first) can be served, and what to do."""
    newest = ordered[0]
    which = newest.ref if is_exact(ref) else f"{len(ordered)} build(s) of {newest.model}"
    head = (f"{which} hold(s) no Hugging Face model folder of the whole model ({HF_DIR}/config.json), which "
            "trtllm-serve loads")
    if newest.toolchain == "trtllm":
        why = (f"{newest.ref} is a TensorRT engine build (--toolchain trtllm), which publishes no {HF_DIR}/: build the "
               f"spec with --toolchain hf and artifacts.hf_checkpoint: true")
    else:
        why = (f"{newest.ref} was built without it (it holds vision/, llm/: the language model alone, and processor/): "
               "set artifacts.hf_checkpoint: true in the spec (unquantized, or quantized with int4_awq, w4a8_awq, "
               f"int8_sq or fp8: ModelOpt's unified checkpoint) and rebuild it (`vlmforge build SPEC.yaml`), which "
               f"publishes {HF_DIR}/")
    return DeployError(f"{head}: {why}; or deploy a folder of this machine with --checkpoint-dir, or deploy the build "
                       "with the vlmforge runner (--backend vlmforge)")


def _choose(ref: str, builds: list[BuildInfo], source: BuildSource) -> tuple[BuildInfo, str]:
    if not builds:
        raise DeployError(f"no builds of {ref!r} in {source.describe()}")
    ordered = sorted(builds, key=lambda b: (b.created_at, b.build_id), reverse=True)
    usable = [b for b in ordered if b.has_hf_checkpoint]
    if not usable:
        raise _no_folder(ref, ordered)
    build = usable[0]
    if build.hf_checkpoint is not None:  # refused before anything is pulled
        check_architecture(build.hf_checkpoint.architecture, f"{build.ref}'s {HF_DIR}/config.json")
    passed = [b.ref for b in ordered if b.created_at > build.created_at and not b.has_hf_checkpoint]
    reason = (f"selected {build.ref} from {source.describe()}" + (f" (newer builds without {HF_DIR}/: "
              f"{', '.join(passed)})" if passed else "") + f"; TensorRT-LLM {RELEASE}'s trtllm-serve")
    return build, reason


def plan_trtllm_serve(ref: str, source: BuildSource, *, tp: int | None = None, host: str = "127.0.0.1",
                      port: int = 8000, name: str | None = None, state_dir: Path | None = None, replace: bool = False,
                      image: str | None = None, api_key: SecretStr | None = None, hostfile: Path | None = None,
                      max_batch_size: int | None = None, max_seq_len: int | None = None,
                      kv_cache_fraction: float | None = None, log_level: str = "info",
                      check_port: bool = True) -> TrtllmPlan:
    """Choose the build (the newest holding ``hf/``; an exact ref must hold it) and check the deployment, refusing
    before anything is pulled or started what cannot work: a key trtllm-serve would not check, an address other
    than loopback, a hostfile, a name in use, a port in use."""
    if name is not None:
        check_deployment_name(name)
    TrtllmServeLauncher().check(hostfile=hostfile)
    if api_key is not None:
        raise DeployError("an API key was given (--api-key or $VLMFORGE_API_KEY), but trtllm-serve checks none, so it "
                          "would not be enforced: deploy it without a key on loopback and put an authenticating proxy "
                          "in front (unset VLMFORGE_API_KEY)")
    if not is_loopback(host):
        raise DeployError(f"--host {host}: trtllm-serve has no client authentication, so vlmforge serves it on loopback "
                          "only (--host 127.0.0.1); reach it from elsewhere through an authenticating proxy")
    build, reason = _choose(ref, source.candidates(ref), source)
    limits = ServeLimits.from_manifest(build.spec, build.derived, tp=tp, max_batch_size=max_batch_size,
                                       max_seq_len=max_seq_len, kv_cache_fraction=kv_cache_fraction)
    name = check_deployment_name(name or f"{build.model}-{port}")
    state_dir = state_dir or default_state_dir()
    replaces = replaced_deployment(read_deployment(state_dir, name), name, replace=replace)
    if replaces is None and check_port and port_in_use(host, port):
        raise DeployError(f"port {port} on {host} is in use: pass another --port")
    return TrtllmPlan(ref=ref, build=build, selection=reason, name=name, host=host, port=port, limits=limits,
                      image=image or default_image(), log_level=log_level, replaces=replaces)


def _request(plan: TrtllmPlan, folder: Path, state_dir: Path, source: str, wait_s: float) -> LaunchRequest:
    return LaunchRequest(build=plan.build, engine_dir=folder, name=plan.name, tp=plan.limits.tp, host=plan.host,
                         port=plan.port, state_dir=state_dir, selection=plan.selection, source=source, gpus=True,
                         wait_s=wait_s)


def _runner(plan: TrtllmPlan) -> TrtllmServeRunner:
    return TrtllmServeRunner(image=plan.image, limits=plan.limits, options=llm_api_options(plan.limits),
                             log_level=plan.log_level)  # type: ignore[arg-type]


class DryRun(BaseModel):
    """What ``--dry-run`` prints: the container's command line and the options file, nothing started."""

    plan: TrtllmPlan
    docker_run: list[str]
    command: list[str]
    options_file: Path
    options_yaml: str
    checked: str
    """Whether the model folder was checked (a local folder) or will be once pulled (a store build)."""

    def render(self) -> str:
        import shlex

        return "\n".join([
            f"# {self.plan.selection}", f"# {self.checked}", "# the container (nothing was started):",
            shlex.join(self.docker_run), f"# the options file (deploy writes it to {self.options_file}):",
            self.options_yaml.rstrip()])


def dry_run(plan: TrtllmPlan, source: BuildSource, *, cache_dir: Path | None = None,
            state_dir: Path | None = None) -> DryRun:
    """The command and options file :func:`deploy_trtllm_serve` would use; pulls and starts nothing. A local folder
    is checked now; a store build's folder is where the pull would put it, checked when it is pulled."""
    state_dir = state_dir or default_state_dir()
    checked = "the model folder is checked once pulled"
    if isinstance(source, LocalCheckpointSource):
        folder = source.model_dir
        checked = f"model folder checked: {check_checkpoint(folder, plan.limits).architecture}"
    else:
        folder = (cache_dir or default_cache_dir()) / plan.build.model / plan.build.build_id / HF_DIR
        recorded = plan.build.hf_checkpoint
        if recorded is not None and recorded.architecture:
            form = (f"ModelOpt unified checkpoint, {recorded.quant_algo}"
                    + (f", KV cache {recorded.kv_cache_quant_algo}" if recorded.kv_cache_quant_algo else "")
                    + f", float tensors {recorded.dtype}") if recorded.kind == "unified" else recorded.dtype
            checked = (f"the build records {HF_DIR}/ as {recorded.architecture} ({form}), in the support "
                       "matrix; the model folder is checked once pulled")
    runner = _runner(plan)
    request = _request(plan, folder, state_dir, source.describe(), 1.0)
    spec = container_spec(request, runner)
    return DryRun(plan=plan, docker_run=spec.docker_run_argv(), command=spec.command, options_file=spec.options_file,
                  options_yaml=runner.options.to_yaml(), checked=checked)


def deploy_trtllm_serve(plan: TrtllmPlan, source: BuildSource, *, cache_dir: Path | None = None,
                        state_dir: Path | None = None, wait_s: float = 1800.0) -> Deployment:
    """Pull (a store build: verified), check the model folder, stop what this replaces, start trtllm-serve's
    container, wait until healthy, record it."""
    state_dir = state_dir or default_state_dir()
    root = source.pull(plan.build, cache_dir or default_cache_dir(), exclude=SERVE_LEAVES_OUT)
    folder = model_folder(source, root)
    facts = check_checkpoint(folder, plan.limits)
    log.info("%s: %s%s", folder, facts.architecture, f" ({facts.quantization})" if facts.quantization else "")
    if plan.replaces is not None and running(plan.replaces):
        log.info("replacing %s (%s)", plan.replaces.name, plan.replaces.ref)
        stop_deployment(plan.replaces, state_dir=state_dir)
        if port_in_use(plan.host, plan.port):
            raise DeployError(f"port {plan.port} on {plan.host} is still in use after stopping {plan.name}")
    return TrtllmServeLauncher(_runner(plan)).start(_request(plan, folder, state_dir, source.describe(), wait_s))
