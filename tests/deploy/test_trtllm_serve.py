"""The trtllm-serve backend where TensorRT-LLM cannot run (no GPU, no release image): which build it takes and
why, every refusal before anything is pulled or started, the model folder checks, the container it would start
(``--dry-run``), a real pull from both store backends up to the GPU refusal, the records that deployments/undeploy
read (the selftest: test_trtllm_selftest.py). The container itself runs only at a site with
NVIDIA's image and GPUs (``vlmforge selftest --backend trtllm-serve``)."""

from __future__ import annotations

import json
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from tests.helpers.deploy import T0, RecordingSource, build, cli
from tests.helpers.net import free_port
from tests.helpers.store import new_manifest
from vlmforge.deploy.environment import container_environment
from vlmforge.deploy.launchers import LaunchRequest, launcher_of
from vlmforge.deploy.launchers.trtllm import TrtllmServeLauncher, TrtllmServeRunner, container_spec, preflight
from vlmforge.deploy.machine import BuildInfo
from vlmforge.deploy.records import Deployment, ServeBackend, read_record, write_record
from vlmforge.deploy.sources import StoreSource
from vlmforge.deploy.trtllm_deploy import LocalCheckpointSource, deploy_trtllm_serve, dry_run, plan_trtllm_serve
from vlmforge.deploy.trtllm_serve import HF_DIR, ServeLimits, check_checkpoint, llm_api_options
from vlmforge.errors import DeployError
from vlmforge.store import open_store

MODEL = "qwen2-vl-2b"


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-NeXT model folder (what the selftest deploys): a real folder trtllm-serve's checks accept."""
    from vlmforge.deploy.trtllm_selftest import make_tiny_llava_next

    return make_tiny_llava_next(tmp_path_factory.mktemp("next") / "tiny-llava-next")


def hf_build(build_id: str, age_days: int, *, hf: bool = True) -> BuildInfo:
    made = build(build_id, age_days, toolchain="hf")
    return made.model_copy(update={"has_hf_checkpoint": hf, "spec": {"limits": {"max_batch_size": 4},
                                                                     "parallel": {"tp": 1, "pp": 1}},
                                   "derived": {"max_seq_len": 2560}})


# --- the model folder ----------------------------------------------------------------------------------


def test_a_whole_multimodal_folder_passes_and_what_trtllm_serve_would_refuse_or_serve_wrongly_is_named(
        tiny_next: Path, tmp_path: Path) -> None:
    limits = ServeLimits(max_batch_size=2, max_seq_len=512)
    assert check_checkpoint(tiny_next, limits).architecture == "LlavaNextForConditionalGeneration"
    with pytest.raises(DeployError, match="does not divide the language model's 2 attention heads"):
        check_checkpoint(tiny_next, limits.model_copy(update={"tp": 4}))

    def broken(edit: str) -> Path:
        folder = tmp_path / edit
        shutil.copytree(tiny_next, folder)
        if edit == "llm-only":  # what a vlmforge build's llm/ is: the language model alone
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config["text_config"], "architectures": ["LlamaForCausalLM"]}))
        elif edit == "no-template":
            (folder / "chat_template.jinja").unlink()
            config = json.loads((folder / "tokenizer_config.json").read_text())
            config.pop("chat_template", None)
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        else:
            (folder / edit).unlink()
        return folder

    for edit, said in (("llm-only", "text-only"), ("no-template", "chat API only"), ("model.safetensors", "weights"),
                       ("processor_config.json", "image processor"), ("config.json", "no config.json")):
        with pytest.raises(DeployError, match=said):
            check_checkpoint(broken(edit), limits)


def test_limits_come_from_the_build_and_bad_overrides_name_the_option() -> None:
    spec, derived = {"limits": {"max_batch_size": 8}, "parallel": {"tp": 2, "pp": 1}}, {"max_seq_len": 1024}
    assert ServeLimits.from_manifest(spec, derived) == ServeLimits(max_batch_size=8, max_seq_len=1024, tp=2)
    assert ServeLimits.from_manifest(spec, derived, tp=1, max_seq_len=None).tp == 1
    with pytest.raises(DeployError, match="--kv-cache-fraction 1.5"):
        ServeLimits.from_manifest(spec, derived, kv_cache_fraction=1.5)
    with pytest.raises(DeployError, match="--tp 0"):
        ServeLimits.from_manifest(spec, derived, tp=0)
    with pytest.raises(DeployError, match="records no max_seq_len"):
        ServeLimits.from_manifest(spec, {})


# --- planning: every refusal before anything is pulled or started ----------------------------------------


def test_the_newest_build_holding_a_model_folder_is_taken_and_newer_ones_without_it_are_named(tmp_path: Path) -> None:
    source = RecordingSource([hf_build("newest-engine-only", 0, hf=False), hf_build("with-hf", 1),
                              hf_build("older-with-hf", 2)])
    plan = plan_trtllm_serve("llava-1.5-7b-hf", source, port=free_port(), state_dir=tmp_path)
    assert plan.build.build_id == "with-hf" and "newer builds without hf/: llava-1.5-7b-hf#newest-engine-only" in \
        plan.selection
    assert plan.limits == ServeLimits(max_batch_size=4, max_seq_len=2560) and source.pulled == []
    assert plan.image == "nvcr.io/nvidia/tensorrt-llm/release:1.4.0rc1"


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"api_key": SecretStr("k" * 32)}, "checks none, so it would not be enforced"),
    ({"host": "0.0.0.0"}, "no client authentication"),
    ({"hostfile": Path("/etc/hosts")}, "one container on one host"),
    ({"name": "../evil"}, "invalid deployment name"),
])
def test_what_trtllm_serve_cannot_do_is_refused_before_the_store_is_asked(kwargs: dict, said: str,
                                                                          tmp_path: Path) -> None:
    class Unasked(RecordingSource):
        def candidates(self, ref: str) -> list[BuildInfo]:
            raise AssertionError("asked before the refusal")

    with pytest.raises(DeployError, match=said):
        plan_trtllm_serve("m", Unasked([]), state_dir=tmp_path, **kwargs)


def test_builds_without_a_model_folder_and_a_busy_port_are_refused(tmp_path: Path) -> None:
    engines = RecordingSource([hf_build("a", 0, hf=False), hf_build("b", 1, hf=False)])
    with pytest.raises(DeployError, match=r"2 build\(s\) of llava-1.5-7b-hf hold\(s\) no Hugging Face model folder"):
        plan_trtllm_serve("llava-1.5-7b-hf", engines, state_dir=tmp_path)
    with pytest.raises(DeployError, match="llava-1.5-7b-hf#a hold"):
        plan_trtllm_serve("llava-1.5-7b-hf#a", RecordingSource([hf_build("a", 0, hf=False)]), state_dir=tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DeployError, match=f"port {port} on 127.0.0.1 is in use"):
            plan_trtllm_serve("m", RecordingSource([hf_build("a", 0)]), port=port, state_dir=tmp_path)
    assert engines.pulled == [] and not list(tmp_path.iterdir())


# --- the container -------------------------------------------------------------------------------------------


def test_the_dry_run_is_the_container_deploy_would_start(tiny_next: Path, tmp_path: Path) -> None:
    source = LocalCheckpointSource(tiny_next)
    plan = plan_trtllm_serve("", source, tp=2, port=8123, state_dir=tmp_path / "state", image="site/trtllm:1")
    shown = dry_run(plan, source, state_dir=tmp_path / "state")
    run = shown.docker_run
    assert run[:4] == ["docker", "run", "--detach", "--init"] and run[run.index("--gpus") + 1] == "2"
    assert f"{tiny_next}:/models/tiny-llava-next:ro" in run and "--network" in run and "host" in run
    assert run[run.index("site/trtllm:1") + 1:] == shown.command and shown.command[:3] == ["mpirun", "-n", "2"]
    assert yaml.safe_load(shown.options_yaml)["tensor_parallel_size"] == 2
    assert "checked: LlavaNextForConditionalGeneration" in shown.render()
    assert not (tmp_path / "state").exists()  # nothing written, nothing started
    request = LaunchRequest(build=plan.build, engine_dir=tiny_next, name=plan.name, tp=2, host="127.0.0.1",
                            port=8123, state_dir=tmp_path, selection="s", source="t", gpus=True)
    runner = TrtllmServeRunner(image="site/trtllm:1", limits=plan.limits, options=llm_api_options(plan.limits))
    spec = container_spec(request, runner, env={"NCCL_DEBUG": "INFO", "PATH": "/host/bin", "TORCH_TOKEN": "t",
                                                "CUDA_VISIBLE_DEVICES": "3", "TLLM_LOG_LEVEL": "INFO",
                                                "TORCHINDUCTOR_CACHE_DIR": "/host/cache", "HF_TOKEN": "t"})
    kwargs = spec.run_kwargs()  # the same container through the Docker SDK
    assert kwargs["command"] == spec.command and kwargs["network_mode"] == "host" and kwargs["ipc_mode"] == "host"
    assert kwargs["device_requests"][0]["Count"] == 2
    assert {v["bind"] for v in kwargs["volumes"].values()} == {"/models/tiny-llava-next",
                                                              "/etc/vlmforge/llm_api_options.yaml"}
    assert kwargs["environment"] == {"NCCL_DEBUG": "INFO", "TLLM_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1",
                                     "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                                     "TOKENIZERS_PARALLELISM": "false"}
    assert container_environment({"PATH": "/x"}) == {k: v for k, v in kwargs["environment"].items()
                                                     if not k.startswith(("NCCL", "TLLM"))}


def test_no_gpu_is_refused_before_the_docker_daemon_is_asked() -> None:
    with pytest.raises(DeployError, match=r"needs 2 NVIDIA GPU\(s\) \(one per rank\); this host has 1"):
        preflight("any:image", 2, client=object(), gpus=1)


# --- a real pull from the store, up to the GPU refusal ----------------------------------------------------------


def publish(store_url: str, root: Path, folder: Path | None, minutes: int) -> str:
    engine = root / f"engine-{minutes}"
    (engine / "llm").mkdir(parents=True)
    (engine / "llm" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    if folder is not None:
        shutil.copytree(folder, engine / HF_DIR)
    manifest = new_manifest(MODEL, minutes=minutes, seed=str(minutes)).model_copy(update={
        "toolchain": "hf", "spec": {"limits": {"max_batch_size": 2}, "parallel": {"tp": 1, "pp": 1}},
        "derived": {"max_seq_len": 512, "world_size": 1}})
    with open_store(store_url) as store:
        return store.publish(engine, manifest).manifest.build_id


def test_a_store_build_with_a_model_folder_is_pulled_verified_and_checked_then_refused_without_a_gpu(
        store_url: str, tiny_next: Path, tmp_path: Path) -> None:
    with_hf = publish(store_url, tmp_path, tiny_next, 0)
    publish(store_url, tmp_path, None, 5)  # newer, engine only: passed over
    source = StoreSource(store_url)
    state, cache = tmp_path / "state", tmp_path / "cache"
    plan = plan_trtllm_serve(MODEL, source, port=free_port(), state_dir=state)
    assert plan.build.build_id == with_hf and plan.limits.max_seq_len == 512
    assert str(cache / MODEL / with_hf / HF_DIR) in " ".join(dry_run(plan, source, cache_dir=cache).docker_run)
    with pytest.raises(DeployError, match="needs 1 NVIDIA GPU"):  # no GPU here: after the pull and the checks
        deploy_trtllm_serve(plan, source, cache_dir=cache, state_dir=state)
    pulled = cache / MODEL / with_hf / HF_DIR
    assert (pulled / "model.safetensors").read_bytes() == (tiny_next / "model.safetensors").read_bytes()
    assert not state.exists()  # nothing recorded, no options file left


# --- records: deployments / undeploy --------------------------------------------------------------------------


def trtllm_record(state: Path) -> Deployment:
    options = state / "tiny.llm_api.yaml"
    state.mkdir(parents=True, exist_ok=True)
    options.write_text("max_batch_size: 1\n")
    deployment = Deployment(name="tiny", model="tiny-llava-next", build_id="local", engine_dir=Path("/m"),
                            endpoint="http://127.0.0.1:8123", host="127.0.0.1", port=8123, tp=1, pid=0,
                            log=Path("docker logs vlmforge-tiny"), argv=["mpirun"], source="s", selection="s",
                            started_at=T0 + timedelta(hours=1), container="0" * 64, image="img:1", probe="http://x",
                            backend=ServeBackend.TRTLLM_SERVE, options_file=options)
    write_record(deployment, state)
    return deployment


def test_a_trtllm_serve_record_is_read_back_and_stopped_by_its_own_launcher(tmp_path: Path) -> None:
    deployment = trtllm_record(tmp_path)
    again = read_record(tmp_path, "tiny")
    assert again == deployment and again.rank0_identity() is None and again.pid_file is None
    assert isinstance(launcher_of(again), TrtllmServeLauncher)
    old = Deployment.model_validate({k: v for k, v in json.loads(again.model_dump_json()).items()
                                     if k not in ("backend", "options_file")})
    assert old.backend is ServeBackend.VLMFORGE  # records from before backends: vlmforge's runner


def test_undeploy_without_a_docker_daemon_says_so_and_keeps_the_record(tmp_path: Path) -> None:
    trtllm_record(tmp_path)
    done = cli("undeploy", "tiny", state=tmp_path, env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert done.returncode == 2 and "no Docker daemon answers" in done.stderr and "Traceback" not in done.stderr
    assert read_record(tmp_path, "tiny") is not None and (tmp_path / "tiny.llm_api.yaml").exists()


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_the_cli_dry_run_prints_the_command_and_options_and_a_real_deploy_is_refused_here(
        tiny_next: Path, tmp_path: Path) -> None:
    port = str(free_port())
    base = ("deploy", "tiny", "--backend", "trtllm-serve", "--checkpoint-dir", str(tiny_next), "--port", port)
    shown = cli(*base, "--dry-run", "--max-seq-len", "300", "--json", state=tmp_path)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    serve = data["command"][data["command"].index("trtllm-serve"):]
    assert serve[1:3] == ["serve", "/models/tiny"] and serve[-1] == "--no-telemetry"
    assert yaml.safe_load(data["options_yaml"])["max_seq_len"] == 300
    text = cli(*base, "--dry-run", state=tmp_path)
    assert "docker run --detach" in text.stdout and "max_num_tokens: 8192" in text.stdout
    refused = cli(*base, state=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert refused.returncode == 2 and "NVIDIA GPU" in refused.stderr and "Traceback" not in refused.stderr
    assert not list(tmp_path.iterdir())
    for extra, said in ((["--engine-dir", str(tmp_path)], "go with --backend vlmforge"),
                        (["--host", "0.0.0.0"], "loopback only"), (["--kv-cache-fraction", "0"], "--kv-cache-fraction")):
        done = cli(*base, "--dry-run", *extra, state=tmp_path)
        assert done.returncode == 2 and said in done.stderr, done.stderr
    wrong = cli("deploy", "tiny", "--dry-run", state=tmp_path)
    assert wrong.returncode == 2 and "go with --backend trtllm-serve" in wrong.stderr
