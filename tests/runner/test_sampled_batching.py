"""Sampling in the batched decode of real tiny models: greedy unchanged, seeds independent of the batch, top_k=1 is
greedy, logprobs of the model's own logits."""
# ruff: noqa: F811 - the tiny_family fixture is imported from test_batching and named by the tests' parameters

from __future__ import annotations

import dataclasses
import math

import pytest

from tests.runner.test_batching import LIMITS, Tiny, tiny_family  # noqa: F401 - the fixture
from vlmforge.runner.batching import GreedyBatch, greedy_batch
from vlmforge.runner.sampling import SamplingParams

SAMPLED = SamplingParams(temperature=1.0, seed=1234)


def run(t: Tiny, rows: list[int], params: list[SamplingParams | None] | None, limit: int = 12) -> list[list[int]]:
    prefixes = t.prefixes()
    return [r.tokens for r in greedy_batch(t.llm, [prefixes[i] for i in rows], [limit] * len(rows), sampling=params)]


@pytest.mark.parametrize("tiny_family", ["llava", "blip2-t5"], indirect=True)
def test_default_parameters_keep_the_greedy_path_and_its_tokens(tiny_family: Tiny,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    t = tiny_family
    want = [r.tokens for r in t.alone(LIMITS)]
    monkeypatch.setattr("vlmforge.runner.batching.BatchSampler", None)  # plain greedy must never build one
    got = greedy_batch(t.llm, t.prefixes(), LIMITS, sampling=[SamplingParams()] * 4 + [None])
    assert [r.tokens for r in got] == want


@pytest.mark.parametrize("tiny_family", ["llava", "blip2-opt"], indirect=True)
def test_greedy_rows_beside_sampled_rows_keep_their_greedy_tokens(tiny_family: Tiny) -> None:
    t = tiny_family
    want = [r.tokens for r in t.alone(LIMITS)]
    got = greedy_batch(t.llm, t.prefixes(), LIMITS, sampling=[None, SAMPLED, SamplingParams(), SAMPLED, None])
    assert [got[i].tokens for i in (0, 2, 4)] == [want[i] for i in (0, 2, 4)]
    assert got[1].tokens != want[1] or got[3].tokens != want[3], "sampling at temperature 1 changes something"


@pytest.mark.parametrize("tiny_family", ["llava", "blip2-opt", "nougat"], indirect=True)
def test_a_seed_gives_the_same_tokens_alone_and_in_any_batch(tiny_family: Tiny) -> None:
    t = tiny_family
    alone = run(t, [2], [SAMPLED])[0]
    batched = run(t, [0, 2, 4], [SamplingParams(temperature=0.9, seed=5), SAMPLED, None])[1]
    assert batched == alone
    other = run(t, [2], [SAMPLED.model_copy(update={"seed": 99})])[0]
    assert other != alone, "another seed, other tokens"


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_top_k_1_is_greedy(tiny_family: Tiny) -> None:
    t = tiny_family
    want = [r.tokens for r in t.alone(LIMITS)]
    got = greedy_batch(t.llm, t.prefixes(), LIMITS,
                       sampling=[SamplingParams(temperature=1.7, top_k=1, seed=i) for i in range(5)])
    assert [r.tokens for r in got] == want


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_logprobs_are_the_log_softmax_of_the_models_logits(tiny_family: Tiny) -> None:
    t = tiny_family
    prefixes = t.prefixes()
    batch = GreedyBatch(t.llm, prefixes[:2], [8, 8], keep_logits=True,
                        sampling=[SamplingParams(temperature=1.0, seed=3, logprobs=5), SamplingParams(logprobs=0)])
    events = [event for step in batch for event in step]
    results = batch.results()
    for row in (0, 1):
        mine = [e for e in events if e.row == row]
        assert [e.token for e in mine] == results[row].tokens
        raw = results[row].logits.log_softmax(-1)  # the kept raw logits, [steps, vocab]
        for step, event in enumerate(mine):
            assert event.logprob is not None
            assert math.isclose(event.logprob.logprob, raw[step, event.token].item(), abs_tol=1e-5)
            assert len(event.logprob.top) == (5 if row == 0 else 0)
            if row == 0:
                assert [tok for tok, _ in event.logprob.top] == raw[step].topk(5).indices.tolist()
                assert event.logprob.logprob <= event.logprob.top[0][1] + 1e-6
    greedy = [r.tokens for r in t.alone([8, 8])]
    assert results[1].tokens == greedy[1], "asking for logprobs does not change a greedy row"


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_ignore_eos_runs_to_the_limit_and_min_tokens_holds_the_end_back(tiny_family: Tiny) -> None:
    t = tiny_family
    prefix = t.prefixes()[0]
    greedy = greedy_batch(t.llm, [prefix], [12])[0].tokens
    at = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    ended = dataclasses.replace(prefix, eos=frozenset({greedy[at]}))  # a later greedy token is an end token now
    assert greedy_batch(t.llm, [ended], [12])[0].tokens == greedy[:at + 1]
    ignored = greedy_batch(t.llm, [ended], [12], sampling=[SamplingParams(ignore_eos=True)])[0].tokens
    assert ignored == greedy
    held = greedy_batch(t.llm, [ended], [12], sampling=[SamplingParams(min_tokens=at + 2)])[0].tokens
    assert held[:at] == greedy[:at] and greedy[at] not in held[at:at + 2] and len(held) >= at + 2
