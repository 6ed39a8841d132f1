"""Several images per prompt on tiny-mllama (built by the real hf pipeline for two images per prompt): the build
validates a two-image request against transformers' generate(), a batch mixing one- and two-image requests (their
cross-attention states of different lengths, each image visible from its own <|image|> on) decodes each as alone,
and the openai client sends two image_url parts in one message."""

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

MODEL = "tiny-mllama"
TWO_IMAGES = {"limits.max_images_per_prompt": 2, "visual.max_batch_size": 8}
"""Batch 4 x 2 images, one visual-engine input each."""
MAX_TOKENS = 12
SIZES = [(56, 56), (90, 40), (40, 90)]  # (width, height): 4, 3 and 3 tiles
REQUESTS: list[tuple[tuple[int, ...], str | None]] = [
    ((0, 1), "Compare the two pictures"), ((2,), "What is this?"), ((2, 0), "<|image|>First this<|image|> then that"),
    ((1, 2), None), ((0,), "If I had to write a haiku for this one")]


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
    assert_validates_two_images(built, "<|image|>")


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
        assert answer.usage.prompt_tokens == engine.prompt_length(text, len(indexes))
        if not near_tie(alone):  # a float16 near-tie may flip in another batch shape
            assert answer.choices[0].message.content == alone.text, (indexes, text)
            exact += 1
    assert exact >= 3, "most requests are compared exactly"
