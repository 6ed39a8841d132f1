"""Deploy: which build fits which machine (constructed manifests and machines), refusals before anything
starts, and the CLI end to end on a real runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from tests.helpers.deploy import BUILDS, CPU, H100x2, RecordingSource, build, cli, publish_tiny_engine
from tests.helpers.net import ROOT, free_port
from tests.helpers.runners import chat_body, image_url, runner_env
from vlmforge.deploy.auth import fingerprint
from vlmforge.deploy.launchers.process import launch_argv
from vlmforge.deploy.machine import check_build, select_build
from vlmforge.deploy.service import deploy, plan_deploy
from vlmforge.errors import DeployError

KEY = "cli-test-key-" + "z" * 24


def test_the_newest_build_that_fits_is_chosen_and_the_others_explained() -> None:
    chosen = select_build(BUILDS, H100x2)
    assert chosen.build.build_id == "h100-tp2"
    assert "the newest of 6 builds that fits" in chosen.reason and "compute capability 9.0" in chosen.reason
    assert "TP 2 = its world size" in chosen.reason
    why = dict(chosen.skipped)
    assert list(why) == ["llava-1.5-7b-hf#a100-newest", "llava-1.5-7b-hf#h100-tp4", "llava-1.5-7b-hf#h100-old-trtllm"]
    assert "compute capability 8.0 (NVIDIA A100)" in why["llava-1.5-7b-hf#a100-newest"][0]
    assert why["llava-1.5-7b-hf#h100-tp4"] == ["TP 4 needs 4 GPUs; this machine has 2 (or pass --hostfile)"]
    assert why["llava-1.5-7b-hf#h100-old-trtllm"] == ["it was built with tensorrt_llm 1.1.0; this machine has 1.2.1"]
    assert "skipped llava-1.5-7b-hf#h100-tp4: TP 4 needs 4 GPUs" in chosen.explain()


def test_an_asked_tp_narrows_the_choice_and_a_hostfile_lifts_the_gpu_count() -> None:
    assert select_build(BUILDS, H100x2, tp=1).build.build_id == "h100-tp1"
    assert select_build(BUILDS, H100x2, tp=4, multi_host=True).build.build_id == "h100-tp4"
    with pytest.raises(DeployError, match="with TP 3") as caught:
        select_build(BUILDS, H100x2, tp=3)
    assert str(caught.value).count("not TP 3") == len(BUILDS)


def test_a_cpu_machine_gets_the_hf_build_and_says_why_not_tensorrt() -> None:
    chosen = select_build(BUILDS, CPU)
    assert chosen.build.build_id == "hf-tp1" and "runs on the CPU" in chosen.reason
    why = dict(chosen.skipped)["llava-1.5-7b-hf#h100-tp1"]
    assert any("TensorRT-LLM" in p for p in why) and any("NVIDIA GPU" in p for p in why)


def test_nothing_fits_lists_every_build() -> None:
    with pytest.raises(DeployError) as caught:
        select_build([b for b in BUILDS if b.toolchain == "trtllm"], CPU)
    message = str(caught.value)
    assert "no build of llava-1.5-7b-hf can run on this machine (no GPU, 2 CPU cores, hf 5.24.0)" in message
    assert message.count("\n  llava-1.5-7b-hf#") == 5


def test_check_build_versions_architecture_ranks_and_mpirun() -> None:
    assert check_build(build("ok", 0), H100x2) == []
    assert check_build(build("ok", 0, cc="8.9"), H100x2)[0].startswith("it was built for GPU compute capability 8.9")
    trt = build("trt", 0, versions={"tensorrt": "10.11.0", "tensorrt_llm": "1.2.1"})
    assert check_build(trt, H100x2) == ["it was built with tensorrt 10.11.0; this machine has 10.13.3"]
    no_mpi = CPU.model_copy(update={"mpirun": False})
    assert check_build(build("hf2", 0, toolchain="hf", world_size=2), no_mpi) == [
        "TP 2 runs under mpirun, which is not installed (apt-get install openmpi-bin)"]
    assert check_build(build("hf2", 0, toolchain="hf", world_size=2), CPU) == []


@pytest.mark.parametrize(("ref", "tp", "words"), [
    ("llava-1.5-7b-hf#a100-newest", None, "compute capability 8.0"),
    ("llava-1.5-7b-hf#h100-tp2", 1, r"world size 2\), not TP 1"),
    ("llava-1.5-7b-hf#h100-tp1", 2, "not TP 2"),
])
def test_a_mismatched_manifest_is_refused_before_anything_is_pulled_or_started(
        ref: str, tp: int | None, words: str, tmp_path: Path) -> None:
    source = RecordingSource(BUILDS)
    port = free_port()
    with pytest.raises(DeployError, match=words):
        deploy(ref, source, tp=tp, port=port, machine=H100x2, state_dir=tmp_path / "state",
               cache_dir=tmp_path / "cache")
    assert source.pulled == []
    assert not (tmp_path / "state").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(DeployError, match="port .* is in use"):
        import socket

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", port))
            busy.listen()
            plan_deploy("llava-1.5-7b-hf#h100-tp1", source, port=port, machine=H100x2, state_dir=tmp_path / "s")


def test_launch_argv_mpirun_for_tp_and_hostfiles(tmp_path: Path) -> None:
    engine, pid = tmp_path / "engine", tmp_path / "rank0.pid"
    alone = launch_argv(engine, tp=1, host="0.0.0.0", port=9000, model_name="m", pid_file=pid)
    assert alone[:4] == [sys.executable, "-m", "vlmforge", "serve"] and "mpirun" not in alone
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the runners\n\ngpu-node-1 slots=8\ngpu-node-2 slots=8\n")
    argv = launch_argv(engine, tp=16, host="0.0.0.0", port=9000, model_name="m", pid_file=pid, hostfile=hostfile,
                       gpus=True, master_port=29555,
                       env={"PATH": "/bin", "NCCL_DEBUG": "INFO", "SECRET": "x", "AWS_SECRET_ACCESS_KEY": "s",
                            "AWS_ACCESS_KEY_ID": "a", "AWS_ENDPOINT_URL": "http://s3", "HF_TOKEN": "t", "HF_HOME": "/hf",
                            "VLMFORGE_API_KEY": "k", "VLMFORGE_STORE": "s3://b", "NCCL_SOCKET_TOKEN": "t"})
    assert argv[:5] == ["mpirun", "-n", "16", "--bind-to", "none"]
    assert "--oversubscribe" not in argv and argv[argv.index("--hostfile") + 1] == str(hostfile)
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert exported == ["MASTER_ADDR=gpu-node-1", "MASTER_PORT=29555", "HF_HOME", "NCCL_DEBUG", "PATH"]
    keyed = launch_argv(engine, tp=16, host="0.0.0.0", port=9000, model_name="m", pid_file=pid, hostfile=hostfile,
                        gpus=True, master_port=29555, env={"PATH": "/bin"}, rank0_only=("VLMFORGE_API_KEY",))
    rank0, rest = keyed[:keyed.index(":")], keyed[keyed.index(":"):]
    exports = ["-x", "MASTER_ADDR=gpu-node-1", "-x", "MASTER_PORT=29555", "-x", "PATH"]
    serve = argv[argv.index(sys.executable):]
    assert rank0[rank0.index("-n"):] == ["-n", "1", *exports, "-x", "VLMFORGE_API_KEY", *serve]  # it may be remote
    assert rest == [":", "-n", "15", *exports, "env", "-u", "VLMFORGE_API_KEY", *serve]
    assert argv[argv.index("serve") + 1:argv.index("serve") + 2] == [str(engine)]


def test_the_cli_refuses_a_tp_the_engine_was_not_built_for(tiny_engine: Path, tmp_path: Path) -> None:
    port = free_port()
    done = cli("deploy", "--engine-dir", str(tiny_engine), "--tp", "2", "--port", str(port), state=tmp_path)
    assert done.returncode == 2
    assert "tiny-llava#local cannot be deployed here" in done.stderr and "not TP 2" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def test_the_cli_refuses_docker_options_that_do_not_go_together(tiny_engine: Path, tmp_path: Path) -> None:
    """Checked before the daemon is asked anything (the docker launcher itself: tests/e2e/test_docker_runner.py)."""
    base = ("deploy", "--engine-dir", str(tiny_engine), "--port", str(free_port()))
    hostfile = tmp_path.parent / f"{tmp_path.name}-hosts"
    hostfile.write_text("node-1 slots=1\n")
    for extra, said in ((["--image", "vlmforge-runner:local"], "--image, --volume and --network go with --launcher docker"),
                        (["--launcher", "docker"], "--launcher docker needs --image"),
                        (["--launcher", "docker", "--image", "x", "--foreground"], "with --launcher docker the container"),
                        (["--launcher", "kubernetes"], "--launcher"),
                        (["--launcher", "docker", "--image", "x", "--hostfile", str(hostfile)], "runs on one host"),
                        (["--launcher", "docker", "--image", "x", "--image-root", str(tmp_path)], "give a --volume")):
        done = cli(*base, *extra, state=tmp_path)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


def test_the_cli_refuses_a_tensorrt_engine_for_another_gpu(tiny_engine: Path, tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    config = json.loads((tiny_engine / "engine.json").read_text())
    config.update(toolchain="trtllm", compute_capability="8.0", tensorrt_version="10.13.3",
                  tensorrt_llm_version="1.2.1")
    (engine / "engine.json").write_text(json.dumps(config))
    done = cli("deploy", "--engine-dir", str(engine), state=tmp_path / "state")
    assert done.returncode == 2 and "TensorRT" in done.stderr and not (tmp_path / "state").exists()
    # serving it directly: the same clear refusal, from the runner
    served = subprocess.run([sys.executable, "-m", "vlmforge", "serve", str(engine), "--port", str(free_port())],
                            env=runner_env(), capture_output=True, text=True, timeout=120, cwd=ROOT,
                            check=False)
    assert served.returncode == 2 and "serving it needs TensorRT-LLM and a GPU" in served.stderr
    assert "Traceback" not in served.stderr


def test_deploy_list_request_undeploy_through_the_cli(tiny_engine: Path, tmp_path: Path) -> None:
    """With an API key in the deployer's environment (and an AWS secret, which no rank may get): the key reaches
    rank 0 through its environment only; the record, the output and every command line hold its fingerprint at
    most; clients send it as OpenAI clients do."""
    port = free_port()
    done = cli("deploy", "--engine-dir", str(tiny_engine), "--port", str(port), "--decode", "static", "--json",
               state=tmp_path, env={"VLMFORGE_API_KEY": KEY, "AWS_SECRET_ACCESS_KEY": "the-deployer's-aws-secret"})
    assert done.returncode == 0, done.stderr
    started = json.loads(done.stdout)
    try:  # every check inside: a failed one must not leave the runner behind
        assert started["endpoint"] == f"http://127.0.0.1:{port}" and started["tp"] == 1
        assert started["ref"] == "tiny-llava#local" and started["status"] == "serving"
        assert started["auth"] == "bearer" and started["key_fingerprint"] == fingerprint(SecretStr(KEY))
        record = (tmp_path / f"tiny-llava-{port}.json").read_text()
        assert KEY not in record and KEY not in done.stdout + done.stderr
        rank0 = started["rank0_pid"]
        environ = Path(f"/proc/{rank0}/environ").read_bytes().split(b"\0")
        assert f"VLMFORGE_API_KEY={KEY}".encode() in environ and not [e for e in environ if e.startswith(b"AWS_")]
        assert KEY not in Path(f"/proc/{rank0}/cmdline").read_text()
        headers = {"Authorization": f"Bearer {KEY}"}
        health = httpx.get(f"{started['endpoint']}/health", headers=headers, timeout=30).json()
        assert health["decode"] == "static" and health["status"] == "ok"
        assert "warmed up batch 4 (bucket 4 x" in Path(started["log"]).read_text()
        listing = cli("deployments", "--json", state=tmp_path)
        listed = json.loads(listing.stdout)
        assert [(d["name"], d["status"]) for d in listed] == [(f"tiny-llava-{port}", "serving")]
        assert KEY not in listing.stdout
        again = cli("deploy", "--engine-dir", str(tiny_engine), "--port", str(port), state=tmp_path)
        assert again.returncode == 2 and "is running" in again.stderr
        answer = httpx.post(f"{started['endpoint']}/v1/chat/completions", headers=headers, timeout=60,
                            json=chat_body("hi", image_url(0), max_tokens=4))
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        stopped = cli("undeploy", f"tiny-llava-{port}", "--json", state=tmp_path)
    assert json.loads(stopped.stdout)["result"] == "drained and stopped"
    assert not list(tmp_path.glob("*.json")), "the record is gone"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{started['endpoint']}/health")


def test_deploy_by_model_name_pulls_the_newest_fitting_build_from_the_store(tiny_engine: Path, tmp_path: Path) -> None:
    """The whole path: publish the tiny engine, deploy `tiny-llava` by name from the store, ask, undeploy."""
    store_dir = tmp_path / "store"
    ref = publish_tiny_engine(tiny_engine, str(store_dir))
    build_id = ref.split("#")[1]
    port = free_port()
    env_state = tmp_path / "state"
    done = cli("deploy", "tiny-llava", "--store", str(store_dir), "--port", str(port), "--json", state=env_state,
               cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    started = json.loads(done.stdout)
    assert started["ref"] == ref
    try:
        answer = httpx.post(f"{started['endpoint']}/v1/chat/completions",
                            json=chat_body("hi", image_url(0), max_tokens=4), timeout=60)
        assert answer.status_code == 200
    finally:
        cli("undeploy", f"tiny-llava-{port}", state=env_state)
    assert (tmp_path / "cache" / "engines" / "tiny-llava" / build_id / "engine.json").is_file()
