"""Services the tests start for real: a Prefect server and a moto S3 server (session-wide), free ports, a clean
environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.helpers.runners import Runner
    from tests.helpers.tiny import TinyCache

from tests.helpers.net import ROOT, free_port, wait_http  # noqa: F401 - ROOT is used by the fixtures below

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one torch/OpenMP thread per worker (N workers on N cores)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """A failed test that used a runner shows the end of that runner's log (and whether it is still running): a
    runner that died mid-test otherwise leaves only the client's "Server disconnected" in CI's output."""
    report = yield
    if report.failed and call.when in ("setup", "call"):
        from tests.helpers.runners import Runner

        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Runner):
                code = value.proc.poll()
                state = "running" if code is None else f"exited with code {code}"
                try:
                    text = value.log_text()[-4000:]
                except OSError as exc:
                    text = f"(unreadable: {exc})"
                report.sections.append((f"runner {name}: {state}, log {value.log}", text))
    return report


def _drain_prefect_clients() -> None:
    """Send the logs and events still queued in this process while the server is up: queued past its end,
    Prefect's workers retry them at exit for over a minute ("Error logging to API")."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on a free port (SQLite in a temp PREFECT_HOME); yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc)
    except Exception:
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError((home / "server.log").read_text()[-3000:]) from None
    saved = {key: os.environ.get(key) for key in ("PREFECT_API_URL", "PREFECT_HOME")}
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    yield url
    _drain_prefect_clients()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


KiB = 1024


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port for the whole session (64 KiB multipart parts allowed)."""
    workdir = tmp_path_factory.mktemp("moto")
    port = free_port()
    env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(64 * KiB), "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(64 << 20)}
    log = (workdir / "moto.log").open("wb")
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], cwd=workdir, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited: {(workdir / 'moto.log').read_text()}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start within 30 s") from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="session")
def aws_env(moto_url: str) -> Iterator[str]:
    """Fake credentials and AWS_ENDPOINT_URL pointing at moto, for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", moto_url)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield moto_url


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the Hugging Face Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --- models and runners built once per session (the real hf pipeline) ------------------------------------

@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    """``tiny(name)``: the family's tiny float32 model and its references, built on first use."""
    from tests.helpers.tiny import TinyCache

    return TinyCache(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def build_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def tiny_engine(build_workdir: Path) -> Path:
    """The tiny-llava engine directory (float16 LLM, ONNX visual engine), built and validated by HfPipeline."""
    from tests.helpers.runners import build_tiny_llava

    return build_tiny_llava(build_workdir)


@pytest.fixture(scope="session")
def tiny_engine_tp2(build_workdir: Path, tiny_engine: Path) -> Path:
    """The same model built for TP 2 (world size 2 in engine.json; the same weights: transformers splits them
    when the ranks load them). Reuses the TP 1 build's fetch and visual stages."""
    from tests.helpers.runners import build_tiny_llava

    return build_tiny_llava(build_workdir, parallel={"tp": 2})


@pytest.fixture(scope="session")
def tiny_vila_engine(build_workdir: Path) -> Path:
    """The tiny-vila engine (VILA1.5 layout, float16 LLM, ONNX visual engine), built and validated by HfPipeline."""
    from tests.helpers.runners import build_tiny

    return build_tiny("tiny-vila", build_workdir)


@pytest.fixture(scope="session")
def tiny_vila_engine_tp2(build_workdir: Path, tiny_vila_engine: Path) -> Path:
    """tiny-vila built for TP 2 (reuses the TP 1 build's fetch, convert and visual stages)."""
    from tests.helpers.runners import build_tiny

    return build_tiny("tiny-vila", build_workdir, parallel={"tp": 2})


@pytest.fixture(scope="session")
def runner(tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """One TP=1 runner for the HTTP tests of the session (batches up to 8)."""
    from tests.helpers.runners import start_runner, stop_runner

    log = tmp_path_factory.mktemp("runner") / "serve.log"
    started = start_runner(tiny_engine, log, args=("--max-batch-size", "8", "--batch-wait-ms", "20"))
    yield started
    stop_runner(started)
