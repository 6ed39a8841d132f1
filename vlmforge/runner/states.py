"""A batch's LLM state, one class per kind of prefix: the prefill, one step per token, and in-flight joins.

- ``decoder`` (LLaVA, BLIP-2 OPT): prefixes are LEFT-padded, with an attention mask that hides the
  padding and position ids that start at 0 on each row's first real position, so each row sees
  exactly what it would see alone; every step appends one token per row. M-RoPE prefixes (Qwen2-VL) bring their
  own [3, 1, L] positions, left-padded alike; each row's steps go on from its own largest position + 1.
  Prefixes with ``token_type_ids`` (Gemma3's image blocks, attended bidirectionally) pass them to the prefill,
  left-padded the same way.
- ``seq2seq`` (BLIP-2 T5): the encoder inputs are right-padded under their attention mask; all
  decoders start from the same token, so the decoder side needs no padding.
- ``cross`` (Nougat): encoder states of equal length are stacked (padded, with a mask, otherwise).

In-flight batching (``room``/``join_many``/``retire``): rows are slots; ``size`` counts every row ever placed, retired
ones included (fed a pad token, outputs ignored). The requests joining at one step boundary are prefilled together:
one left-padded forward (batch n, its own cache, position ids from 0 on each row's first real position, as alone);
each one's keys and values (its own columns of that forward) are left-padded to the batch's T columns and written
into a retired row or appended as a new one; a prefix longer than T first gives every row (length - T) masked columns
on the left. Retiring a row drops the left columns no live row needs,
so a long joiner's padding does not cost every later step attention over it. Encoder-decoder (``seq2seq``) and
cross-attention (``cross``) states take no joins: their encoder side is shared by the whole batch, so a running batch
of them only takes requests at its end. Neither do decoder prefixes with cross-attention states (mllama: their
projected states are passed to the prefill, right-padded under a per-position visibility, and live in the cache's
cross-attention layers, whose rows a joiner would have to re-pad), nor the static GPU path for them. The static GPU
path (:mod:`vlmforge.runner.static`) has its own layout.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from vlmforge.modeling.generation import LlmPrefix, cache_kwarg, cache_of


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

    # In-flight batching (the module docstring has the rules). Rows are slots: ``size`` counts
    # every row ever placed, retired ones included (they are fed a pad token, their outputs ignored).

    def room(self, length: int, max_new_tokens: int, claimed: int = 0) -> int | None:
        """The row a prefix of ``length`` positions, generating up to ``max_new_tokens`` tokens, can join at now, after
        ``claimed`` joiners of this boundary took theirs (rows are handed out in order: the retired ones lowest first,
        then ``size``, ``size + 1``...); None when it cannot join this batch now (the caller keeps it for later). The
        caller bounds the live rows; the state only says what its layout allows.
        Default: None (encoder-decoder and cross-attention batches take no joins)."""
        return None

    def join(self, row: int, prefix: LlmPrefix) -> torch.Tensor:
        """One joiner: :meth:`join_many` of ``[(row, prefix)]``."""
        return self.join_many([(row, prefix)])[0]

    def join_many(self, joins: Sequence[tuple[int, LlmPrefix]]) -> list[torch.Tensor]:
        """Place each ``prefix`` at its ``row`` (what ``room`` returned with ``claimed`` = its index; ``size`` grows on
        an append), prefill them together, and return each one's logits [vocab] of its first new token; the other
        rows' state is untouched. The next ``step`` takes a token for the new rows too."""
        raise NotImplementedError(f"{type(self).__name__} takes no joins")

    def retire(self, row: int) -> None:
        """``row`` finished: a later ``join`` may reuse it; its outputs are ignored until then."""

    def kv_positions(self) -> int | None:
        """KV cache positions the state holds now (rows x columns), where it knows; None: the caller estimates."""
        return None


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


def _next_row(free: list[int], size: int, claimed: int) -> int:
    """The row of the joiner after ``claimed`` others of one boundary: the free (retired) rows in order, then
    appended ones."""
    return free[claimed] if claimed < len(free) else size + claimed - len(free)


def _check_rows(rows: Sequence[int], retired: set[int], size: int, capacity: int | None) -> None:
    """ValueError unless ``rows`` are distinct free rows handed out as :meth:`PrefixBatch.room` hands them: each a
    retired row or the next appended one (below ``capacity`` where the layout has one)."""
    free = set(retired)
    for row in rows:
        if row in free:
            free.discard(row)
        elif row == size and (capacity is None or row < capacity):
            size += 1
        else:
            raise ValueError(f"row {row} is not free: join the rows room() returned (retired rows "
                             f"{sorted(retired)}, next new row {size})")


def _prefill_joiners(llm: torch.nn.Module, prefixes: Sequence[LlmPrefix]
                     ) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """One left-padded forward of a boundary's joiners (a dynamic cache of its own): each one's first-token logits
    [n, vocab], position ids [n, L] (counted from each row's first real column; M-RoPE prefixes are run with their own
    3D positions) and the cache's layers (row i's own keys and values are its last ``length`` columns), what each sees
    alone but for float rounding."""
    embeds, mask, _ = _stack(prefixes, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    mrope = _mrope_positions(prefixes, mask)
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions if mrope is None else mrope,
              use_cache=True, **_prefill_kwargs(prefixes, mask), **_last_logits_only(llm))
    return out.logits[:, -1], positions, list(cache_of(out).layers)


def _mrope_positions(prefixes: Sequence[LlmPrefix], mask: torch.Tensor) -> torch.Tensor | None:
    """M-RoPE prefixes' position ids left-padded to [3, B, L] like ``mask`` (0 under the padding); None when the
    prefixes carry none (positions then count from each row's first real column)."""
    if all(p.positions is None for p in prefixes):
        return None
    if any(p.positions is None for p in prefixes):
        raise ValueError("one batch mixes prefixes with and without M-RoPE positions")
    positions = torch.zeros((3, *mask.shape), dtype=torch.long, device=mask.device)
    for row, prefix in enumerate(prefixes):
        assert prefix.positions is not None
        positions[:, row, mask.shape[1] - prefix.length:] = prefix.positions[:, 0].to(mask.device)
    return positions


def _prefill_kwargs(prefixes: Sequence[LlmPrefix], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's extra prefill inputs: every row's ``token_type_ids`` left-padded like its embeddings (0 on the
    padding), where any prefix has them (Gemma3's bidirectional image blocks); the cross-attention states and their
    visibility (mllama), see :func:`_cross_inputs`; none otherwise."""
    extra = _cross_inputs(prefixes, mask)
    if all(p.token_type_ids is None for p in prefixes):
        return extra
    types = torch.zeros_like(mask)
    for row, prefix in enumerate(prefixes):
        if prefix.token_type_ids is not None:
            types[row, types.shape[1] - prefix.length:] = prefix.token_type_ids[0].to(types.dtype)
    return {"token_type_ids": types, **extra}


def _cross_inputs(prefixes: Sequence[LlmPrefix], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-attention prefixes (mllama): ``cross_attention_states`` [B, S, hidden], each row's states right-padded
    with zeros to the batch's most, and ``cross_attention_mask`` [B, L, S], each row's visibility left-padded like its
    embeddings and 0 on the padded states and positions (a padded row sees nothing, as a text-only row does)."""
    if all(p.cross_states is None for p in prefixes):
        return {}
    reference = next(p.cross_states for p in prefixes if p.cross_states is not None)
    assert reference is not None
    longest = max(0 if p.cross_states is None else int(p.cross_states.shape[1]) for p in prefixes)
    states = reference.new_zeros((len(prefixes), longest, reference.shape[-1]))
    seen = torch.zeros((*mask.shape, longest), dtype=torch.long, device=mask.device)
    for row, prefix in enumerate(prefixes):
        if prefix.cross_states is None or prefix.cross_mask is None:
            continue
        count = int(prefix.cross_states.shape[1])
        states[row, :count] = prefix.cross_states[0].to(states.device, states.dtype)
        seen[row, mask.shape[1] - prefix.length:, :count] = prefix.cross_mask[0].to(seen.device, seen.dtype)
    return {"cross_attention_states": states, "cross_attention_mask": seen}


def prefill_inputs(prefixes: Sequence[LlmPrefix]) -> dict[str, torch.Tensor]:
    """The forward arguments of a decoder-only LLM's prefill of ``prefixes``, left-padded as the runner batches them:
    ``inputs_embeds``, ``attention_mask``, ``position_ids`` (M-RoPE prefixes' own 3D positions) and the family's extra
    inputs (Gemma3's ``token_type_ids``, mllama's cross-attention states): what :class:`DecoderOnlyBatch` prefills, and
what calibration feeds the LLM."""
    embeds, mask, _ = _stack(prefixes, left=True)
    mrope = _mrope_positions(prefixes, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if mrope is None else mrope
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
            **_prefill_kwargs(prefixes, mask)}


class DecoderOnlyBatch(PrefixBatch):
    """Left-padded prefixes of a ``*ForCausalLM``, a dynamic KV cache."""

    def __init__(self, llm: torch.nn.Module, prefixes: Sequence[LlmPrefix]) -> None:
        self.llm = llm
        self.size = len(prefixes)
        self.extra = prefill_inputs(prefixes)  # the prefill's own inputs are popped off: the rest are its extras
        self.embeds, self.mask = self.extra.pop("inputs_embeds"), self.extra.pop("attention_mask")
        self.positions = self.extra.pop("position_ids")
        cross = self.extra.get("cross_attention_mask")
        # cross-attention LLMs: every step sees what each row's last prompt position sees
        self.step_extra = {} if cross is None else {"cross_attention_mask": cross[:, -1:]}
        self.mrope = [p.next_position() for p in prefixes] if self.positions.dim() == 3 else None
        self.cache_kwarg = cache_kwarg(llm)
        self.cache: Any = None
        self.retired = set()

    def prefill(self) -> torch.Tensor:
        out = self.llm(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                       **self.extra, **_last_logits_only(self.llm))
        self.cache = cache_of(out)
        if self.mrope is None:
            self.next_position = self.positions[:, -1:] + 1
        else:  # M-RoPE: each row goes on from its own largest position, the same on all three axes
            self.next_position = torch.tensor(self.mrope, device=self.mask.device)[:, None]
        self.embeds = None  # type: ignore[assignment]  # not needed any more
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        out = self.llm(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position,
                       use_cache=True, **{self.cache_kwarg: self.cache}, **self.step_extra)
        self.cache = cache_of(out)
        self.next_position = self.next_position + 1
        return out.logits[:, -1]

    def kv_positions(self) -> int | None:
        return self.size * int(self.mask.shape[1]) if self.cache is not None else None

    # In-flight batching: the cache is [rows, heads, T, dim] per layer, every row left-padded to T columns.

    retired: set[int]

    def _layers(self) -> list[Any] | None:
        """The cache's layers if each is a plain growing one (keys/values [B, heads, T, dim]); None otherwise
        (sliding windows keep their own offsets: such a batch takes no joins)."""
        layers = getattr(self.cache, "layers", None)
        if not layers or any(getattr(layer, "is_sliding", True) or getattr(layer, "keys", None) is None
                             for layer in layers):
            return None
        return list(layers)

    def room(self, length: int, max_new_tokens: int, claimed: int = 0) -> int | None:
        if self.cache is None or self._layers() is None or self.step_extra:
            return None  # cross-attention batches (mllama) take requests at batch boundaries only: see the docstring
        return _next_row(sorted(self.retired), self.size, claimed)

    def _edit(self, edit: Any) -> None:
        for layer in self._layers() or []:
            layer.keys, layer.values = edit(layer.keys), edit(layer.values)

    @torch.no_grad()
    def join_many(self, joins: Sequence[tuple[int, LlmPrefix]]) -> list[torch.Tensor]:
        if not joins:
            return []
        for _, prefix in joins:
            if prefix.kind != "decoder":
                raise ValueError(f"a {prefix.kind} prefix cannot join a decoder batch")
        _check_rows([row for row, _ in joins], self.retired, self.size, None)
        logits, positions, own = _prefill_joiners(self.llm, [prefix for _, prefix in joins])
        for index, (row, prefix) in enumerate(joins):
            mine = slice(index, index + 1)  # its own row, its own (last) columns
            columns = slice(-prefix.length, None)
            position = (positions[mine, -1:] + 1 if prefix.positions is None  # M-RoPE: the prefix's own next one
                        else positions.new_full((1, 1), prefix.next_position()))
            self._place(row, prefix, position,
                        [(layer.keys[mine, :, columns], layer.values[mine, :, columns]) for layer in own])
        return list(logits)

    def _place(self, row: int, prefix: LlmPrefix, position: torch.Tensor,
               own: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write one joiner's keys and values ([1, heads, length, dim] per layer), mask and next position at ``row``."""
        columns, length = self.mask.shape[1], prefix.length
        if length > columns:  # everyone gains masked columns on the left
            grow = length - columns
            self.mask = torch.cat([self.mask.new_zeros((self.size, grow)), self.mask], dim=1)
            self._edit(lambda t: torch.nn.functional.pad(t, (0, 0, grow, 0)))
            columns = length
        pad = columns - length
        mask = torch.cat([self.mask.new_zeros((1, pad)), prefix.mask.to(self.mask.device, self.mask.dtype)], dim=1)
        for layer, mine in zip(self._layers() or [], own, strict=True):
            keys, values = (torch.nn.functional.pad(t, (0, 0, pad, 0)).to(layer.keys.dtype) for t in mine)
            if row == self.size:
                layer.keys, layer.values = torch.cat([layer.keys, keys]), torch.cat([layer.values, values])
            else:
                layer.keys[row], layer.values[row] = keys[0], values[0]
        if row == self.size:
            self.mask = torch.cat([self.mask, mask])
            self.next_position = torch.cat([self.next_position, position.to(self.next_position.dtype)])
            self.size += 1
        else:
            self.mask[row] = mask[0]
            self.next_position[row] = position[0]
            self.retired.discard(row)

    @torch.no_grad()
    def retire(self, row: int) -> None:
        """Marks ``row`` free and drops the left columns no live row needs (a joiner's left padding outlives the
        rows that needed it otherwise, and every step would attend over it)."""
        self.retired.add(row)
        live = [r for r in range(self.size) if r not in self.retired]
        if not live or self._layers() is None or self.step_extra:  # cross-attention layers hold states, not columns
            return
        first = int((self.mask[live] != 0).int().argmax(dim=1).min())
        if first > 0:  # every row has its last column (a step or a prefix's end): none is left with nothing
            self.mask = self.mask[:, first:]
            self._edit(lambda t: t[:, :, first:])


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
