"""Serving tiny-llava-next (built by the real hf pipeline): images of different sizes give different token counts per
row, and a batch of them, one- and two-image requests mixed, decodes as each request alone; the image cache gives
the same features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.runners import data_url, request_images, sized_content, sized_image

MAX_TOKENS = 12
# (width, height) of each image of a request, and its prompt: 64x64, 90x40, 40x90: 5, 4, 4 tiles; 24, 14, 16 tokens
REQUESTS: list[tuple[list[tuple[int, int]], str | None]] = [
    ([(64, 64)], "Question: which city is this? Answer:"),
    ([(90, 40)], "What is this?"),
    ([(40, 90), (64, 64)], "Compare them."),
    ([(30, 200)], None),
    ([(200, 30), (90, 40)], "Which of the two is brighter?"),
]




@pytest.fixture(scope="module")
def engine_dir(tiny_engine_of: Any) -> Path:
    return tiny_engine_of("llava-next")


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir)


def test_the_engine_holds_the_newline_embedding_and_a_tile_engine(engine_dir: Path, engine: Any) -> None:
    assert (engine_dir / "vision" / "image_newlines.safetensors").is_file()
    assert engine.config.family == "llava_next" and engine.config.llm.architecture == "LlamaForCausalLM"
    assert engine.config.visual.output_shape == ["batch", 4, 64]  # per tile: (28/14)^2 patches
    counts = [int(f.shape[1]) for f in engine.encode_images([sized_image(0, (64, 64)), sized_image(1, (90, 40)),
                                                             sized_image(2, (40, 90))])]
    assert counts == [24, 14, 16]


def test_batched_equals_alone_with_images_of_different_sizes(engine: Any) -> None:
    from tests.helpers.runners import assert_batched_equals_alone

    batched = assert_batched_equals_alone(engine, [request_images(sizes) for sizes, _ in REQUESTS],
                                          [prompt for _, prompt in REQUESTS], MAX_TOKENS)
    assert len({tuple(g.tokens) for g in batched}) > 1


def test_the_image_cache_gives_the_same_features_per_size(engine_dir: Path, engine: Any) -> None:
    """The cache keys an image's tiles with its size: a black image at 56x56 and at 56x40 gives the very same tiles
    (the 56x40 one is padded with black onto the 56x56 pinpoint) but unpads to fewer rows: no shared entry."""
    import torch
    from PIL import Image

    from vlmforge.runner.engine import HfEngine

    cached = HfEngine(engine_dir, image_cache_bytes=1 << 24)
    blank = [Image.new("RGB", (56, 56)), Image.new("RGB", (56, 40))]
    tiles = engine.family.visual_inputs(engine.processor, blank)
    assert torch.equal(*tiles.split(tiles.pixels))
    images = [sized_image(1, (90, 40)), *blank, sized_image(1, (90, 40))]
    want = engine.encode_images(images)
    got = cached.encode_images(images)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(torch.allclose(g, w) for g, w in zip(got, want, strict=True))
    assert want[1].shape[1] != want[2].shape[1]
    assert cached.image_cache is not None and cached.image_cache.stats().hits == 1  # the repeated image only



def test_the_server_batches_images_of_different_sizes_as_alone(engine_dir: Path, engine: Any,
                                                                tmp_path: Path) -> None:
    """Through `vlmforge serve` and the openai client: concurrent requests (one or two images of different sizes)
    answer what each gives alone."""
    import concurrent.futures

    import openai

    from tests.helpers.runners import start_runner, stop_runner

    # batches formed at batch boundaries (--batch-wait-ms gathers them): in-flight joins would give requests other
    # shapes and padding than this test pins, and tiny-llava-next's float16 logits are full of near-ties (4 of these 5
    # requests have a top-2 margin under 0.01); joins are checked exact in float32 in tests/runner/test_inflight.py
    runner = start_runner(engine_dir, tmp_path / "serve.log",
                          args=("--max-batch-size", "4", "--batch-wait-ms", "300", "--no-inflight"))
    try:
        client = openai.OpenAI(base_url=f"{runner.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(request: tuple[list[tuple[int, int]], str | None]) -> Any:
            sizes, text = request
            content = sized_content(sizes, text)
            return client.chat.completions.create(model="tiny-llava-next", max_tokens=MAX_TOKENS,
                                                  messages=[{"role": "user", "content": content}])

        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            answers = list(pool.map(ask, REQUESTS))
    finally:
        stop_runner(runner)
    for (sizes, text), answer in zip(REQUESTS, answers, strict=True):
        assert answer.choices[0].message.content == engine.generate(request_images(sizes), text, MAX_TOKENS).text


def test_usage_counts_each_request_s_real_prompt_positions(engine_dir: Path, engine: Any, tmp_path: Path) -> None:
    """An anyres image's token count depends on its size: the server checks the prompt against the largest count
    before encoding (a safe bound), but usage reports the positions the LLM was really fed."""
    import openai

    from tests.helpers.runners import start_runner, stop_runner

    runner = start_runner(engine_dir, tmp_path / "serve.log", args=("--max-batch-size", "2"))
    try:
        client = openai.OpenAI(base_url=f"{runner.url}/v1", api_key="unused", max_retries=0, timeout=120)
        used = {}
        for size in [(64, 64), (90, 40)]:
            content = [{"type": "text", "text": "What is this?"},
                       {"type": "image_url", "image_url": {"url": data_url(sized_image(1, size))}}]
            for stream in (False, True):
                kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
                answer = client.chat.completions.create(model="tiny-llava-next", max_tokens=3, stream=stream,
                                                        messages=[{"role": "user", "content": content}], **kwargs)
                usage = [chunk.usage for chunk in answer if chunk.usage][-1] if stream else answer.usage
                used[size, stream] = usage.prompt_tokens
    finally:
        stop_runner(runner)
    for size in [(64, 64), (90, 40)]:
        features = engine.encode_images([sized_image(1, size)])[0]
        real = engine.llm_prefix(features, "What is this?").length
        assert used[size, False] == used[size, True] == real, size
    assert used[(90, 40), False] < used[(64, 64), False] == engine.prompt_length("What is this?", 1)
