"""Batched decoding: many requests through one LLM forward per step, greedy or sampled per row.

Every request arrives as a :class:`~vlmforge.modeling.LlmPrefix` (what its family feeds
the LLM); a batch pads them to one shape and decodes them together:

- ``decoder`` (LLaVA, BLIP-2 OPT): prefixes are LEFT-padded, with an attention mask that hides the
  padding and position ids that start at 0 on each row's first real position, so each row sees
  exactly what it would see alone; every step appends one token per row.
- ``seq2seq`` (BLIP-2 T5): the encoder inputs are right-padded under their attention mask; all
  decoders start from the same token, so the decoder side needs no padding.
- ``cross`` (Nougat): encoder states of equal length are stacked (padded, with a mask, otherwise).

Greedy tokens of each row equal those of the unbatched loops (``family.generate``); the tests check it.
Rows with sampling parameters (:mod:`vlmforge.runner.sampling`) are picked by a :class:`BatchSampler`, each
with its own generator; a batch of plain greedy rows never builds one and takes the argmax as it always did.
A finished row (end token, its own token limit, or cancelled by the server) is fed a pad token
until the whole batch is done; its outputs are ignored.

Under tensor parallelism every rank runs the same forwards: rank 0 picks the tokens and sends them
with a :class:`StepSync` after every step, the other ranks run :func:`follow_batch`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vlmforge.modeling.devices import model_device
from vlmforge.modeling.generation import GenResult, LlmPrefix, cache_kwarg, cache_of
from vlmforge.runner.sampling import BatchSampler, SamplingParams, TokenLogprob, needs_sampler


def _last_logits_only(model: torch.nn.Module) -> dict[str, Any]:
    """``logits_to_keep=1`` where the forward takes it: a prefill needs the last position's logits alone
    (a batch of 16 LLaVA prompts would otherwise make 16 x 600 x 32k logits)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


class PrefixBatch:
    """One batch's LLM state: the prefill, then one step per generated token."""

    size: int

    def prefill(self) -> torch.Tensor:
        """Logits [B, vocab] of every row's first new token."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] int64); logits [B, vocab] of the next."""
        raise NotImplementedError


def _stack(prefixes: Sequence[LlmPrefix], *, left: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Pad [1, L_i, H] prefixes to [B, L, H] (zeros) with a [B, L] mask; also whether any row was padded."""
    first = prefixes[0].embeds
    longest = max(p.length for p in prefixes)
    embeds = first.new_zeros((len(prefixes), longest, first.shape[-1]))
    mask = torch.zeros((len(prefixes), longest), dtype=torch.long, device=first.device)
    for row, prefix in enumerate(prefixes):
        span = slice(longest - prefix.length, longest) if left else slice(0, prefix.length)
        embeds[row, span] = prefix.embeds[0].to(embeds.dtype)
        mask[row, span] = prefix.mask[0].to(mask.dtype)
    return embeds, mask, any(p.length != longest for p in prefixes)


class DecoderOnlyBatch(PrefixBatch):
    """Left-padded prefixes of a ``*ForCausalLM``, a dynamic KV cache."""

    def __init__(self, llm: torch.nn.Module, prefixes: Sequence[LlmPrefix]) -> None:
        self.llm = llm
        self.size = len(prefixes)
        self.embeds, self.mask, _ = _stack(prefixes, left=True)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache_kwarg = cache_kwarg(llm)
        self.cache: Any = None

    def prefill(self) -> torch.Tensor:
        out = self.llm(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                       **_last_logits_only(self.llm))
        self.cache = cache_of(out)
        self.next_position = self.positions[:, -1:] + 1
        self.embeds = None  # type: ignore[assignment]  # not needed any more
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        out = self.llm(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position,
                       use_cache=True, **{self.cache_kwarg: self.cache})
        self.cache = cache_of(out)
        self.next_position = self.next_position + 1
        return out.logits[:, -1]


class Seq2SeqBatch(PrefixBatch):
    """An encoder-decoder LLM (T5): right-padded encoder inputs, the encoder run once."""

    def __init__(self, llm: torch.nn.Module, prefixes: Sequence[LlmPrefix]) -> None:
        self.llm = llm
        self.size = len(prefixes)
        self.embeds, self.mask, _ = _stack(prefixes, left=False)
        self.start = torch.tensor([[p.start] for p in prefixes], dtype=torch.long, device=self.embeds.device)
        self.cache_kwarg = cache_kwarg(llm)
        self.cache: Any = None

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.llm(encoder_outputs=self.encoded, attention_mask=self.mask, decoder_input_ids=ids, use_cache=True,
                       **{self.cache_kwarg: self.cache})
        self.cache = cache_of(out)
        return out.logits[:, -1]

    def prefill(self) -> torch.Tensor:
        self.encoded = self.llm.get_encoder()(inputs_embeds=self.embeds, attention_mask=self.mask, return_dict=True)
        return self._decode(self.start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._decode(tokens[:, None])


class CrossAttnBatch(PrefixBatch):
    """A decoder cross-attending to encoder states (Nougat's mBART)."""

    def __init__(self, llm: torch.nn.Module, prefixes: Sequence[LlmPrefix]) -> None:
        self.llm = llm
        self.size = len(prefixes)
        self.states, mask, padded = _stack(prefixes, left=False)
        self.mask = mask if padded else None  # equal lengths: no mask, exactly like one request alone
        self.start = torch.tensor([[p.start] for p in prefixes], dtype=torch.long, device=self.states.device)
        self.cache_kwarg = cache_kwarg(llm)
        self.cache: Any = None

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.llm(input_ids=ids, encoder_hidden_states=self.states, encoder_attention_mask=self.mask,
                       use_cache=True, **{self.cache_kwarg: self.cache})
        self.cache = cache_of(out)
        return out.logits[:, -1]

    def prefill(self) -> torch.Tensor:
        return self._decode(self.start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._decode(tokens[:, None])


BATCH_KINDS: dict[str, type[PrefixBatch]] = {
    "decoder": DecoderOnlyBatch, "seq2seq": Seq2SeqBatch, "cross": CrossAttnBatch,
}


def make_batch(llm: torch.nn.Module, prefixes: Sequence[LlmPrefix]) -> PrefixBatch:
    """The batch state for ``prefixes`` (all of one kind: one engine serves one family)."""
    if not prefixes:
        raise ValueError("a batch needs at least one request")
    kinds = {p.kind for p in prefixes}
    if len(kinds) != 1:
        raise ValueError(f"one batch mixes prefix kinds {sorted(kinds)}")
    return BATCH_KINDS[prefixes[0].kind](llm, prefixes)


class BatchFactory(Protocol):
    """Makes the batch state for prefixes that will generate up to ``max_new_tokens`` (e.g. the static-cache
    path of :mod:`vlmforge.runner.static`)."""

    def __call__(self, prefixes: Sequence[LlmPrefix], max_new_tokens: int) -> PrefixBatch: ...


class StepSync(Protocol):
    """Rank 0's side of the lockstep: after every step, the tokens fed next and whether to go on."""

    def step(self, tokens: torch.Tensor, go_on: bool) -> None: ...


class StepSource(Protocol):
    """A follower's side: rank 0's tokens and decision, for a batch of ``size`` rows."""

    def step(self, size: int) -> tuple[torch.Tensor, bool]: ...


@dataclass(frozen=True)
class RowEvent:
    """A row's new token; ``finish`` says why the row ended with it ("stop": end token, "length": its limit);
    ``logprob`` where the row asked for logprobs."""

    row: int
    token: int
    finish: str | None = None
    logprob: TokenLogprob | None = None


class _HostCopy:
    """A device tensor on its way to the host: copied without blocking, waited for when read."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def tolist(self) -> list[Any]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class GreedyBatch:
    """A batch's decode, one step per iteration: ``for events in batch: ...``; greedy unless ``sampling`` gives a
    row other parameters (one :class:`SamplingParams` or None per row).

    ``cancel(row, reason)`` ends a row at the next step (the server's stop strings and lost clients);
    the batch ends when every row has. With ``keep_logits`` each row's raw float32 logits are kept
    (validation and tests; a server does not need them).
    """

    def __init__(self, llm: torch.nn.Module, prefixes: Sequence[LlmPrefix], max_new_tokens: Sequence[int], *,
                 keep_logits: bool = False, sync: StepSync | None = None, pad_token_id: int = 0,
                 factory: BatchFactory | None = None,
                 sampling: Sequence[SamplingParams | None] | None = None) -> None:
        if len(max_new_tokens) != len(prefixes):
            raise ValueError(f"{len(prefixes)} prefixes but {len(max_new_tokens)} token limits")
        if any(n < 1 for n in max_new_tokens):
            raise ValueError(f"every max_new_tokens must be at least 1, got {list(max_new_tokens)}")
        self.llm = llm
        self.prefixes = list(prefixes)
        self.limits = list(max_new_tokens)
        self.keep_logits = keep_logits
        self.sync = sync
        self.pad = pad_token_id
        self.factory = factory
        if sampling is not None and len(sampling) != len(prefixes):
            raise ValueError(f"{len(prefixes)} prefixes but {len(sampling)} sampling parameter sets")
        self.sampling = list(sampling) if needs_sampler(sampling) else None  # type: ignore[arg-type]
        self.ignore_eos = [bool(p and p.ignore_eos) for p in sampling or [None] * len(prefixes)]
        self.tokens: list[list[int]] = [[] for _ in prefixes]
        self.logits: list[list[torch.Tensor]] = [[] for _ in prefixes]
        self.finish: list[str | None] = [None] * len(prefixes)
        self._cancelled: dict[int, str] = {}
        self.steps = 0

    def cancel(self, row: int, reason: str) -> None:
        """End ``row`` before its next token (safe to call from another thread)."""
        self._cancelled.setdefault(row, reason)

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def _room_after_this_step(self) -> bool:
        """Whether a row could still want a token after the one being read (its limit allows one more)."""
        return any(f is None and row not in self._cancelled and len(self.tokens[row]) + 1 < self.limits[row]
                   for row, f in enumerate(self.finish))

    @torch.no_grad()
    def __iter__(self) -> Iterator[list[RowEvent]]:
        if self.factory is not None:
            state = self.factory(self.prefixes, max(self.limits))
        else:
            state = make_batch(self.llm, self.prefixes)
        logits = state.prefill()
        sampler = None
        if self.sampling is not None:
            sampler = BatchSampler(self.sampling, [p.eos for p in self.prefixes], logits.device)
        # Without followers to tell (no tensor parallelism), the next step is fed this step's tokens straight
        # from the device and launched before they are read back: the GPU runs step t+1 while the host turns
        # step t into events. Finished rows are then fed their own pick instead of a pad token (their outputs
        # are dropped either way; rows do not see each other), and a batch ended by an end token or a cancel
        # has run one step too many.
        ahead = self.sync is None
        while True:
            logprobs: list[TokenLogprob | None] | None = None
            if sampler is None:
                picked = logits.argmax(-1)
            else:
                picked, logprobs = sampler.step(logits)
            host_tokens = _HostCopy(picked)
            if self.keep_logits:
                host_logits = logits.float().cpu()
            upcoming = state.step(picked) if ahead and self._room_after_this_step() else None
            host = host_tokens.tolist()
            events: list[RowEvent] = []
            for row, token in enumerate(host):
                if self.finish[row] is not None:
                    continue
                if row in self._cancelled:
                    self.finish[row] = self._cancelled[row]
                    continue
                self.tokens[row].append(token)
                if self.keep_logits:
                    self.logits[row].append(host_logits[row])
                if token in self.prefixes[row].eos and not self.ignore_eos[row]:
                    self.finish[row] = "stop"
                elif len(self.tokens[row]) >= self.limits[row]:
                    self.finish[row] = "length"
                events.append(RowEvent(row, token, self.finish[row], logprobs[row] if logprobs else None))
            self.steps += 1
            yield events
            for row, reason in list(self._cancelled.items()):  # cancelled while the events were handled
                if self.finish[row] is None:
                    self.finish[row] = reason
            go_on = not self.done
            if ahead:
                if not go_on:
                    return
                assert upcoming is not None, "a row went on past its token limit"
                logits = upcoming
                continue
            feed = torch.tensor([t if f is None else self.pad for t, f in zip(host, self.finish)], dtype=torch.long)
            if self.sync is not None:
                self.sync.step(feed, go_on)
            if not go_on:
                return
            logits = state.step(feed.to(picked.device))

    def results(self) -> list[GenResult]:
        """Each row's tokens (and logits, if kept) once the batch is done."""
        vocab = 0
        out = []
        for tokens, logits in zip(self.tokens, self.logits):
            if logits:
                vocab = logits[0].shape[-1]
            stacked = torch.stack(logits) if logits else torch.empty((0, vocab))
            out.append(GenResult(list(tokens), stacked))
        return out


def greedy_batch(llm: torch.nn.Module, prefixes: Sequence[LlmPrefix], max_new_tokens: Sequence[int] | int, *,
                 keep_logits: bool = True, factory: BatchFactory | None = None,
                 sampling: Sequence[SamplingParams | None] | None = None) -> list[GenResult]:
    """Decode a batch to the end (greedy unless ``sampling`` says otherwise); one :class:`GenResult` per prefix."""
    limits = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    batch = GreedyBatch(llm, prefixes, limits, keep_logits=keep_logits, factory=factory, sampling=sampling)
    for _ in batch:
        pass
    return batch.results()


@torch.no_grad()
def follow_batch(llm: torch.nn.Module, prefixes: Sequence[LlmPrefix], source: StepSource) -> int:
    """A follower rank's side of a batch: the same forwards as rank 0, fed rank 0's tokens. Returns the steps run."""
    state = make_batch(llm, prefixes)
    state.prefill()
    device = model_device(llm)
    steps = 1
    while True:
        tokens, go_on = source.step(state.size)
        if not go_on:
            return steps
        state.step(tokens.to(device))
        steps += 1
