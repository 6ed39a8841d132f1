"""Serving tiny-kosmos-2 (built by the real hf pipeline: convert, visual engine, validation, publish): the saved text
decoder is vlmforge's offset-taking class, and a left-padded batch (explicit 0-based position ids) decodes as each
request alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlmforge.modeling.images import synthetic_images

MAX_TOKENS = 12
REQUESTS: list[tuple[int, str | None]] = [
    (0, "<grounding>An image of"),
    (1, "What is this?"),
    (2, None),
    (1, "Question: which city is this? Answer:"),
    (2, "<grounding>A photo of"),
]


@pytest.fixture(scope="module")
def engine_dir(tiny_engine_of: Any) -> Path:
    return tiny_engine_of("kosmos-2")


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir)


def test_the_engine_holds_the_offset_decoder(engine: Any) -> None:
    from vlmforge.families.kosmos2 import image_text_lm_class

    assert engine.config.family == "kosmos2" and engine.config.llm.architecture == "Kosmos2ImageTextLM"
    assert isinstance(engine.llm, image_text_lm_class())
    assert engine.config.visual.output_shape == ["batch", 64, 64]


def test_batched_equals_alone(engine: Any) -> None:
    from tests.helpers.runners import assert_batched_equals_alone

    images = synthetic_images()
    batched = assert_batched_equals_alone(engine, [images[i] for i, _ in REQUESTS],
                                          [prompt for _, prompt in REQUESTS], MAX_TOKENS)
    assert len({tuple(g.tokens) for g in batched}) > 1
