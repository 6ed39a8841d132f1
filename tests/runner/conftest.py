"""Fixtures of the runner tests: a tiny-llava engine built once per session by the real hf pipeline, a
runner serving it over HTTP (a real `vlmforge serve` process), images as data URLs."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, wait_http

NEEDED = ("torch", "transformers", "onnxruntime", "fastapi", "uvicorn", "prometheus_client")
if any(importlib.util.find_spec(name) is None for name in NEEDED):
    collect_ignore_glob = ["test_*.py"]


def runner_env(**extra: str) -> dict[str, str]:
    """The environment of runner processes: this checkout first on the path, offline, quiet libraries."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    env.update(extra)
    return env


def image_url(index: int = 0, size: int = 64, fmt: str = "PNG") -> str:
    from vlmforge.toolchains.hf.common import synthetic_images

    buffer = io.BytesIO()
    synthetic_images(size)[index % 3].rotate(90 * (index // 3)).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(text: str | None, url: str, model: str = "tiny-llava", **fields: object) -> dict:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture(scope="session")
def build_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


def build_tiny_llava(workdir: Path, **overrides: object) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmforge.catalog import load_model_or_spec
    from vlmforge.pipeline import HfPipeline
    from vlmforge.workdir import Workdir

    _, engine, _ = HfPipeline(load_model_or_spec("tiny-llava", dict(overrides)), Workdir(workdir)).run()
    return Path(engine.path)


@pytest.fixture(scope="session")
def tiny_engine(build_workdir: Path) -> Path:
    """The tiny-llava engine directory (float16 LLM, ONNX visual engine), built and validated by HfPipeline."""
    return build_tiny_llava(build_workdir)


@pytest.fixture(scope="session")
def tiny_engine_tp2(build_workdir: Path, tiny_engine: Path) -> Path:
    """The same model built for TP 2 (world size 2 in engine.json; the same weights: transformers splits them
    when the ranks load them). Reuses the TP 1 build's fetch and visual stages."""
    return build_tiny_llava(build_workdir, parallel={"tp": 2})


@dataclass
class Runner:
    """A runner process and where it answers."""

    proc: subprocess.Popen
    port: int
    log: Path
    pid_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_runner(engine: Path, log: Path, *, args: tuple[str, ...] = (), timeout: float = 120) -> Runner:
    """`vlmforge serve` in a process group of its own; waits for /health."""
    port = free_port()
    pid_file = log.with_suffix(".pid")
    argv = [sys.executable, "-m", "vlmforge", "serve", str(engine), "--port", str(port), "--pid-file", str(pid_file),
            *args]
    handle = log.open("w")
    proc = subprocess.Popen(argv, env=runner_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=ROOT)
    runner = Runner(proc, port, log, pid_file)
    try:
        wait_http(f"{runner.url}/health", timeout, proc)
    except Exception:  # noqa: BLE001 - stop it, then say why with its log
        stop_runner(runner)
        raise RuntimeError(f"the runner did not come up:\n{runner.log_text()[-4000:]}") from None
    return runner


def deploy_runner(engine: Path, state_dir: Path, *, serve_args: tuple[str, ...] = (), **kwargs: object) -> Runner:
    """`vlmforge.deploy.deploy` of a local engine directory (mpirun for TP > 1), from this process, so the
    launcher is our child and its exit code can be checked."""
    from vlmforge.deploy import LocalEngineSource, deploy

    with pytest.MonkeyPatch.context() as patch:
        for key, value in runner_env().items():
            patch.setenv(key, value)
        deployment = deploy("", LocalEngineSource(engine), port=free_port(), state_dir=state_dir,
                            serve_args=serve_args, wait_s=180, **kwargs)  # type: ignore[arg-type]
    assert deployment._proc is not None
    return Runner(deployment._proc, deployment.port, deployment.log, deployment.pid_file)


def stop_runner(runner: Runner, timeout: float = 30) -> int:
    """SIGTERM to rank 0 (it drains, then releases the other ranks), then SIGKILL to the process group we
    started if it does not end in time. Returns the exit code of the process we started."""
    if runner.proc.poll() is None:
        try:
            os.kill(int(runner.pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            runner.proc.send_signal(signal.SIGTERM)
        try:
            runner.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(runner.proc.pid, signal.SIGKILL)
            runner.proc.wait(10)
    return runner.proc.returncode


@pytest.fixture(scope="session")
def runner(tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """One TP=1 runner for the HTTP tests of the session (batches up to 8)."""
    log = tmp_path_factory.mktemp("runner") / "serve.log"
    started = start_runner(tiny_engine, log, args=("--max-batch-size", "8", "--batch-wait-ms", "20"))
    yield started
    stop_runner(started)
