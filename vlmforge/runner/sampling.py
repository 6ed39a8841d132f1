"""Per-request sampling: the parameters, the logits processors, and a batch's sampler.

A batch's rows may each have their own :class:`SamplingParams`. Every step, :class:`BatchSampler` turns the batch's
logits into one token per row, in this order (vLLM's and Hugging Face's):

1. penalties on the row's own generated tokens: ``repetition_penalty`` (Hugging Face's formula: a seen token's
   positive logit is divided by it, a negative one multiplied), then ``frequency_penalty`` and ``presence_penalty``
   (OpenAI's formula: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``);
   ``min_tokens``: the row's end tokens are banned until it has that many;
2. ``temperature`` (0: the row takes the argmax of what step 1 left);
3. ``top_k`` (the k largest; -1 or 0: off), then ``top_p`` (the smallest set whose probability reaches p);
4. a draw from what remains with the row's own :class:`torch.Generator` (seeded with ``seed``, or a fresh random
   seed), so a row's tokens depend on its seed and its logits alone, never on the other rows of its batch.

Penalties see the generated tokens only: a prompt reaches the LLM as embeddings (image features and text), so the
runner has no prompt token ids to count (vLLM's ``repetition_penalty`` also counts the prompt's tokens).

A batch whose rows are all greedy (temperature 0, no penalties, no ``min_tokens``, no logprobs) takes no sampler at
all: :class:`~vlmforge.runner.batching.GreedyBatch` keeps its own argmax path, so greedy output is exactly what it
was before sampling existed.

Logprobs (``logprobs``: how many alternatives per token, 0..20) are the log-softmax of the model's raw logits in
float32, before penalties, temperature and top-k/top-p (vLLM's default ``raw_logprobs``): what the model thinks of a
token, whatever the request did to pick it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

MAX_LOGPROBS = 20
"""OpenAI's ceiling on ``top_logprobs``."""


class SamplingParams(BaseModel):
    """How one request picks its tokens (defaults: greedy, as the runner always decoded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0: greedy (the argmax); above: sample from softmax(logits / temperature)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    top_k: int = Field(default=-1, ge=-1)
    """Keep the k most likely tokens (-1 or 0: all)."""
    seed: int | None = None
    """Seeds the row's generator: the same seed gives the same tokens, batched or alone. None: a random seed."""
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    """Hugging Face's multiplicative penalty on tokens generated before (1: none)."""
    min_tokens: int = Field(default=0, ge=0)
    """End tokens are banned until the row has this many tokens."""
    ignore_eos: bool = False
    """Go on past end tokens, to the token limit (benchmarks use it for fixed-length answers)."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """None: no logprobs; n: the chosen token's logprob and the n most likely tokens' at every step."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def plain_greedy(self) -> bool:
        """Decodes exactly like the sampler-free argmax path (the default)."""
        return self.greedy and not self.penalized and self.min_tokens == 0 and self.logprobs is None

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of a request with ``n`` choices: each its own seed (``seed + index``,
        as vLLM derives them), so choices differ and each is reproducible."""
        if index == 0 or self.seed is None:
            return self
        return self.model_copy(update={"seed": self.seed + index})


class UnsupportedSampling(ValueError):
    """A sampling parameter an engine cannot honour; ``param`` names it (the server answers 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob and the ``top`` most likely tokens' (token id, logprob), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# --- the logits processors (each [B, V] -> [B, V], rows as their own) ----------------------------------------


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """Repetition (Hugging Face: a seen token's logit divided by the penalty if positive, multiplied if not), then
    OpenAI's frequency and presence penalties; ``counts`` [B, V]: each row's generated tokens so far; the penalties
    [B] per row."""
    import torch

    seen = counts > 0
    rep = repetition[:, None].expand_as(logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - counts * frequency[:, None] - seen.to(logits.dtype) * presence[:, None]


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits / temperature`` per row (rows at 0 are left alone: they take the argmax)."""
    import torch

    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / safe[:, None]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what lies outside each row's top k (``top_k`` [B], values <= 0: all), then outside the
    smallest set whose probability reaches ``top_p`` [B] (the most likely token is always kept)."""
    import torch

    vocab = logits.shape[-1]
    ordered, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the probability of the more likely tokens
    drop = drop | (before >= top_p[:, None])
    drop[:, 0] = False
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token from ``probs`` [V] with ``generator``: argmax(probs / q) for q ~ Exp(1) (an exact draw from probs,
    and one fixed number of random draws per step: the row's stream does not depend on its distribution)."""
    import torch

    q = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / q).argmax(-1)


def _append_zero_row(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` [B, V] with a row of zeros appended."""
    import torch

    return torch.cat([counts, counts.new_zeros((1, counts.shape[1]))])


# --- a batch's sampler --------------------------------------------------------------------------------------


def needs_sampler(params: Sequence[SamplingParams | None] | None) -> bool:
    """Whether any row needs more than the plain argmax."""
    return params is not None and any(p is not None and not p.plain_greedy for p in params)


class BatchSampler:
    """Picks every row's token from a batch's logits, each row with its own :class:`SamplingParams` and generator.

    ``step(logits)`` -> (tokens [B] on the logits' device, each row's :class:`TokenLogprob` or None on the host).
    Rows advance together (one token each per step); ``eos``: each row's end tokens (for ``min_tokens``). In-flight
    batching places a joining request at a row with :meth:`place` (a finished row's, or a new one): the row starts
    over, so a seeded request draws the same tokens joining a running batch as alone.
    """

    def __init__(self, params: Sequence[SamplingParams | None], eos: Sequence[frozenset[int]], device: torch.device,
                 vocab: int | None = None) -> None:
        self.params = [p or SamplingParams() for p in params]
        self.eos = list(eos)
        self.device = device
        self.steps = 0
        self.row_steps = [0] * len(self.params)
        """Tokens each row has picked since it was placed (``min_tokens`` counts a joined row's own tokens)."""
        self.counts: torch.Tensor | None = None
        self.generators: list[torch.Generator | None] = [self._generator(p) for p in self.params]
        self._columns()

    def _generator(self, p: SamplingParams) -> torch.Generator | None:
        import torch

        if p.greedy:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        return generator

    def _columns(self) -> None:
        """The per-row parameter tensors and flags, from ``params`` (again after a row is placed)."""
        import torch

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        self.penalized = any(p.penalized for p in self.params)
        self.presence = column([p.presence_penalty for p in self.params])
        self.frequency = column([p.frequency_penalty for p in self.params])
        self.repetition = column([p.repetition_penalty for p in self.params])
        self.temperature = column([p.temperature for p in self.params])
        self.top_k = column([p.top_k for p in self.params], torch.long)
        self.top_p = column([p.top_p for p in self.params])
        self.truncates = any(not p.greedy and (p.top_k > 0 or p.top_p < 1.0) for p in self.params)
        self.top_logprobs = max((p.logprobs for p in self.params if p.logprobs is not None), default=None)

    def place(self, row: int, params: SamplingParams | None, eos: frozenset[int]) -> None:
        """A request joined the batch at ``row`` (a reused row, or ``len(params)`` to append one): its parameters, a
        freshly seeded generator, no penalty counts and no tokens yet, exactly as if it had started the batch."""
        p = params or SamplingParams()
        if row == len(self.params):
            self.params.append(p)
            self.eos.append(eos)
            self.generators.append(self._generator(p))
            self.row_steps.append(0)
            if self.counts is not None:
                self.counts = _append_zero_row(self.counts)
        elif 0 <= row < len(self.params):
            self.params[row], self.eos[row], self.row_steps[row] = p, eos, 0
            self.generators[row] = self._generator(p)
            if self.counts is not None:
                self.counts[row].zero_()
        else:
            raise ValueError(f"row {row} is neither a row of the sampler's {len(self.params)} nor the next one")
        self._columns()

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Steps 1-3 of the module's order on float32 logits [B, V]: what each row draws from (or takes the argmax
        of, at temperature 0)."""
        import torch

        logits = logits.float()
        if self.penalized and self.counts is not None:
            logits = apply_penalties(logits, self.counts, self.presence, self.frequency, self.repetition)
        banned = [(row, sorted(self.eos[row])) for row, p in enumerate(self.params)
                  if self.row_steps[row] < p.min_tokens and self.eos[row]]
        if banned:
            logits = logits.clone()
            for row, ids in banned:
                logits[row, torch.tensor(ids, device=logits.device)] = float("-inf")
        logits = apply_temperature(logits, self.temperature)
        if self.truncates:
            logits = apply_top_k_top_p(logits, self.top_k, self.top_p)
        return logits

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[TokenLogprob | None] | None]:
        import torch

        processed = self.process(logits)
        picked = processed.argmax(-1)
        if any(g is not None for g in self.generators):
            probs = processed.softmax(-1)
            drawn = [draw(probs[row], g) if g is not None else picked[row] for row, g in enumerate(self.generators)]
            picked = torch.stack(drawn)
        if self.penalized:
            if self.counts is None:
                self.counts = torch.zeros(processed.shape, dtype=torch.float32, device=processed.device)
            self.counts.scatter_add_(1, picked[:, None], torch.ones_like(picked[:, None], dtype=torch.float32))
        self.steps += 1
        self.row_steps = [n + 1 for n in self.row_steps]
        return picked, self._logprobs(logits, picked)

    def _logprobs(self, logits: torch.Tensor, picked: torch.Tensor) -> list[TokenLogprob | None] | None:
        if self.top_logprobs is None:
            return None
        raw = logits.float().log_softmax(-1)
        chosen = raw.gather(1, picked[:, None])[:, 0].tolist()
        top_values, top_ids = raw.topk(self.top_logprobs, dim=-1)  # k = 0 gives empty rows
        values, ids = top_values.tolist(), top_ids.tolist()
        out: list[TokenLogprob | None] = []
        for row, p in enumerate(self.params):
            if p.logprobs is None:
                out.append(None)
                continue
            out.append(TokenLogprob(chosen[row], tuple(zip(ids[row][:p.logprobs], values[row][:p.logprobs]))))
        return out
