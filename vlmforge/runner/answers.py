"""A chat completion's choices as they are generated: ``n`` requests in the scheduler, one answer in OpenAI's shape.

A request with ``n`` choices is ``n`` scheduler requests (each with its own generator, :mod:`vlmforge.runner.sampling`),
whose events arrive on one queue tagged with their choice's index. :func:`answer_pieces` turns them into text pieces
(stop strings applied per choice) with their tokens' logprobs, each choice's finish, and one final :class:`Outcome`;
:func:`complete` builds the whole response, :func:`stream` its server-sent events (OpenAI's chunks: one choice per
chunk, its ``index``; logprobs on the chunk that carries their tokens' text).

Logprob entries follow OpenAI's ``choices[i].logprobs.content``: ``{token, logprob, bytes, top_logprobs}``, where
``token`` is the token decoded alone (special tokens included) and ``bytes`` its UTF-8 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from vlmforge.runner.openai_api import ApiError, TextStream, chunk, usage
from vlmforge.runner.sampling import TokenLogprob

LOGPROB_FLOOR = -9999.0
"""What a logprob of -inf is sent as (JSON has no infinity; OpenAI sends -9999.0 likewise)."""

Observe = Callable[[int, float | None, int], None]
PromptTokens = Callable[[], int]
"""The request's prompt positions, read when usage is written (after the scheduler has made its prefix)."""
"""``observe(status, first_token_at, tokens)``: the server's metrics for the whole request, called once."""


@dataclass
class Choice:
    """One choice's state: its scheduler request, its text so far and its logprobs."""

    index: int
    gen: Any
    """Its :class:`~vlmforge.runner.scheduler.GenRequest`."""
    text: TextStream
    logprobs: list[dict[str, Any]] | None = None
    """Every token's entry (non-streamed responses), or None where none were asked for."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    """Entries whose text has not been sent yet (streamed responses)."""
    tokens: int = 0
    finish: str | None = None


@dataclass(frozen=True)
class Piece:
    """New text of choice ``index`` (may be empty) with the logprob entries of the tokens it came from, or the
    choice's end (``finish`` set)."""

    index: int
    text: str
    logprobs: list[dict[str, Any]] | None
    finish: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How the request ended: every choice finished (``failed`` None), or the failure a scheduler request reported."""

    failed: Any
    tokens: int
    """Generated tokens over all choices."""


def logprob_entry(tokenizer: Any, token: int, logprob: TokenLogprob) -> dict[str, Any]:
    def one(token_id: int, value: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": max(value, LOGPROB_FLOOR), "bytes": list(text.encode("utf-8"))}

    return {**one(token, logprob.logprob), "top_logprobs": [one(t, v) for t, v in logprob.top]}


def _finish_reason(text: TextStream, reason: str) -> str:
    return "stop" if text.stopped else ("length" if reason == "length" else "stop")


async def answer_pieces(choices: list[Choice], events: asyncio.Queue, tokenizer: Any,
                        observe: Observe) -> AsyncIterator[Piece | Outcome]:
    """The choices' pieces as they come, then the :class:`Outcome`; metrics observed once. Closed before the outcome
    (the client went away) or after a failure, it cancels the choices still running."""
    from vlmforge.runner.scheduler import Failed, Finished, Token

    first, done, running = None, False, len(choices)
    try:
        while running:
            index, event = await events.get()
            choice = choices[index]
            if isinstance(event, Token):
                if choice.text.stopped:
                    continue
                first = first or time.perf_counter()
                choice.tokens += 1
                entries = None
                if event.logprob is not None:
                    entries = [logprob_entry(tokenizer, event.token, event.logprob)]
                    if choice.logprobs is not None:
                        choice.logprobs.extend(entries)
                delta = choice.text.push(event.token)
                if choice.text.stopped:
                    choice.gen.cancel("stop")
                yield Piece(index, delta, entries)
            elif isinstance(event, Finished):
                if choice.finish is not None:
                    continue
                choice.finish = _finish_reason(choice.text, event.reason)
                running -= 1
                yield Piece(index, choice.text.flush(), None, choice.finish)
            elif isinstance(event, Failed):
                done = True
                for other in choices:
                    other.gen.cancel("cancelled")
                observe(event.status, first, sum(c.tokens for c in choices))
                yield Outcome(event, sum(c.tokens for c in choices))
                return
        done = True
        observe(200, first, sum(c.tokens for c in choices))
        yield Outcome(None, sum(c.tokens for c in choices))
    finally:
        if not done:  # the client went away
            for choice in choices:
                choice.gen.cancel("cancelled")
            observe(499, first, sum(c.tokens for c in choices))


def _logprobs_field(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}


async def complete(choices: list[Choice], events: asyncio.Queue, tokenizer: Any, observe: Observe, cid: str,
                   model: str, prompt_tokens: PromptTokens) -> tuple[int, dict[str, Any]]:
    """The whole response (HTTP status, body) once every choice is done."""
    async with contextlib.aclosing(answer_pieces(choices, events, tokenizer, observe)) as pieces:
        async for piece in pieces:
            if isinstance(piece, Outcome):
                if piece.failed is not None:
                    return piece.failed.status, ApiError(piece.failed.status, piece.failed.message).body()
                return 200, {
                    "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                                 "logprobs": _logprobs_field(c.logprobs), "finish_reason": c.finish}
                                for c in choices],
                    "usage": usage(prompt_tokens(), piece.tokens),
                }
    raise AssertionError("the request ended without an outcome")


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream(choices: list[Choice], events: asyncio.Queue, tokenizer: Any, observe: Observe, cid: str,
                 model: str, prompt_tokens: PromptTokens, include_usage: bool) -> AsyncIterator[bytes]:
    """The response as server-sent events: each choice's role chunk, its text chunks, its finish; usage; [DONE]."""
    created = int(time.time())

    def one(index: int, delta: dict[str, Any], finish: str | None = None,
            logprobs: list[dict[str, Any]] | None = None) -> bytes:
        body = chunk(cid, model, created, delta, finish)
        body["choices"][0]["index"] = index
        body["choices"][0]["logprobs"] = _logprobs_field(logprobs)
        return _sse(body)

    for choice in choices:
        yield one(choice.index, {"role": "assistant", "content": ""})
    async with contextlib.aclosing(answer_pieces(choices, events, tokenizer, observe)) as pieces:
        async for piece in pieces:
            if isinstance(piece, Piece):
                choice = choices[piece.index]
                choice.pending.extend(piece.logprobs or [])
                if piece.text:
                    yield one(piece.index, {"content": piece.text},
                              logprobs=choice.pending if choice.logprobs is not None else None)
                    choice.pending = []
                if piece.finish is not None:
                    yield one(piece.index, {}, piece.finish,
                              logprobs=choice.pending if choice.logprobs is not None and choice.pending else None)
                    choice.pending = []
            elif piece.failed is not None:
                yield _sse(ApiError(piece.failed.status, piece.failed.message).body())
            else:
                if include_usage:
                    yield _sse(chunk(cid, model, created, {}, usage_=usage(prompt_tokens(), piece.tokens),
                                     choices=False))
                yield b"data: [DONE]\n\n"
