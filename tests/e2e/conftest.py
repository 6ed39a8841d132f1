"""Fixtures of the end-to-end tests: a real Prefect server, a moto S3 server, the CPU image.

Each server runs on a free loopback port with its own PREFECT_HOME, and is stopped by the fixture
that started it. Tests marked `docker` need a Docker daemon (infra/dockerd.sh starts one) and skip,
saying why, when there is none.

Environment:
    VLMFORGE_TEST_IMAGE   use this image for the CPU runs as it is (no build)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CPU_IMAGE = "vlmforge-cpu:local"  # what prefect.yaml's CPU deployments run
BASE_IMAGE = "vlmforge-base:bookworm"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "docker: needs a Docker daemon (infra/dockerd.sh); builds the CPU image on first use"
    )


def executable(name: str) -> str:
    """A console script of this interpreter's environment, else from PATH."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{tail(log)}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer in {timeout:.0f} s:\n{tail(log)}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and its children."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} missing)"


def run(cmd: list[str], env: dict[str, str], timeout: float, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root; keep its output in `log` when given."""
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(f"$ {' '.join(cmd)}\n[rc {result.returncode}]\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class PrefectServer:
    """A running server, and how to run commands against it (the tests import nothing from here)."""

    api_url: str
    home: Path
    logs: Path
    prefect: str  # the CLI

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a CLI command against this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "VLMFORGE_"))}
        env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.home), NO_COLOR="1", COLUMNS="200")
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra)
        return env

    def run(self, cmd: list[str], name: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        """Run a command from the repository root against this server; its output goes to logs/NAME.log."""
        return run(cmd, self.env(**env), timeout, log=self.logs / f"{name}.log")

    def log(self, name: str, lines: int = 40) -> str:
        """The end of logs/NAME.log."""
        return tail(self.logs / f"{name}.log", lines)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free port, SQLite in a temporary PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-home")
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    server = PrefectServer(f"http://127.0.0.1:{port}/api", home, logs, executable("prefect"))
    env = server.env(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    del env["PREFECT_API_URL"]
    log = logs / "prefect-server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [server.prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_http(f"{server.api_url}/health", proc, log, timeout=120)
        yield server
    finally:
        stop(proc)


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on a free port, with an empty bucket."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("boto3", reason="boto3 is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        server = S3Server(f"http://127.0.0.1:{port}", f"vlmforge-e2e-{uuid.uuid4().hex[:8]}")
        wait_http(server.endpoint, proc, log, timeout=60)
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop(proc)


def docker_problem() -> str | None:
    """Why Docker cannot be used here, or None."""
    if not shutil.which("docker"):
        return "no docker client on PATH (apt-get install -y docker.io)"
    try:
        info = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker daemon did not answer in 30 s"
    if info.returncode != 0:
        return f"the Docker daemon is not reachable (start it: infra/dockerd.sh): {info.stderr.strip()[:200]}"
    try:
        import prefect_docker  # noqa: F401
    except ImportError:
        return "prefect-docker is not installed (pip install prefect-docker): the docker worker needs it"
    return None


def image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def docker_ready() -> None:
    problem = docker_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def cpu_image(docker_ready: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CPU image, built offline from the repository as infra/build-images.sh does.

    The base image (infra/base-image.sh) is made once and kept; infra/wheelhouse.sh refills the
    wheelhouse only when its inputs changed; BuildKit's cache makes an unchanged rebuild take
    seconds, so the image always has the current source.
    """
    image = os.environ.get("VLMFORGE_TEST_IMAGE")
    if image:
        if not image_exists(image):
            pytest.fail(f"VLMFORGE_TEST_IMAGE={image} is not an image of the local daemon")
        return image
    logs = tmp_path_factory.mktemp("build")
    with _image_build_lock():
        return _build_cpu_image(logs)


@contextlib.contextmanager
def _image_build_lock() -> Iterator[None]:
    """One image build at a time on this checkout: under pytest-xdist each worker's session builds the image, and
    two wheelhouse.sh runs at once collide in setuptools' build/ folder ("File exists: build/bdist..."). The second
    waits, then finds the wheelhouse current and BuildKit's cache warm."""
    lock = REPO / "build" / ".cpu-image.lock"
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_cpu_image(logs: Path) -> str:
    env = dict(os.environ)
    if not image_exists(BASE_IMAGE):
        if os.geteuid() != 0 or not shutil.which("debootstrap"):
            pytest.skip(f"no {BASE_IMAGE} and no way to make it here (infra/base-image.sh needs root and debootstrap)")
        result = run(["infra/base-image.sh", BASE_IMAGE], env, timeout=900, log=logs / "base-image.log")
        assert result.returncode == 0, f"infra/base-image.sh failed:\n{tail(logs / 'base-image.log')}"
    result = run(["infra/wheelhouse.sh"], {**env, "PYTHON": sys.executable}, timeout=1800,
                 log=logs / "wheelhouse.log")
    assert result.returncode == 0, f"infra/wheelhouse.sh failed:\n{tail(logs / 'wheelhouse.log')}"
    result = run(["infra/build-images.sh", "cpu"], env, timeout=1800, log=logs / "build-images.log")
    assert result.returncode == 0, f"infra/build-images.sh cpu failed:\n{tail(logs / 'build-images.log', 60)}"
    return CPU_IMAGE
