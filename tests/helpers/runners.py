"""Runner processes for tests: `vlmforge serve` started, deployed and stopped for real; chat bodies and images
as data URLs; the tiny engines built by the real hf pipeline."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.net import ROOT, free_port, wait_http


def runner_env(**extra: str) -> dict[str, str]:
    """The environment of runner processes: this checkout first on the path, offline, quiet libraries."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    env.update(extra)
    return env


def golden_image(index: int = 0, size: int = 64) -> Any:
    """Golden image ``index % 3`` at ``size`` x ``size``, turned a quarter for each further three: what
    :func:`image_url` sends."""
    from vlmforge.modeling.images import synthetic_images

    return synthetic_images(size)[index % 3].rotate(90 * (index // 3))


def image_url(index: int = 0, size: int = 64, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    golden_image(index, size).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def sized_image(index: int, size: tuple[int, int]) -> Any:
    """Golden image ``index`` (of three) resized to ``size`` (width, height): the size-dependent families' tests."""
    from vlmforge.modeling.images import synthetic_images

    return synthetic_images()[index % 3].resize(size)


def sized_images(sizes: list[tuple[int, int]]) -> list[Any]:
    """One request's images, the i-th golden image at the i-th size."""
    return [sized_image(i, size) for i, size in enumerate(sizes)]


def request_images(sizes: list[tuple[int, int]]) -> Any:
    """What ``engine.generate`` takes for one request: its image, or its list of images."""
    images = sized_images(sizes)
    return images if len(images) > 1 else images[0]


def data_url(picture: Any) -> str:
    """A PIL image as a PNG ``data:`` URL."""
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def sized_content(sizes: list[tuple[int, int]], text: str | None) -> list[dict[str, Any]]:
    """A chat message's content: the text (if any), then one image_url part per image of :func:`sized_images`."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(picture)}}
                                     for picture in sized_images(sizes)]
    return content if text is None else [{"type": "text", "text": text}, *content]


def chat_body(text: str | None, url: str, model: str = "tiny-llava", **fields: object) -> dict:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def build_tiny(model: str, workdir: Path, **overrides: object) -> Path:
    """A tiny catalog model's engine directory, built and validated by the real hf pipeline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmforge.build.pipeline import HfPipeline
    from vlmforge.build.workdir import Workdir
    from vlmforge.specs.catalog import load_model_or_spec

    _, engine, _ = HfPipeline(load_model_or_spec(model, dict(overrides)), Workdir(workdir)).run()
    return Path(engine.path)


def publish_tiny(model: str, workdir: Path, store_url: str, **overrides: object) -> tuple[Path, Any]:
    """A tiny catalog model built by the real hf pipeline (stages already in ``workdir`` are reused) and published
    to ``store_url`` under the pipeline's own manifest: (its engine directory, the PublishOutcome)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmforge.build.pipeline import HfPipeline
    from vlmforge.build.publish import publish_engine
    from vlmforge.build.workdir import Workdir
    from vlmforge.specs.catalog import load_model_or_spec

    pipeline = HfPipeline(load_model_or_spec(model, dict(overrides)), Workdir(workdir))
    fetched, engine, validation = pipeline.run()
    return Path(engine.path), publish_engine(store_url, engine.path, pipeline.manifest(fetched, engine, validation))


def build_tiny_llava(workdir: Path, **overrides: object) -> Path:
    return build_tiny("tiny-llava", workdir, **overrides)


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


def start_runner(engine: Path, log: Path, *, args: tuple[str, ...] = (), timeout: float = 120,
                 env: dict[str, str] | None = None) -> Runner:
    """`vlmforge serve` in a process group of its own (``env``: added to its environment); waits for /health."""
    port = free_port()
    pid_file = log.with_suffix(".pid")
    argv = [sys.executable, "-m", "vlmforge", "serve", str(engine), "--port", str(port), "--pid-file", str(pid_file),
            *args]
    handle = log.open("w")
    proc = subprocess.Popen(argv, env=runner_env(**(env or {})), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=ROOT)
    runner = Runner(proc, port, log, pid_file)
    try:
        wait_http(f"{runner.url}/health", timeout, proc)
    except Exception:  # noqa: BLE001 - stop it, then say why with its log
        stop_runner(runner)
        raise RuntimeError(f"the runner did not come up:\n{runner.log_text()[-4000:]}") from None
    return runner


def deploy_runner(engine: Path, state_dir: Path, *, serve_args: tuple[str, ...] = (), **kwargs: object) -> Runner:
    """`vlmforge.deploy.service.deploy` of a local engine directory (mpirun for TP > 1), from this process, so the
    launcher is our child and its exit code can be checked."""
    from vlmforge.deploy.service import LocalEngineSource, deploy

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


GUARD_KEY = "vlmforge-test-key-5d1c9e"
"""The API key of the tests' guarded runner (tests/runner/conftest.py)."""


def near_tie(generation: Any, margin: float = 0.01) -> bool:
    """Whether a lone decode (``engine.generate``'s result, with logits) met a near-tie: its two likeliest tokens
    within ``margin`` at some step. Served concurrently, a request joins other requests' batches (in-flight
    batching: other shapes and padding than alone), and float16 rounding may flip such a tie; float32 joins are
    checked exact in tests/runner/test_inflight.py."""
    return first_tie(generation, margin) is not None


def first_tie(generation: Any, margin: float = 0.01) -> int | None:
    """The first step of a lone decode whose two likeliest tokens are within ``margin`` (None: no near-tie)."""
    top = generation.logits.float().topk(2, dim=-1).values
    tied = ((top[:, 0] - top[:, 1]) < margin).nonzero()
    return int(tied[0, 0]) if len(tied) else None


def assert_batched_equals_alone(engine: Any, images: list[Any], prompts: list[str | None], max_tokens: int) -> list[Any]:
    """``engine.generate_batch`` of these requests gives each request's lone tokens, and logits within 1% of its
    lone logits' scale (float16 engines: other batch shapes round otherwise). Returns the batched results."""
    batched = engine.generate_batch(images, prompts, max_tokens, keep_logits=True)
    for index, (got, request, prompt) in enumerate(zip(batched, images, prompts, strict=True)):
        alone = engine.generate(request, prompt, max_tokens)
        assert got.tokens == alone.tokens, (index, prompt)
        scale = alone.logits.abs().max().item()
        assert (got.logits - alone.logits).abs().max().item() < 1e-2 * max(scale, 0.5), (index, prompt)
    return batched


def build_validated(model: str, workdir: Path, overrides: dict[str, object]) -> tuple[Path, dict[str, Any]]:
    """``model`` with ``overrides`` through the hf build (no flow, no store): its engine directory and the validation
    stage's report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmforge.build.pipeline import HfPipeline
    from vlmforge.build.workdir import Workdir
    from vlmforge.specs.catalog import load_model_or_spec

    _, engine, validation = HfPipeline(load_model_or_spec(model, overrides), Workdir(workdir)).run()
    return Path(engine.path), validation.result


def assert_validates_two_images(built: tuple[Path, dict[str, Any]], image_token: str) -> None:
    """A build for two images per prompt validated its golden inputs, the last a two-image prompt, against
    transformers."""
    from vlmforge.artifacts.engine_config import EngineConfig

    engine_dir, report = built
    assert EngineConfig.read(engine_dir).max_images_per_prompt == 2
    assert [golden.get("images", 1) for golden in report["inputs"]] == [1, 1, 1, 2]
    two = report["inputs"][-1]
    assert two["engine_tokens"] == two["reference_tokens"] and two["prompt"].count(image_token) == 2
    assert report["passed"]


def assert_image_order_counts(engine: Any, first: Any, second: Any, prompt: str | None, max_tokens: int,
                              batched: Any, *, min_difference: float = 1e-3) -> None:
    """``[second, first]`` gives first-step logits more than ``min_difference`` away from ``batched``'s (the result
    for ``[first, second]``): each image of a prompt keeps its place."""
    swapped = engine.generate([second, first], prompt, max_tokens)
    assert (swapped.logits[0] - batched.logits[0]).abs().max().item() > min_difference


def ask_several_images(engine_dir: Path, model: str, requests: list[tuple[list[Any], str | None]], max_tokens: int,
                       log: Path) -> tuple[list[Any], dict[str, Any]]:
    """Serves ``engine_dir`` (batches of up to 4) and sends ``requests`` (images, text) at once through the openai
    client, each request's images as image_url parts of one message, after checking that the model advertises 2
    images per prompt; then sends one request with three images. Returns the answers and the refusal's body."""
    import concurrent.futures

    import openai

    runner = start_runner(engine_dir, log, args=("--max-batch-size", "4", "--batch-wait-ms", "300"))
    try:
        client = openai.OpenAI(base_url=f"{runner.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert client.models.retrieve(model).model_extra["max_images_per_prompt"] == 2

        def ask(request: tuple[list[Any], str | None]) -> Any:
            pictures, text = request
            content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text is not None else []
            content += [{"type": "image_url", "image_url": {"url": data_url(picture)}} for picture in pictures]
            return client.chat.completions.create(model=model, max_tokens=max_tokens,
                                                  messages=[{"role": "user", "content": content}])

        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(ask, requests))
        with pytest.raises(openai.BadRequestError) as caught:  # three images, one over the limit
            ask(([requests[0][0][0]] * 3, "Three?"))
    finally:
        stop_runner(runner)
    return answers, caught.value.body


def assert_served_as_alone(url: str, engine: Any, model: str, requests: list[tuple[list[tuple[int, int]], str | None]],
                           max_tokens: int) -> None:
    """Concurrent chat requests through the openai client, each of image_url parts of the sizes given
    (:func:`sized_content`) and its text: each answer is the request's lone answer, and its usage the positions the
    LLM was really fed, within the bound the server admits by. The requests are chosen with no float16 near-tie in
    their lone decode (checked), so every one is compared exactly."""
    import concurrent.futures

    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(request: tuple[list[tuple[int, int]], str | None]) -> Any:
        sizes, text = request
        return client.chat.completions.create(model=model, max_tokens=max_tokens,
                                              messages=[{"role": "user", "content": sized_content(sizes, text)}])

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(ask, requests))
    for (sizes, text), answer in zip(requests, answers, strict=True):
        alone = engine.generate(request_images(sizes), text, max_tokens)
        assert not near_tie(alone), f"{sizes} {text!r}: its lone decode meets a near-tie; choose another request"
        assert answer.choices[0].message.content == alone.text, (sizes, text)
        length = engine.llm_prefix(engine.encode_images(sized_images(sizes)), text).length
        assert answer.usage.prompt_tokens == length <= engine.prompt_length(text, len(sizes))
