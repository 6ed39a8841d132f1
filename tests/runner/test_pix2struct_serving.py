"""Serving tiny-pix2struct (built by the real hf pipeline): images of different sizes give different numbers of real
patches (the decoder cross-attends to each image's own), and a batch of them (cross-attention states padded with a
mask) decodes as each request alone, through the engine and through `vlmforge serve` (prompt-free: image parts only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlmforge.modeling.images import synthetic_images

MAX_TOKENS = 12
SIZES: list[tuple[int, int]] = [(64, 64), (120, 60), (50, 100), (200, 30), (30, 200)]
"""(width, height) of each request's one image: 64, 55, 55, 60 and 60 of the 64 patches."""


def image(index: int) -> Any:
    return synthetic_images()[index % 3].resize(SIZES[index])


@pytest.fixture(scope="module")
def engine_dir(tiny_engine_of: Any) -> Path:
    return tiny_engine_of("pix2struct")


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir)


def test_the_engine_holds_a_two_input_patch_engine_and_the_decoder(engine: Any) -> None:
    assert engine.config.family == "pix2struct" and engine.config.llm.architecture == "Pix2StructTextModel"
    assert [i.name for i in engine.vision.get_inputs()] == ["flattened_patches", "attention_mask"]
    counts = [int(f.shape[1]) for f in engine.encode_images([image(i) for i in range(len(SIZES))])]
    assert counts == [64, 55, 55, 60, 60]


def test_batched_equals_alone_with_images_of_different_sizes(engine: Any) -> None:
    from tests.helpers.runners import assert_batched_equals_alone

    batched = assert_batched_equals_alone(engine, [image(i) for i in range(len(SIZES))], [None] * len(SIZES),
                                          MAX_TOKENS)
    assert len({tuple(g.tokens) for g in batched}) > 1


def test_the_server_answers_concurrent_requests_as_alone(engine_dir: Path, engine: Any, tmp_path: Path) -> None:
    """Through `vlmforge serve` (default scheduling; cross-attention batches take no joins) and the openai client."""
    import base64
    import concurrent.futures
    import io

    import openai

    from tests.helpers.runners import start_runner, stop_runner

    def url(index: int) -> str:
        buffer = io.BytesIO()
        image(index).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    runner = start_runner(engine_dir, tmp_path / "serve.log", args=("--max-batch-size", "4", "--batch-wait-ms", "300"))
    try:
        client = openai.OpenAI(base_url=f"{runner.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(index: int) -> Any:
            return client.chat.completions.create(
                model="tiny-pix2struct", max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url(index)}}]}])

        with concurrent.futures.ThreadPoolExecutor(len(SIZES)) as pool:
            answers = list(pool.map(ask, range(len(SIZES))))
    finally:
        stop_runner(runner)
    for index, answer in enumerate(answers):
        assert answer.choices[0].message.content == engine.generate(image(index), None, MAX_TOKENS).text
