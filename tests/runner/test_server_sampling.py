"""Sampling through a real `vlmforge serve` and the official openai client: seeds, n choices, logprobs (plain and
streamed), and greedy unchanged."""

from __future__ import annotations

import concurrent.futures
import math
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.runners import Runner, image_url
from tests.runner.test_server import PROMPTS, client, expected, messages


@pytest.fixture(scope="module")
def engine(tiny_engine: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(tiny_engine)


VLLM_FIELDS = ("top_k", "min_tokens", "ignore_eos", "repetition_penalty")
"""vLLM's extensions, which the openai client sends in ``extra_body``."""


def ask(runner: Runner, prompt: str = PROMPTS[0], index: int = 1, **fields: Any) -> Any:
    extra = {name: fields.pop(name) for name in VLLM_FIELDS if name in fields}
    return client(runner).chat.completions.create(model="tiny-llava", messages=messages(prompt, image_url(index)),
                                                  max_tokens=fields.pop("max_tokens", 12), extra_body=extra or None,
                                                  **fields)


def test_temperature_0_is_the_engines_greedy_output(runner: Runner, engine: Any) -> None:
    want = expected(engine, 1, PROMPTS[0], 12)
    assert ask(runner, temperature=0).choices[0].message.content == want
    assert ask(runner, temperature=0, top_p=0.5, top_k=3, seed=9).choices[0].message.content == want


def test_a_seed_gives_the_same_text_alone_and_batched_with_others(runner: Runner) -> None:
    fields = {"temperature": 1.0, "seed": 4242, "max_tokens": 16}
    alone = ask(runner, **fields).choices[0].message.content
    assert ask(runner, **fields).choices[0].message.content == alone
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, runner, PROMPTS[2], 2, temperature=0.8, seed=1, max_tokens=16),
                   pool.submit(ask, runner, **fields), pool.submit(ask, runner, PROMPTS[1], 0, max_tokens=20),
                   pool.submit(ask, runner, **fields)]
        results = [f.result() for f in futures]
    assert [results[1].choices[0].message.content, results[3].choices[0].message.content] == [alone, alone]
    others = {ask(runner, temperature=1.0, seed=s, max_tokens=16).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {alone}) > 1, "other seeds give other texts"


def test_n_choices_each_with_its_own_seed(runner: Runner) -> None:
    response = ask(runner, temperature=1.0, seed=100, n=3, max_tokens=10)
    assert [c.index for c in response.choices] == [0, 1, 2]
    texts = [c.message.content for c in response.choices]
    assert len(set(texts)) > 1, texts
    assert texts[0] == ask(runner, temperature=1.0, seed=100, max_tokens=10).choices[0].message.content
    assert texts[2] == ask(runner, temperature=1.0, seed=102, max_tokens=10).choices[0].message.content
    assert response.usage.completion_tokens == sum(
        ask(runner, temperature=1.0, seed=s, max_tokens=10).usage.completion_tokens for s in (100, 101, 102))
    greedy = ask(runner, n=2)
    assert len(greedy.choices) == 2 and greedy.choices[0].message.content == greedy.choices[1].message.content


def test_logprobs_in_openais_shape(runner: Runner, engine: Any) -> None:
    response = ask(runner, logprobs=True, top_logprobs=3, max_tokens=8)
    choice = response.choices[0]
    assert choice.message.content == expected(engine, 1, PROMPTS[0], 8)
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-6), "greedy: the top token"
        assert entry.token == entry.top_logprobs[0].token and entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0
    assert ask(runner, max_tokens=4).choices[0].logprobs is None


def test_streamed_choices_and_logprobs_parse_in_the_openai_client(runner: Runner) -> None:
    plain = ask(runner, temperature=1.0, seed=7, n=2, logprobs=True, top_logprobs=1, max_tokens=10)
    chunks = list(ask(runner, temperature=1.0, seed=7, n=2, logprobs=True, top_logprobs=1, max_tokens=10,
                      stream=True, stream_options={"include_usage": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == plain.choices[index].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [plain.choices[index].finish_reason]
        streamed = [e for c in mine if c.logprobs and c.logprobs.content for e in c.logprobs.content]
        want = plain.choices[index].logprobs.content
        assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in want]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_penalties_and_vllm_extensions_are_taken(runner: Runner, engine: Any) -> None:
    greedy = expected(engine, 1, PROMPTS[0], 16)
    penalized = ask(runner, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=2.0, max_tokens=16)
    assert penalized.choices[0].message.content != greedy
    full = ask(runner, ignore_eos=True, min_tokens=4, max_tokens=16)
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
