"""A decoding batch's requests and their rows: what :class:`~vlmforge.runner.batching.GreedyBatch` keeps per request.

Requests are numbered in admission order (the batch's first requests 0..n-1, requests that join a running batch
n, n+1, ...): that number is :attr:`RowEvent.row`, what ``cancel`` takes and what ``tokens``, ``finish`` and
``results()`` are indexed by. Each maps to the state row it decodes in; a finished request's row is retired and may
be reused by a later one, which consumers never see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from vlmforge.modeling.generation import LlmPrefix
    from vlmforge.runner.sampling import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class RowEvent:
    """A request's new token; ``row`` is the request's number in the batch (admission order); ``finish`` says why it
    ended with this token ("stop": end token, "length": its limit); ``logprob`` where it asked for logprobs."""

    row: int
    token: int
    finish: str | None = None
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class PendingPrefix:
    """Stands for a joiner's prefix until it is made (tensor parallelism: after the step message); what the metrics
    hook reads of a prefix."""

    length: int
    eos: frozenset[int] = frozenset()


class Sequences:
    """Per request: prefix, token limit, sampling, tokens (and logits), finish reason, state row."""

    def __init__(self, prefixes: Sequence[LlmPrefix], limits: Sequence[int],
                 sampling: Sequence[SamplingParams | None] | None) -> None:
        self.prefixes: list[LlmPrefix | PendingPrefix] = []
        self.limits: list[int] = []
        self.sampling: list[SamplingParams | None] = []
        self.tokens: list[list[int]] = []
        self.logits: list[list[torch.Tensor]] = []
        self.finish: list[str | None] = []
        self.row_of: list[int | None] = []
        """Each request's state row (None until placed)."""
        self.at_row: list[int | None] = []
        """The request each state row decodes (None: retired, free for a joiner)."""
        for index, prefix in enumerate(prefixes):
            self.place(self.add(prefix, limits[index], sampling[index] if sampling else None), index)

    def add(self, prefix: LlmPrefix | PendingPrefix, limit: int, sampling: SamplingParams | None) -> int:
        """A new request (not placed yet); its number."""
        if limit < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {limit}")
        self.prefixes.append(prefix)
        self.limits.append(limit)
        self.sampling.append(sampling)
        self.tokens.append([])
        self.logits.append([])
        self.finish.append(None)
        self.row_of.append(None)
        return len(self.prefixes) - 1

    def place(self, seq: int, row: int) -> None:
        if row == len(self.at_row):
            self.at_row.append(seq)
        elif self.at_row[row] is None:
            self.at_row[row] = seq
        else:
            raise ValueError(f"row {row} still decodes request {self.at_row[row]}")
        self.row_of[seq] = row

    @property
    def live(self) -> int:
        """Requests not finished (placed or waiting to be)."""
        return sum(f is None for f in self.finish)

    def ignores_eos(self, seq: int) -> bool:
        params = self.sampling[seq]
        return bool(params and params.ignore_eos)

    def wants_more(self, cancelled: dict[int, str]) -> bool:
        """Whether a placed request could still want a token after the one being read (its limit allows one more)."""
        return any(f is None and seq not in cancelled and self.row_of[seq] is not None
                   and len(self.tokens[seq]) + 1 < self.limits[seq] for seq, f in enumerate(self.finish))

    def record(self, row: int, token: int, cancelled: dict[int, str], logits: torch.Tensor | None,
               logprob: TokenLogprob | None) -> RowEvent | None:
        """Row ``row``'s new token: the event of its request, None for a retired row or an ended request."""
        seq = self.at_row[row] if row < len(self.at_row) else None
        if seq is None or self.finish[seq] is not None:
            return None
        if seq in cancelled:
            self.finish[seq] = cancelled[seq]
            return None
        self.tokens[seq].append(token)
        if logits is not None:
            self.logits[seq].append(logits)
        if token in self.prefixes[seq].eos and not self.ignores_eos(seq):
            self.finish[seq] = "stop"
        elif len(self.tokens[seq]) >= self.limits[seq]:
            self.finish[seq] = "length"
        return RowEvent(seq, token, self.finish[seq], logprob)

    def to_retire(self) -> list[int]:
        """The rows whose requests have ended, unmapped (lowest first): the state retires them."""
        rows = [row for row, seq in enumerate(self.at_row) if seq is not None and self.finish[seq] is not None]
        for row in rows:
            self.at_row[row] = None
        return rows

    def feed(self, host: Sequence[int], pad: int) -> list[int]:
        """The tokens fed next, one per state row: a live request's own token, the pad token elsewhere."""
        out = []
        for row, token in enumerate(host):
            seq = self.at_row[row]
            out.append(token if seq is not None and self.finish[seq] is None else pad)
        return out
