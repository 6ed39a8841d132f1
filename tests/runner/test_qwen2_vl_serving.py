"""Serving tiny-qwen2-vl (built by the real hf pipeline): images of several sizes give merged grids of their own
shape (and M-RoPE positions of their own), one or two per request; a batch of them decodes as each request alone,
through the scheduler's sequence; the image cache gives the same features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.runners import request_images, sized_image, sized_images

MAX_TOKENS = 12
# (width, height) of each image of a request: merged grids 4x4, 2x4, 4x2, 2x2 (16, 8, 8, 4 tokens) and 2x7 (its
# aspect ratio is kept within max_pixels: 14 tokens)
REQUESTS: list[tuple[list[tuple[int, int]], str | None]] = [
    ([(112, 112)], "Question: which city is this? Answer:"),
    ([(120, 60)], "What is this?"),
    ([(50, 100), (64, 64)], "Compare them."),
    ([(200, 60)], None),
    ([(64, 64), (120, 60)], "Which of the two is brighter?"),
]




@pytest.fixture(scope="module")
def engine_dir(tiny_engine_of: Any) -> Path:
    return tiny_engine_of("qwen2-vl")


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir)


def test_the_engine_holds_the_rope_frequencies_and_a_rows_engine(engine_dir: Path, engine: Any) -> None:
    import onnxruntime as ort

    assert (engine_dir / "vision" / "vision_rope.safetensors").is_file()
    assert engine.config.family == "qwen2_vl" and engine.config.llm.architecture == "Qwen2VLForCausalLM"
    assert engine.config.visual.output_shape == ["tokens", 64]
    session = ort.InferenceSession(str(engine_dir / "vision" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, len(i.shape)) for i in session.get_inputs()] == [
        ("rows", 2), ("rotary_pos_emb", 2), ("attention_mask", 3)]
    sizes = [(112, 112), (120, 60), (50, 100), (200, 60)]
    grids = [tuple(f.shape[1:3]) for f in engine.encode_images(sized_images(sizes))]
    assert grids == [(4, 4), (2, 4), (4, 2), (2, 7)]
    assert engine.decode_path == "dynamic"


def test_batched_equals_alone_with_images_of_different_sizes(engine: Any) -> None:
    from tests.helpers.runners import assert_batched_equals_alone

    batched = assert_batched_equals_alone(engine, [request_images(sizes) for sizes, _ in REQUESTS],
                                          [prompt for _, prompt in REQUESTS], MAX_TOKENS)
    assert len({tuple(g.tokens) for g in batched}) > 1


def test_the_image_cache_gives_the_same_features(engine_dir: Path, engine: Any) -> None:
    import torch

    from vlmforge.runner.engine import HfEngine

    cached = HfEngine(engine_dir, image_cache_bytes=1 << 24)
    images = [sized_image(1, (120, 60)), sized_image(2, (50, 100)), sized_image(1, (120, 60))]
    want, got = engine.encode_images(images), cached.encode_images(images)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(torch.allclose(g, w) for g, w in zip(got, want, strict=True))
    assert cached.image_cache.stats().hits >= 1


SERVED: list[tuple[list[tuple[int, int]], str | None]] = [
    ([(112, 112)], "Question: which city is this? Answer:"),
    ([(200, 60)], None),
    ([(64, 64)], "What is this?"),
    ([(64, 64), (120, 60)], "Which of the two is brighter?"),
    ([(50, 100)], "Question: which city is this? Answer:"),
]
SERVED_TOKENS = 6
"""Requests whose lone float16 decodes have no near-tie in their first 6 steps (top-2 margins of 0.02 or more; the
batch above has some under 0.01, which another batch shape may flip): all are compared exactly."""



@pytest.fixture(scope="module")
def runner(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.helpers.runners import start_runner, stop_runner

    log = tmp_path_factory.mktemp("qwen2-vl") / "serve.log"
    started = start_runner(engine_dir, log, args=("--max-batch-size", "4", "--batch-wait-ms", "300"))
    yield started
    stop_runner(started)


def test_the_openai_client_gets_the_lone_answers_for_images_of_several_sizes(runner: Any, engine: Any) -> None:
    """Concurrent chat requests, one or two image_url parts of different sizes each, served by `vlmforge serve`:
    each answer is the request's lone answer (the requests meet no float16 near-tie), and its usage the real prompt
    positions."""
    from tests.helpers.runners import assert_served_as_alone

    assert_served_as_alone(runner.url, engine, "tiny-qwen2-vl", SERVED, SERVED_TOKENS)
