"""Serving tiny-mistral3 (built by the real hf pipeline): images of several sizes give merged grids of their own shape
(and [IMG_BREAK] rows of their own), one or two per request; a batch of them decodes as each request alone; the image
cache gives the same features; the OpenAI endpoint answers as the engine alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.runners import request_images, sized_image, sized_images

MAX_TOKENS = 12
# (width, height) of each image of a request: merged grids 4x4, 2x4, 4x3 and 1x4 (the last two scaled down first)
REQUESTS: list[tuple[list[tuple[int, int]], str | None]] = [
    ([(32, 32)], "Question: which city is this? Answer:"),
    ([(48, 20)], "What is this?"),
    ([(20, 28), (32, 32)], "Compare them."),
    ([(60, 16)], None),
    ([(32, 32), (48, 20)], "Which of the two is brighter?"),
]




@pytest.fixture(scope="module")
def engine_dir(tiny_engine_of: Any) -> Path:
    return tiny_engine_of("mistral3")


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir)


def test_the_engine_is_a_rows_engine_with_a_mistral_llm(engine: Any, engine_dir: Path) -> None:
    import onnxruntime as ort

    assert engine.config.family == "mistral3" and engine.config.llm.architecture == "MistralForCausalLM"
    assert engine.config.visual.output_shape == ["tokens", 64]
    session = ort.InferenceSession(str(engine_dir / "vision" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, len(i.shape)) for i in session.get_inputs()] == [("rows", 2), ("positions", 2), ("image_ids", 1)]
    sizes = [(32, 32), (48, 20), (20, 28), (60, 16), (64, 64)]
    grids = [tuple(f.shape[1:3]) for f in engine.encode_images(sized_images(sizes))]
    assert grids == [(4, 4), (2, 4), (4, 3), (1, 4), (4, 4)]


def test_batched_equals_alone_with_images_of_different_sizes(engine: Any) -> None:
    from tests.helpers.runners import assert_batched_equals_alone

    batched = assert_batched_equals_alone(engine, [request_images(sizes) for sizes, _ in REQUESTS],
                                          [prompt for _, prompt in REQUESTS], MAX_TOKENS)
    assert len({tuple(g.tokens) for g in batched}) > 1


def test_the_image_cache_gives_the_same_features(engine_dir: Path, engine: Any) -> None:
    import torch

    from vlmforge.runner.engine import HfEngine

    cached = HfEngine(engine_dir, image_cache_bytes=1 << 24)
    images = [sized_image(1, (48, 20)), sized_image(2, (20, 28)), sized_image(1, (48, 20))]
    want, got = engine.encode_images(images), cached.encode_images(images)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(torch.allclose(g, w) for g, w in zip(got, want, strict=True))
    assert cached.image_cache.stats().hits >= 1


SERVED: list[tuple[list[tuple[int, int]], str | None]] = [
    ([(32, 32)], "Question: which city is this? Answer:"),
    ([(60, 16)], None),
    ([(48, 20)], "What is this?"),
    ([(20, 28), (32, 32)], "Which of the two is brighter?"),
    ([(32, 32)], "What is this?"),
]
SERVED_TOKENS = 6



@pytest.fixture(scope="module")
def runner(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.helpers.runners import start_runner, stop_runner

    log = tmp_path_factory.mktemp("mistral3") / "serve.log"
    started = start_runner(engine_dir, log, args=("--max-batch-size", "4", "--batch-wait-ms", "300"))
    yield started
    stop_runner(started)


def test_the_openai_client_gets_the_lone_answers_for_images_of_several_sizes(runner: Any, engine: Any) -> None:
    """Concurrent chat requests, one or two image_url parts of different sizes each, served by `vlmforge serve`: each
    answer is the request's lone answer (none meets a float16 near-tie), and its prompt tokens (breaks included) within
    the bound the server checks."""
    from tests.helpers.runners import assert_served_as_alone

    assert_served_as_alone(runner.url, engine, "tiny-mistral3", SERVED, SERVED_TOKENS)
