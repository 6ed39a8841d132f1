"""The OpenAI-compatible runner over HTTP: a real `vlmforge serve` process, the official openai client."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers.runners import Runner, chat_body, image_url

PROMPTS = ["What is this?", "Question: which city is this? Answer:", "Describe the picture, please."]


@pytest.fixture(scope="module")
def engine(tiny_engine: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(tiny_engine)


def expected(engine: Any, index: int, prompt: str | None, max_tokens: int) -> str:
    """What the engine generates for this request alone, in this process: the ground truth."""
    from tests.helpers.runners import golden_image

    return engine.generate(golden_image(index), prompt, max_tokens).text


def client(runner: Runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{runner.url}/v1", api_key="unused", max_retries=0, timeout=60)


def messages(text: str | None, url: str) -> list[dict]:
    return chat_body(text, url)["messages"]


def metric(runner: Runner, name: str, **labels: str) -> float:
    text = httpx.get(f"{runner.url}/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if selector else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_models_and_health(runner: Runner) -> None:
    models = client(runner).models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]
    assert client(runner).models.retrieve("tiny-llava").id == "tiny-llava"
    with pytest.raises(openai.NotFoundError):
        client(runner).models.retrieve("gpt-4o")
    health = httpx.get(f"{runner.url}/health").json()
    assert health["status"] == "ok" and health["tensor_parallel"] == 1 and health["decode"] == "dynamic"


def test_openai_client_plain_and_streamed_give_the_engines_own_output(runner: Runner, engine: Any) -> None:
    want = expected(engine, 1, PROMPTS[0], 12)
    response = client(runner).chat.completions.create(model="tiny-llava", messages=messages(PROMPTS[0], image_url(1)),
                                                      max_tokens=12)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason in ("length", "stop")
    assert response.usage.prompt_tokens == engine.prompt_length(PROMPTS[0])
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    chunks = list(client(runner).chat.completions.create(
        model="tiny-llava", messages=messages(PROMPTS[0], image_url(1)), max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "tokens arrive as they come"


def test_stop_strings_cut_the_text(runner: Runner, engine: Any) -> None:
    full = expected(engine, 1, PROMPTS[0], 24)
    at = next(i for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i)  # a first occurrence, not at 0
    stop, cut = full[at:at + 2], full[:at]
    response = client(runner).chat.completions.create(model="tiny-llava", messages=messages(PROMPTS[0], image_url(1)),
                                                      max_tokens=24, stop=[stop])
    assert response.choices[0].message.content == cut
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 24
    streamed = client(runner).chat.completions.create(model="tiny-llava", messages=messages(PROMPTS[0], image_url(1)),
                                                      max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def _huge_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000)).save(buffer, "PNG")  # small file, 25 megapixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS: dict[str, tuple[Any, int, str]] = {
    "bad base64": (chat_body("hi", "data:image/png;base64,@@not-base64@@"), 400, "base64"),
    "not an image": (chat_body("hi", "data:image/png;base64," + base64.b64encode(b"just some text").decode()), 400,
                     "not an image"),
    "huge image": (chat_body("hi", "HUGE"), 413, "pixels"),
    "too many tokens": (chat_body("hi", image_url(0), max_tokens=1000), 400, "max_output_len"),
    "prompt too long": (chat_body("word " * 200, image_url(0)), 400, "max_input_len"),
    "unknown model": (chat_body("hi", image_url(0), model="gpt-4o"), 404, "not served here"),
    "no image": ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]}, 400, "exactly one image"),
    "two turns": ({"model": "tiny-llava", "messages": [{"role": "system", "content": "be nice"},
                                                        *chat_body("hi", image_url(0))["messages"]]}, 400, "one user"),
    "temperature out of range": (chat_body("hi", image_url(0), temperature=2.5), 400, "temperature"),
    "json mode": (chat_body("hi", image_url(0), response_format={"type": "json_object"}), 400, "response_format"),
    "http image": (chat_body("hi", "http://example.com/cat.png"), 400, "not fetched"),
    "file url without root": (chat_body("hi", "file:///etc/passwd"), 400, "--image-root"),
    "no messages": ({"model": "tiny-llava", "messages": []}, 400, "messages"),
    "not json": (b"{not json", 400, "not JSON"),
    "deeply nested json": (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    "prompt over the character cap": (chat_body("x" * 1025, image_url(0)), 400, "1025 characters"),
    "an EPS payload": (chat_body("hi", "data:image/png;base64," + base64.b64encode(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n").decode()), 400,
                       "PNG, JPEG, WebP or GIF"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_requests_get_4xx_and_the_runner_keeps_serving(runner: Runner, case: str) -> None:
    body, status, words = BAD_REQUESTS[case]
    if body is not None and not isinstance(body, bytes) and "HUGE" in str(body):
        body = chat_body("hi", _huge_png())
    before = metric(runner, "vlmforge_requests_total", status=str(status))
    if isinstance(body, bytes):
        response = httpx.post(f"{runner.url}/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"}, timeout=30)
    else:
        response = httpx.post(f"{runner.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert metric(runner, "vlmforge_requests_total", status=str(status)) == before + 1
    ok = httpx.post(f"{runner.url}/v1/chat/completions", json=chat_body("hi", image_url(0), max_tokens=2), timeout=30)
    assert ok.status_code == 200


def test_a_request_over_the_size_limit_gets_413(runner: Runner) -> None:
    response = httpx.post(f"{runner.url}/v1/chat/completions", content=b"x" * (33 * 1024 * 1024),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413


def test_the_openai_client_raises_on_a_bad_request(runner: Runner) -> None:
    with pytest.raises(openai.BadRequestError, match="max_output_len"):
        client(runner).chat.completions.create(model="tiny-llava", messages=messages("hi", image_url(0)),
                                               max_tokens=999)


def near_tie(engine: Any, index: int, prompt: str | None, max_tokens: int, margin: float = 0.01) -> bool:
    """Whether the lone decode of this request (image ``index``) meets a float16 near-tie (tests.helpers.runners)."""
    from tests.helpers.runners import golden_image, near_tie as lone_near_tie

    return lone_near_tie(engine.generate(golden_image(index), prompt, max_tokens), margin)


def test_fifty_concurrent_requests_all_succeed_in_batches(runner: Runner, engine: Any) -> None:
    """Every answer is the lone one, but for requests whose lone decode has a float16 near-tie (4 of the 12 here,
    one with a margin of 0.0005: in-flight batching flipped it): those must only succeed."""
    cases = [(i % 4, PROMPTS[i % 3], 4 + 4 * (i % 2)) for i in range(50)]  # 12 distinct requests
    want = {case: expected(engine, *case) for case in set(cases)}
    tied = {case for case in set(cases) if near_tie(engine, *case)}
    assert len(tied) < len(want) // 2, "most requests are compared exactly"
    batches_before = metric(runner, "vlmforge_batch_size_count")

    def ask(case: tuple[int, str, int]) -> str:
        index, prompt, max_tokens = case
        response = client(runner).chat.completions.create(model="tiny-llava", messages=messages(prompt, image_url(index)),
                                                          max_tokens=max_tokens)
        return response.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, cases))
    assert [a for a, case in zip(answers, cases) if case not in tied] == [want[c] for c in cases if c not in tied]
    assert all(answers)
    batches = metric(runner, "vlmforge_batch_size_count") - batches_before
    print(f"50 requests in {batches:.0f} batches")
    assert batches < 50, "concurrent requests are decoded together"
    assert metric(runner, "vlmforge_batch_size_bucket", le="8.0") >= batches_before + batches


def test_a_client_that_leaves_mid_stream_frees_its_row(runner: Runner) -> None:
    before = metric(runner, "vlmforge_requests_total", status="499")
    with httpx.stream("POST", f"{runner.url}/v1/chat/completions", timeout=30,
                      json=chat_body("hi", image_url(0), max_tokens=32, stream=True)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # one token seen: hang up
    for _ in range(50):
        if metric(runner, "vlmforge_requests_total", status="499") == before + 1:
            break
        httpx.get(f"{runner.url}/health")
    assert metric(runner, "vlmforge_requests_total", status="499") == before + 1
    assert httpx.get(f"{runner.url}/health").json()["status"] == "ok"


def test_metrics_count_requests_latency_and_tokens(runner: Runner) -> None:
    before = {name: metric(runner, name) for name in ("vlmforge_generation_tokens_total", "vlmforge_prompt_tokens_total",
                                                     "vlmforge_request_duration_seconds_count",
                                                     "vlmforge_time_to_first_token_seconds_count")}
    response = httpx.post(f"{runner.url}/v1/chat/completions", json=chat_body("hi", image_url(0), max_tokens=5),
                          timeout=30).json()
    assert metric(runner, "vlmforge_generation_tokens_total") == before["vlmforge_generation_tokens_total"] + \
        response["usage"]["completion_tokens"]
    assert metric(runner, "vlmforge_prompt_tokens_total") == before["vlmforge_prompt_tokens_total"] + \
        response["usage"]["prompt_tokens"]
    for name in ("vlmforge_request_duration_seconds_count", "vlmforge_time_to_first_token_seconds_count"):
        assert metric(runner, name) == before[name] + 1
    text = httpx.get(f"{runner.url}/metrics").text
    assert re.search(r'^vlmforge_runner_info\{engine="[^"]+",model="tiny-llava",tp="1"\} 1\.0$', text, re.MULTILINE)
    assert re.search(r"^vlmforge_queue_depth 0\.0$", text, re.MULTILINE)


def test_the_http_port_is_held_from_before_the_engine_loads(tiny_engine, monkeypatch):
    """Regression: the port was only probed before the engine loaded and the ranks joined, then released, so gloo's
    ephemeral sockets could take it in between (a TP 2 runner died with 'address already in use'). Anything that
    binds the port while the engine loads must now find it taken."""
    import errno
    import socket

    from tests.helpers.net import free_port
    from vlmforge.runner import server as server_module

    port = free_port()
    seen: list[int] = []

    def loading(engine_dir, options):
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port))
            except OSError as exc:
                seen.append(exc.errno)
            else:
                seen.append(0)
        raise KeyboardInterrupt  # stop before serving

    monkeypatch.setattr(server_module, "load_engine", loading)
    with pytest.raises(KeyboardInterrupt):
        server_module.serve(server_module.ServeSettings(engine_dir=tiny_engine, port=port, device="cpu"))
    assert seen == [errno.EADDRINUSE]
    with socket.socket() as again:  # and released when the runner ends
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
