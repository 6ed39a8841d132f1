"""Several images per prompt on tiny-llava-onevision (built by the real hf pipeline for two images per prompt): the
build validates a two-image request against transformers' generate() (each image of it one padded tile), a batch
mixing one- and two-image requests decodes each as alone, the same image alone and among two gives its tiles or one
tile (the image cache too), and the openai client sends two image_url parts in one message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.runners import (
    ask_several_images,
    assert_batched_equals_alone,
    assert_image_order_counts,
    assert_validates_two_images,
    build_validated,
    near_tie,
    sized_image,
)

MODEL = "tiny-llava-onevision"
TWO_IMAGES = {"limits.max_images_per_prompt": 2, "visual.max_batch_size": 296, "limits.max_input_len": 192}
"""Batch 4 x 2 images x 37 visual-engine inputs (an image alone takes up to 37; among several, one); the server
bounds a prompt by 54 tokens per image (the largest image alone), so two images and a long question need 192."""
MAX_TOKENS = 12
SIZES = [(64, 64), (100, 80), (45, 130), (200, 30)]  # (width, height)
# (image indexes, prompt): one- and two-image requests mixed, images of different sizes (200x30 alone is left out:
# its lone decode has a float16 top-2 margin under 0.01, which a batch may flip)
REQUESTS: list[tuple[tuple[int, ...], str | None]] = [
    ((0, 1), "Which of the two is brighter?"), ((2,), "What is this?"), ((2, 3), "Compare them."),
    ((1, 0), None), ((0,), "Question: which city is this? Answer:")]


def image(index: int) -> Any:
    return sized_image(index, SIZES[index])


def request_images(indexes: tuple[int, ...]) -> Any:
    return [image(i) for i in indexes] if len(indexes) > 1 else image(indexes[0])


@pytest.fixture(scope="module")
def built(build_workdir: Path) -> tuple[Path, dict[str, Any]]:
    return build_validated(MODEL, build_workdir, TWO_IMAGES)


@pytest.fixture(scope="module")
def engine(built: tuple[Path, dict[str, Any]]) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(built[0])


def test_the_build_validates_a_two_image_request_against_transformers(built: tuple[Path, dict[str, Any]]) -> None:
    assert_validates_two_images(built, "<image>")


def test_an_image_among_two_takes_one_tile_and_alone_its_tiles(engine: Any) -> None:
    from vlmforge.runner.engine import HfEngine

    pictures = [image(0), image(2)]
    alone = [int(f.shape[1]) for f in engine.encode_images(pictures)]
    among = [int(f.shape[1]) for f in engine.encode_images(pictures, images_in_prompt=[2, 2])]
    assert alone == [46, 54] and among == [4 + 1, 4 + 1]
    cached = HfEngine(engine.dir, image_cache_bytes=1 << 20)
    for counts in ([1, 1], [2, 2], [1, 1]):  # the cache keys the preprocessed pixels: one tile is another entry
        for want, got in zip(engine.encode_images(pictures, images_in_prompt=counts),
                             cached.encode_images(pictures, images_in_prompt=counts),
                             strict=True):
            assert want.shape == got.shape and (want - got).abs().max().item() == 0


def test_a_batch_of_one_and_two_image_requests_equals_each_alone(engine: Any) -> None:
    batched = assert_batched_equals_alone(engine, [request_images(indexes) for indexes, _ in REQUESTS],
                                          [prompt for _, prompt in REQUESTS], MAX_TOKENS)
    assert_image_order_counts(engine, image(0), image(1), REQUESTS[0][1], MAX_TOKENS, batched[0])


def test_the_openai_client_sends_two_image_url_parts_in_one_message(built: tuple[Path, dict[str, Any]], engine: Any,
                                                                   tmp_path: Path) -> None:
    answers, refused = ask_several_images(built[0], MODEL, [([image(i) for i in indexes], text)
                                                            for indexes, text in REQUESTS], MAX_TOKENS,
                                          tmp_path / "serve.log")
    assert "max_images_per_prompt 2" in refused["message"]
    exact = 0
    for (indexes, text), answer in zip(REQUESTS, answers, strict=True):
        alone = engine.generate(request_images(indexes), text, MAX_TOKENS)
        pictures = [image(i) for i in indexes]
        features = engine.encode_images(pictures, images_in_prompt=[len(pictures)] * len(pictures))
        real = engine.llm_prefix(features, text).length
        assert answer.usage.prompt_tokens == real <= engine.prompt_length(text, len(indexes))  # the bound it admits by
        if not near_tie(alone):  # a float16 near-tie may flip in another batch shape
            assert answer.choices[0].message.content == alone.text, (indexes, text)
            exact += 1
    assert exact >= 3, "most requests are compared exactly"
