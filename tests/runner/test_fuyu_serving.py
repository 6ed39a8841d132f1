"""Serving tiny-fuyu (built by the real hf pipeline: convert, visual engine, validation, publish): images of several
sizes give patch grids of their own shape (and prompts of their own length), and a batch of them decodes as each
request alone, through the engine's batched loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlmforge.modeling.images import synthetic_images

MAX_TOKENS = 12
REQUESTS: list[tuple[int, tuple[int, int], str | None]] = [
    (0, (200, 150), "Question: which city is this? Answer:"),  # scaled into 120x90: 3 x 4 patches
    (1, (100, 45), "What is this?"),  # 2 x 4
    (2, (50, 80), None),  # 3 x 2
    (0, (31, 29), "Describe it."),  # 1 row x 2 columns
    (1, (120, 90), "What color is it?"),  # 3 x 4
]


def image(index: int, size: tuple[int, int]) -> Any:
    return synthetic_images()[index].resize(size)


@pytest.fixture(scope="module")
def engine_dir(tiny_engine_of: Any) -> Path:
    return tiny_engine_of("fuyu")


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir)


def test_the_engine_is_a_patch_projection(engine_dir: Path, engine: Any) -> None:
    import onnxruntime as ort

    assert engine.config.family == "fuyu" and engine.config.llm.architecture == "PersimmonForCausalLM"
    assert engine.config.visual.output_shape == ["tokens", 64]
    session = ort.InferenceSession(str(engine_dir / "vision" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, len(i.shape)) for i in session.get_inputs()] == [("patches", 2)]
    grids = [tuple(f.shape[1:3]) for f in engine.encode_images([image(i, size) for i, size, _ in REQUESTS])]
    assert grids == [(3, 4), (2, 4), (3, 2), (1, 2), (3, 4)]


def test_batched_equals_alone(engine: Any) -> None:
    from tests.helpers.runners import assert_batched_equals_alone

    batched = assert_batched_equals_alone(engine, [image(i, size) for i, size, _ in REQUESTS],
                                          [prompt for _, _, prompt in REQUESTS], MAX_TOKENS)
    assert len({tuple(g.tokens) for g in batched}) > 1
