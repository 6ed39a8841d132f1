"""Decode-equality checks the multi-image families' tests share: requests of one or two images of several sizes,
batched left-padded and joining a running batch, each decoding what it decodes alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmforge.modeling.generation import LlmPrefix, greedy_prefix
from vlmforge.runner.batching import GreedyBatch, greedy_batch


def multi_image_prefixes(t: Any, llm: Any, prompt: str) -> list[LlmPrefix]:
    """Five requests of the tiny model ``t`` (one or two of its golden images, several prompts, one without text;
    ``prompt`` asks about two images) as ``llm``'s prefixes, of several lengths."""
    requests = [([0], t.prompt), ([1, 2], prompt), ([2], "What is this?"), ([2, 0], None), ([1], t.prompt)]
    return [t.family.llm_prefix(llm, t.processor, [t.features[i] for i in images], text) for images, text in requests]


def assert_decodes_as_alone(got: Sequence[Any], alone: Sequence[Any], tolerance: float = 1e-4) -> None:
    for one, many in zip(alone, got, strict=True):
        assert many.tokens == one.tokens
        assert (many.logits - one.logits).abs().max().item() < tolerance


def assert_batched_as_alone(llm: Any, prefixes: Sequence[LlmPrefix], max_new_tokens: int) -> list[Any]:
    """A left-padded batch of ``prefixes`` decodes as each alone; returns the lone decodes."""
    alone = [greedy_prefix(llm, p, max_new_tokens) for p in prefixes]
    assert_decodes_as_alone(greedy_batch(llm, prefixes, max_new_tokens), alone)
    return alone


def assert_joins_as_alone(llm: Any, prefixes: Sequence[LlmPrefix], limits: Sequence[int]) -> None:
    """Two requests start; the others join at step boundaries 1, 3 and 4 (into retired rows or appended ones):
    each decodes as alone (``limits``: each request's new tokens)."""
    alone = [greedy_prefix(llm, p, n) for p, n in zip(prefixes, limits, strict=True)]
    batch = GreedyBatch(llm, prefixes[:2], list(limits[:2]), keep_logits=True)
    waiting = list(range(2, len(prefixes)))
    for step, _ in enumerate(batch):
        if waiting and step in (1, 3, 4):
            index = waiting.pop(0)
            assert batch.admit(prefixes[index], limits[index]) == index
    assert not waiting
    assert_decodes_as_alone(batch.results(), alone)
