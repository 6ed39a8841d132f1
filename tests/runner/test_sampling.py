"""The sampling processors and a batch's sampler, on logits made up for the purpose (no model)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from vlmforge.runner.sampling import (
    BatchSampler,
    SamplingParams,
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p,
    draw,
    needs_sampler,
)

CPU = torch.device("cpu")


def test_penalties_follow_openais_and_hugging_faces_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # token 0 twice, token 1 once
    got = apply_penalties(logits, counts, presence=torch.tensor([0.5]), frequency=torch.tensor([0.25]),
                          repetition=torch.tensor([2.0]))
    # repetition: 2.0 / 2 = 1.0, -1.0 * 2 = -2.0; then - count * 0.25 - 0.5 for seen tokens
    want = torch.tensor([[1.0 - 2 * 0.25 - 0.5, -2.0 - 0.25 - 0.5, 0.5, 3.0]])
    assert torch.allclose(got, want)
    negative = apply_penalties(logits, counts, presence=torch.tensor([-1.0]), frequency=torch.tensor([0.0]),
                               repetition=torch.tensor([1.0]))
    assert torch.allclose(negative, torch.tensor([[3.0, 0.0, 0.5, 3.0]])), "a negative presence penalty favours"


def test_temperature_scales_and_zero_leaves_the_row_for_its_argmax() -> None:
    logits = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    got = apply_temperature(logits, torch.tensor([0.5, 0.0]))
    assert torch.equal(got, torch.tensor([[2.0, 4.0], [1.0, 2.0]]))


def test_top_k_and_top_p_keep_what_they_should() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()[None].repeat(4, 1)
    kept = apply_top_k_top_p(logits, top_k=torch.tensor([2, -1, 0, 3]), top_p=torch.tensor([1.0, 0.7, 0.75, 0.5]))
    finite = torch.isfinite(kept).tolist()
    assert finite[0] == [True, True, False, False]  # top_k 2
    assert finite[1] == [True, True, False, False]  # 0.5 < 0.7, 0.75 >= 0.7
    assert finite[2] == [True, True, False, False]  # 0.75 reaches 0.75 exactly: the set stops there
    assert finite[3] == [True, False, False, False]  # top_k 3, then top_p 0.5 (the first token alone)
    assert torch.equal(kept[0, :2], logits[0, :2]), "kept logits are unchanged"
    tiny = apply_top_k_top_p(logits[:1], top_k=torch.tensor([-1]), top_p=torch.tensor([1e-9]))
    assert torch.isfinite(tiny).tolist() == [[True, False, False, False]], "the most likely token always stays"


def test_a_draw_follows_the_distribution_and_its_seed() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.stack([draw(probs, gen) for _ in range(4000)]), minlength=4).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03), counts
    assert counts[3] == 0, "a token of probability 0 is never drawn"
    seq = [[int(draw(probs, torch.Generator().manual_seed(s))) for _ in range(1)] for s in (7, 7)]
    assert seq[0] == seq[1]


def test_parameters_are_checked_and_defaults_are_plain_greedy() -> None:
    assert SamplingParams().plain_greedy and not needs_sampler([SamplingParams(), None])
    assert needs_sampler([None, SamplingParams(temperature=0.5)])
    assert needs_sampler([SamplingParams(logprobs=0)]) and needs_sampler([SamplingParams(min_tokens=2)])
    assert needs_sampler([SamplingParams(repetition_penalty=1.1)])
    for bad in ({"temperature": 2.1}, {"top_p": 0.0}, {"top_k": -3}, {"repetition_penalty": 0.0},
                {"presence_penalty": 2.5}, {"logprobs": 21}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)


def test_the_sampler_rows_are_independent_of_their_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seeded = SamplingParams(temperature=1.0, seed=11)
    alone = BatchSampler([seeded], [frozenset()], CPU)
    together = BatchSampler([SamplingParams(temperature=0.7, seed=3), seeded, SamplingParams()], [frozenset()] * 3,
                            CPU)
    a = [int(alone.step(logits[1:2])[0][0]) for _ in range(20)]
    b = [int(together.step(logits)[0][1]) for _ in range(20)]
    assert a == b
    assert len(set(a)) > 3, "temperature 1 over 50 near-even tokens samples many"


def test_top_k_1_and_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    sampler = BatchSampler([SamplingParams(temperature=1.5, top_k=1, seed=1), SamplingParams(),
                            SamplingParams(temperature=1.0, top_p=1e-6, seed=2), SamplingParams(logprobs=2)],
                           [frozenset()] * 4, CPU)
    picked, _ = sampler.step(logits)
    assert picked.tolist() == logits.argmax(-1).tolist()


def test_min_tokens_bans_the_end_tokens_until_then() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])  # token 1 (the end token) is the argmax
    sampler = BatchSampler([SamplingParams(min_tokens=2)], [frozenset({1})], CPU)
    assert [int(sampler.step(logits)[0][0]) for _ in range(3)] == [2, 2, 1]


def test_penalties_in_the_sampler_count_the_rows_own_tokens() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    sampler = BatchSampler([SamplingParams(frequency_penalty=0.2), SamplingParams()], [frozenset()] * 2, CPU)
    steps = [sampler.step(logits)[0].tolist() for _ in range(3)]
    assert steps == [[0, 0], [1, 0], [0, 0]]  # row 0: 3.0 - 0.2 = 2.8 < 2.9, then 2.8 > 2.9 - 0.2
    assert sampler.counts is not None and sampler.counts[1].sum() == 3


def test_logprobs_are_the_raw_log_softmax() -> None:
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(3))
    sampler = BatchSampler([SamplingParams(temperature=0.8, seed=4, logprobs=3, presence_penalty=1.0),
                            SamplingParams(logprobs=0)], [frozenset()] * 2, CPU)
    picked, logprobs = sampler.step(logits)
    raw = logits.log_softmax(-1)
    assert logprobs is not None
    first, second = logprobs
    assert first is not None and second is not None
    assert math.isclose(first.logprob, raw[0, picked[0]].item(), abs_tol=1e-6)
    assert [t for t, _ in first.top] == raw[0].topk(3).indices.tolist()
    assert all(math.isclose(v, raw[0, t].item(), abs_tol=1e-6) for t, v in first.top)
    assert second.top == () and math.isclose(second.logprob, raw[1].max().item(), abs_tol=1e-6)
    assert math.isclose(sum(math.exp(v) for v in raw[0].tolist()), 1.0, rel_tol=1e-5)
