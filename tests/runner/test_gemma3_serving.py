"""Serving tiny-gemma3 (built by the real hf pipeline): batched requests of one and two images answer what each gives
alone (each row's image tokens bidirectional within their block, its sliding windows its own), through the engine and
through `vlmforge serve` with its default in-flight scheduling (the sliding-window cache takes no joins: requests wait
for the batch boundary); the static decode path is refused with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlmforge.modeling.images import synthetic_images

MAX_TOKENS = 12
REQUESTS: list[tuple[list[int], str | None]] = [
    ([0], "Question: which city is this? Answer:"),
    ([1], "What is this picture?"),  # "What is this?" meets an exact float16 tie alone (a flip batched)
    ([2, 0], "Compare them."),
    ([1], None),
    ([0, 2], "Which of the two is brighter?"),
]
"""Each request's golden images (by index) and its prompt: none meets a float16 near-tie alone (smallest top-2 gap
0.017; a batch's other shapes move tiny-gemma3's float16 logits by about 0.002)."""


def request_images(indices: list[int]) -> Any:
    images = [synthetic_images()[i] for i in indices]
    return images if len(images) > 1 else images[0]


@pytest.fixture(scope="module")
def engine_dir(tiny_engine_of: Any) -> Path:
    return tiny_engine_of("gemma3")


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir)


def test_the_engine_decodes_dynamically_and_refuses_the_static_path(engine_dir: Path, engine: Any) -> None:
    from vlmforge.errors import DeployError
    from vlmforge.runner.engine import HfEngine

    assert engine.config.family == "gemma3" and engine.decode_path == "dynamic"
    assert engine.config.visual.output_shape == ["batch", 16, 64]
    with pytest.raises(DeployError, match="no bidirectional prefill mask.*sliding-window.*--decode dynamic"):
        HfEngine(engine_dir, decode="static", compile=False)


def test_batched_equals_alone_with_one_and_two_images(engine: Any) -> None:
    from tests.helpers.runners import assert_batched_equals_alone

    batched = assert_batched_equals_alone(engine, [request_images(indices) for indices, _ in REQUESTS],
                                          [prompt for _, prompt in REQUESTS], MAX_TOKENS)
    assert len({tuple(g.tokens) for g in batched}) > 1


def test_the_server_answers_concurrent_requests_as_alone(engine_dir: Path, engine: Any, tmp_path: Path) -> None:
    """Through `vlmforge serve` (default in-flight scheduling) and the openai client."""
    import concurrent.futures

    import openai

    from tests.helpers.runners import image_url, start_runner, stop_runner

    runner = start_runner(engine_dir, tmp_path / "serve.log", args=("--max-batch-size", "4", "--batch-wait-ms", "300"))
    try:
        client = openai.OpenAI(base_url=f"{runner.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(request: tuple[list[int], str | None]) -> Any:
            indices, text = request
            content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_url(i)}}
                                             for i in indices]
            if text is not None:
                content.insert(0, {"type": "text", "text": text})
            return client.chat.completions.create(model="tiny-gemma3", max_tokens=MAX_TOKENS,
                                                  messages=[{"role": "user", "content": content}])

        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            answers = list(pool.map(ask, REQUESTS))
    finally:
        stop_runner(runner)
    for (indices, text), answer in zip(REQUESTS, answers, strict=True):
        assert answer.choices[0].message.content == engine.generate(request_images(indices), text, MAX_TOKENS).text
