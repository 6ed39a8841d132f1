"""What a family feeds its LLM (:class:`LlmPrefix`), greedy decoding from it, and comparing generations.

The unbatched KV-cached greedy loop here is what validation compares; the runner's batched loop
(:mod:`vlmforge.runner.batching`) starts from the same prefixes. Results come back as float32 on the CPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from vlmforge.modeling.devices import model_device, model_dtype


@dataclass(frozen=True)
class LlmPrefix:
    """What a family feeds its LLM for one request, before the first generated token.

    Three shapes cover every family: ``decoder`` (decoder-only LLM: the prompt's embeddings with the
    image rows spliced in), ``seq2seq`` (T5: the encoder's input embeddings; the decoder starts from
    ``start``) and ``cross`` (Nougat: encoder hidden states a decoder cross-attends to, from ``start``).
    The unbatched loops and the runner's batched loop (:mod:`vlmforge.runner.batching`) both start here.
    """

    kind: Literal["decoder", "seq2seq", "cross"]
    embeds: torch.Tensor
    """[1, L, hidden] on the LLM's device, in its dtype."""
    mask: torch.Tensor
    """[1, L] attention mask (all ones: one request has no padding)."""
    eos: frozenset[int]
    start: int | None = None
    """Decoder start token (seq2seq and cross)."""
    positions: torch.Tensor | None = None
    """decoder only, M-RoPE LLMs (Qwen2-VL): the prompt's position ids [3, 1, L] (time, height, width; image rows
    take their grid's); each generated token then takes :meth:`next_position` + its step on all three axes. None:
    positions 0..L-1 (every other family)."""

    def next_position(self) -> int:
        """The first generated token's position (M-RoPE: the prompt's largest + 1 on every axis; else L)."""
        return self.length if self.positions is None else int(self.positions.max()) + 1

    token_type_ids: torch.Tensor | None = None
    """[1, L], 1 on the rows the LLM attends to bidirectionally within their run during the prefill (Gemma3's image
    tokens; transformers' name): the prefill passes them to the LLM, which builds its mask from them. None: causal."""

    cross_states: torch.Tensor | None = None
    """decoder only, cross-attention LLMs (mllama): [1, S, hidden] states its cross-attention layers attend to (the
    projected tiles of the prompt's images); the prefill passes them as ``cross_attention_states`` and the LLM's cache
    keeps their keys and values. None: no cross-attention input."""
    cross_mask: torch.Tensor | None = None
    """With ``cross_states``: [1, L, S], 1 where a prompt position attends a state (``cross_attention_mask``); every
    generated token sees what the prompt's last position sees."""

    def prefill_kwargs(self) -> dict[str, torch.Tensor]:
        """Extra keyword arguments of the LLM's prefill forward for this prefix alone."""
        extra = {} if self.token_type_ids is None else {"token_type_ids": self.token_type_ids}
        if self.cross_states is not None:
            assert self.cross_mask is not None, "cross_states come with their cross_mask"
            extra.update(cross_attention_states=self.cross_states, cross_attention_mask=self.cross_mask)
        return extra

    def step_kwargs(self) -> dict[str, torch.Tensor]:
        """Extra keyword arguments of each decode step's forward (cross-attention LLMs: the last row's visibility)."""
        return {} if self.cross_mask is None else {"cross_attention_mask": self.cross_mask[:, -1:]}

    @property
    def length(self) -> int:
        """Prompt positions (text tokens and image features): the request's prompt tokens."""
        return int(self.embeds.shape[1])


def eos_ids(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    """End-of-sequence ids as a set (a config may give one id, a list or none)."""
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(e) for e in eos_token_id)


class GenResult(NamedTuple):
    """Greedy output: unpacks as ``tokens, logits = family.generate(...)``."""

    tokens: list[int]
    """Newly generated tokens only (prompt excluded), the end-of-sequence token included if produced."""
    logits: torch.Tensor
    """[steps, vocab] float32 on the CPU: raw scores (before any logits processor)."""


@dataclass(frozen=True)
class GenComparison:
    """How a generation agrees with the reference, in the terms of the spec's validation settings."""

    token_agreement: float
    """Fraction of positions (over the longer of the two) whose tokens are equal."""
    exact: bool
    first_step_logit_error: float
    """Largest absolute difference of the first step's logits."""
    prefix_match: int
    """Number of leading tokens that agree."""
    prefix_logit_error: float
    """Largest absolute logit difference over the agreeing prefix and the first divergent step."""


@dataclass(frozen=True)
class TokenComparison:
    """How generated tokens agree with the reference's (for engines that return no logits)."""

    token_agreement: float
    """Fraction of positions (over the longer of the two) whose tokens are equal."""
    exact: bool
    prefix_match: int
    """Number of leading tokens that agree."""


def compare_tokens(ref: Sequence[int], got: Sequence[int]) -> TokenComparison:
    """Position-by-position token agreement of ``got`` against ``ref``."""
    ref, got = list(ref), list(got)
    n = min(len(ref), len(got))
    total = max(len(ref), len(got), 1)
    agree = sum(int(a == b) for a, b in zip(ref[:n], got[:n], strict=True))
    prefix = next((i for i in range(n) if ref[i] != got[i]), n)
    return TokenComparison(agree / total, ref == got, prefix)


def compare_generations(ref: GenResult, got: GenResult) -> GenComparison:
    """Position-by-position token agreement and logit errors of ``got`` against ``ref``."""
    tokens = compare_tokens(ref.tokens, got.tokens)
    n = min(len(ref.tokens), len(got.tokens))
    prefix = tokens.prefix_match
    k = min(prefix + 1, n)
    ref_logits, got_logits = ref.logits.float().cpu(), got.logits.float().cpu()
    prefix_err = float((ref_logits[:k] - got_logits[:k]).abs().max()) if k else float("inf")
    first_err = float((ref_logits[0] - got_logits[0]).abs().max()) if n else float("inf")
    return GenComparison(tokens.token_agreement, tokens.exact, first_err, prefix, prefix_err)


def _pick(step_logits: torch.Tensor, tokens: list[int], logits: list[torch.Tensor]) -> torch.Tensor:
    """Greedy choice of a [1, vocab] step; records the token and the float32 logits."""
    step_logits = step_logits.float()
    logits.append(step_logits[0])
    nxt = step_logits.argmax(-1)
    tokens.append(int(nxt))
    return nxt


def _result(tokens: list[int], logits: list[torch.Tensor]) -> GenResult:
    return GenResult(tokens, torch.stack(logits).to("cpu", torch.float32))


def cross_attention_prefix(llm: Any, features: torch.Tensor, what: str) -> LlmPrefix:
    """A decoder from its start token cross-attending to one image's states ``features`` [1, N, hidden], all attended:
    what the cross-attention families (Nougat, Pix2Struct) feed their decoder. The ids come from the generation
    config, else the config (Pix2StructTextModel has no generation config). ValueError naming ``what`` without a
    start token."""
    sources = (getattr(llm, "generation_config", None), llm.config)
    ids = {key: next((v for v in (getattr(s, key, None) for s in sources) if v is not None), None)
           for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id")}
    start = ids["decoder_start_token_id"] if ids["decoder_start_token_id"] is not None else ids["bos_token_id"]
    if start is None:
        raise ValueError(f"the {what} decoder has no decoder_start_token_id (nor bos_token_id) to start from")
    states = features.to(model_device(llm), model_dtype(llm))
    mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
    return LlmPrefix("cross", states, mask, eos_ids(ids["eos_token_id"]), start=start)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def greedy_prefix(llm: torch.nn.Module, prefix: LlmPrefix, max_new_tokens: int) -> GenResult:
    """The unbatched, KV-cached greedy loop for a prefix of any kind (what ``family.generate`` runs).

    decoder: a ``*ForCausalLM`` fed the prefix embeddings, then one token at a time;
    seq2seq: the encoder runs once on the embeddings (T5), the decoder from its start token;
    cross:   a ``*ForCausalLM`` decoder cross-attending to the embeddings (Nougat's mBART).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prefix.kind != "decoder" and prefix.start is None:
        raise ValueError(f"a {prefix.kind} prefix needs a decoder start token")
    device = model_device(llm)
    cache_key = cache_kwarg(llm)
    mask = prefix.mask.to(device)
    if prefix.kind == "seq2seq":
        encoded = llm.get_encoder()(inputs_embeds=prefix.embeds.to(device), attention_mask=mask, return_dict=True)
    states = prefix.embeds.to(device, model_dtype(llm)) if prefix.kind == "cross" else None

    def forward(token: torch.Tensor | None, cache: Any) -> Any:
        """Logits for the next position: the whole prefix first (token None), then one token."""
        nonlocal mask
        if prefix.kind == "decoder":
            # M-RoPE prefixes say their positions; every other one leaves them to the LLM (0..L-1, then counting on)
            mrope = prefix.positions is not None
            if token is None:
                where = {"position_ids": prefix.positions.to(device)} if mrope else {}  # type: ignore[union-attr]
                return llm(inputs_embeds=prefix.embeds.to(device), attention_mask=mask, use_cache=True, **where,
                           **{k: v.to(device) for k, v in prefix.prefill_kwargs().items()})
            where = {"position_ids": torch.tensor([[prefix.next_position() + mask.shape[1] - prefix.length]],
                                                  device=device)} if mrope else {}
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            return llm(input_ids=token, attention_mask=mask, use_cache=True, **{cache_key: cache}, **where,
                       **{k: v.to(device) for k, v in prefix.step_kwargs().items()})
        ids = token if token is not None else torch.tensor([[prefix.start]], dtype=torch.long, device=device)
        if prefix.kind == "seq2seq":
            return llm(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=ids, use_cache=True,
                       **{cache_key: cache})
        return llm(input_ids=ids, encoder_hidden_states=states, use_cache=True, **{cache_key: cache})

    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    out = forward(None, None)
    while True:
        nxt = _pick(out.logits[:, -1], tokens, logits)
        if tokens[-1] in prefix.eos or len(tokens) >= max_new_tokens:
            return _result(tokens, logits)
        out = forward(nxt[:, None], cache_of(out))


# Generation-config fields reset for the reference run: plain greedy, no logits processors that the
# feature-fed loops above do not apply either (a real checkpoint's generation_config may set them).
_PLAIN_GREEDY: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
}


@torch.no_grad()
def ref_generate(model: torch.nn.Module, inputs: dict[str, Any], max_new_tokens: int) -> GenResult:
    """Plain greedy ``generate`` of the full transformers model (batch 1): new tokens + raw logits.

    ``inputs`` is the processor's output; tensors move to the model's device and floating ones
    (pixel values) to its dtype.
    """
    device, dtype = model_device(model), model_dtype(model)
    moved = {
        key: (value.to(device, dtype) if value.is_floating_point() else value.to(device))
        if isinstance(value, torch.Tensor) else value
        for key, value in inputs.items()
    }
    out = model.generate(
        **moved,
        **_PLAIN_GREEDY,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    steps = len(out.logits)
    tokens = out.sequences[0, -steps:].tolist()
    return GenResult(tokens, torch.stack([step[0] for step in out.logits]).to("cpu", torch.float32))


@torch.no_grad()
def teacher_forced_logits(
    llm: torch.nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, tokens: list[int]
) -> torch.Tensor:
    """Decoder-only LLM: logits [len(tokens), vocab] predicting ``tokens`` after the prefix, in one forward.

    Every step is judged on the reference history, so one early flip does not cascade (the way
    to compare a quantized LLM with its float reference). float32 on the CPU.
    """
    device = model_device(llm)
    inputs_embeds, attention_mask = inputs_embeds.to(device), attention_mask.to(device)
    tok = torch.tensor([tokens[:-1]], dtype=torch.long, device=device)
    embeds = torch.cat([inputs_embeds, llm.get_input_embeddings()(tok).to(inputs_embeds.dtype)], dim=1)
    mask = torch.cat([attention_mask, torch.ones_like(tok, dtype=attention_mask.dtype)], dim=1)
    logits = llm(inputs_embeds=embeds, attention_mask=mask).logits[0]
    start = inputs_embeds.shape[1] - 1
    return logits[start : start + len(tokens)].to("cpu", torch.float32)
