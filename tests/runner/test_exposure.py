"""Exposure and availability of a real runner process (`vlmforge serve`, an API key from the environment): who may
use it, how long a connection may take to say what it wants, and /health staying responsive while the worst requests
the limits allow are parsed."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.net import ROOT, free_port
from tests.helpers.runners import GUARD_KEY, Runner, chat_body, image_url, runner_env

AUTH = {"Authorization": f"Bearer {GUARD_KEY}"}


def test_a_runner_beyond_loopback_without_a_key_refuses_to_start(tiny_engine: Path) -> None:
    env = runner_env()
    env.pop("VLMFORGE_API_KEY", None)
    for extra in ({}, {"VLMFORGE_API_KEY": ""}):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "vlmforge", "serve", str(tiny_engine), "--host", "0.0.0.0",
                               "--port", str(free_port())], env={**env, **extra}, capture_output=True, text=True,
                              timeout=120, cwd=ROOT, check=False)
        assert done.returncode == 2, done.stderr
        assert "not a loopback address" in done.stderr and "VLMFORGE_API_KEY" in done.stderr
        assert "--api-key" in done.stderr and "Traceback" not in done.stderr
        assert time.monotonic() - started < 60, "refused before the engine is loaded"


def test_every_path_but_health_needs_the_key(guarded_runner: Runner) -> None:
    url = guarded_runner.url
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    refused_before = _metric(url, 'vlmforge_requests_total{status="401"}')
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {GUARD_KEY}"},
             {"Authorization": f"Bearer {GUARD_KEY}x"}, {"Authorization": GUARD_KEY}, {"Authorization": "Bearer"}]
    for method, path in [("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/tiny-llava"),
                         ("POST", "/v1/chat/completions"), ("GET", "/nowhere"), ("GET", "/docs")]:
        for headers in wrong:
            response = httpx.request(method, f"{url}{path}", headers=headers, timeout=30,
                                     json=chat_body("hi", image_url(0), max_tokens=2) if method == "POST" else None)
            assert response.status_code == 401, (path, headers)
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{url}/metrics", headers=AUTH).status_code == 200
    assert _metric(url, 'vlmforge_requests_total{status="401"}') == refused_before + len(wrong)  # chat refusals
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=GUARD_KEY, max_retries=0, timeout=60)
    answer = client.chat.completions.create(model="tiny-llava", messages=chat_body("hi", image_url(0))["messages"],
                                            max_tokens=3)
    assert answer.choices[0].message.content is not None and answer.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key", max_retries=0).models.list()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", headers=AUTH).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _closed_after(sock: socket.socket, limit: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (None: still open after ``limit``), sending ``trickle`` now and
    then meanwhile."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        readable, _, _ = select.select([sock], [], [], 0.25)
        try:
            if readable and sock.recv(65536) == b"":
                return time.monotonic() - started
            if trickle:
                sock.sendall(trickle)
        except OSError:  # reset by the server
            return time.monotonic() - started
    return None


def test_connections_that_do_not_finish_their_headers_are_closed(guarded_runner: Runner) -> None:
    """The runner's header timeout is 1 s here (10 s by default); uvicorn alone keeps these open for good."""
    address = ("127.0.0.1", guarded_runner.port)
    with socket.create_connection(address) as sock:  # connects, says nothing
        assert (_closed_after(sock, 8) or 99) < 5
    with socket.create_connection(address) as sock:  # starts a request, never ends its headers
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: runner\r\n")
        assert (_closed_after(sock, 8) or 99) < 5
    with socket.create_connection(address) as sock:  # a header line now and then
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: runner\r\n")
        assert (_closed_after(sock, 8, trickle=b"X-Slow: 1\r\n") or 99) < 5
    with socket.create_connection(address) as sock:  # one request answered, then a slow second on the connection
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: runner\r\n\r\n")
        sock.settimeout(10)
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        sock.settimeout(None)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        assert (_closed_after(sock, 8) or 99) < 5


def test_a_body_that_does_not_arrive_gets_408(guarded_runner: Runner) -> None:
    with socket.create_connection(("127.0.0.1", guarded_runner.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: runner\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + GUARD_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
        sock.settimeout(30)
        reply = b""
        while b"}}" not in reply:  # the whole error body
            part = sock.recv(65536)
            if not part:
                break
            reply += part
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"did not arrive within 10s" in reply


def _largest_image() -> str:
    """An image at the pixel limit (4096 x 4096), well within the byte limit."""
    from PIL import Image

    gradient = Image.radial_gradient("L").resize((4096, 4096))
    image = Image.merge("RGB", (gradient, gradient.rotate(90), gradient.transpose(Image.Transpose.FLIP_TOP_BOTTOM)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_health_answers_within_seconds_while_the_worst_requests_are_parsed(guarded_runner: Runner) -> None:
    """The worst each default limit allows (32 MiB request, 100,000 JSON values, nesting, the longest prompt that is
    tokenized, an image of 4096 x 4096 pixels), twice each and all at once, while /health is asked every 0.1 s.
    Before the text cap, the 32 MiB prompt was tokenized on the event loop: over a minute without an answer."""
    from vlmforge.runner.openai_api import Limits

    limits = Limits()
    chars = 128 * limits.max_prompt_chars_per_token  # tiny-llava: max_input_len 128
    worst: dict[str, tuple[bytes, set[int]]] = {
        "32 MiB of text": (json.dumps(chat_body("x" * (limits.max_request_bytes - 4096), image_url(0))).encode(),
                           {400}),
        "the most JSON values": (json.dumps(chat_body("hi", image_url(0), stop=["a"] * (limits.max_json_values - 64)))
                                 .encode(), {400}),
        "the deepest nesting": (b"[" * 50_000 + b"]" * 50_000, {400}),
        "the longest text that is tokenized": (json.dumps(chat_body("word " * (chars // 5), image_url(0))).encode(),
                                               {400}),
        "the largest image": (json.dumps(chat_body("hi", _largest_image(), max_tokens=4)).encode(), {200}),
    }
    assert all(len(body) <= limits.max_request_bytes for body, _ in worst.values())
    url = guarded_runner.url
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get(f"{url}/health")
                latencies.append(time.perf_counter() - started)
                time.sleep(0.1)

    def send(name: str) -> tuple[str, int]:
        body, _ = worst[name]
        response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=300,
                              headers={**AUTH, "content-type": "application/json"})
        return name, response.status_code

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(worst) * 2) as pool:
            results = list(pool.map(send, list(worst) * 2))
    finally:
        stop.set()
        poller.join()
    for name, status in results:
        assert status in worst[name][1], (name, status)
    print(f"/health: {len(latencies)} answers, slowest {max(latencies) * 1000:.0f} ms")
    # the defect this guards against blocked /health for over a minute; the bound leaves room for a loaded 2-core
    # machine, where ten worst-case bodies parsed in threads share the GIL with the event loop (1.3 s seen once)
    assert len(latencies) >= 5 and max(latencies) < 3.0
