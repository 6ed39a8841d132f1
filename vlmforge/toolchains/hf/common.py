"""Family-agnostic helpers of the hf toolchain.

Local tokenizer training (no download), the golden synthetic images, seeding, ONNX export and
comparison of visual modules, greedy decoding loops that feed an LLM alone with visual features,
the full model's reference greedy generation, dtype-cast saving, and weight-only quantization of a
decoder-only LLM with optimum-quanto.

Everything is device-aware: tensors are created on the model's device, and results
(:class:`GenResult` logits, ONNX comparisons) come back as float32 on the CPU. Importing this
module imports torch and transformers; it sets no environment variables.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    from PIL import Image  # imported where images are made: the GPU benchmark machine has no Pillow

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------------------------- #

CORPUS: tuple[str, ...] = (
    "Question: which city is this? Answer: Paris.",
    "Question: what color is the car? Answer: red.",
    "Question: how many cats are there? Answer: two.",
    "A photo of a cat sitting on a red couch.",
    "A picture of two dogs playing in the snow near a tree.",
    "USER: <image>\nWhat is shown in this image? ASSISTANT: A city street with a stop sign.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "# Introduction\n\nWe propose a model for optical character recognition of $x^2 + y^2 = z^2$.",
    "\\begin{equation} E = mc^2 \\end{equation} [1] Table 2: results (%).",
)
"""Text the tiny models' byte-level BPE is trained on (prompts, captions, markup)."""

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<image>")
"""Special tokens of every tiny tokenizer; their ids 0..4 are the same in every family."""
BOS_ID, PAD_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))

Template = Literal["bos", "eos", "none"]
"""Post-processing of a single sequence: ``<s> $A`` (LLaMA, OPT), ``$A </s>`` (T5) or nothing."""


def train_bpe_tokenizer(vocab_size: int = 320, template: Template = "bos") -> Tokenizer:
    """A byte-level BPE trained on :data:`CORPUS` (deterministic: same vocab and merges every time)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer)
    if template == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
        )
    elif template == "eos":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
        )
    return tok


def make_fast_tokenizer(
    template: Template = "bos", vocab_size: int = 320, image_token: bool = True, **kwargs: Any
) -> PreTrainedTokenizerFast:
    """The trained BPE wrapped as a transformers fast tokenizer (saved as ``TokenizersBackend``).

    ``image_token`` registers ``<image>`` as the tokenizer's ``image_token`` attribute (LLaVA's
    processor reads it; BLIP-2's processor must own it instead).
    """
    extra = {"image_token": "<image>"} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_tokenizer(vocab_size, template),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------- #
# Determinism, devices, golden images
# --------------------------------------------------------------------------------------------- #


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 if it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def synthetic_images(size: int = 64) -> list[Image.Image]:
    """The three golden RGB images: a colour gradient, a checkerboard, rings and blocks."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    grad = np.stack([x, y, 1.0 - x * y], -1)
    cb = (((np.arange(size)[:, None] // 8) + (np.arange(size)[None, :] // 8)) % 2).astype(np.float32)
    checker = np.stack([cb, 1.0 - cb, 0.5 * cb], -1)
    r = np.hypot(x - 0.5, y - 0.5)
    rings = np.stack([(np.sin(r * 40) + 1) / 2, (x > 0.5).astype(np.float32), (y > 0.5) * 0.8], -1)
    return [Image.fromarray((a * 255).round().astype(np.uint8), "RGB") for a in (grad, checker, rings)]


def image_processor_pixel_values(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """``processor.image_processor(images)`` as a float32 CPU tensor [B, 3, H, W]."""
    out = processor.image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"].to(torch.float32)


# --------------------------------------------------------------------------------------------- #
# Saving
# --------------------------------------------------------------------------------------------- #


def save_pretrained_as(model: Any, out_dir: Path, dtype: torch.dtype) -> Path:
    """``save_pretrained`` a transformers model in ``dtype`` without touching the live module.

    Casting the module itself (a ``.to(bf16)`` / ``.to(fp32)`` round trip) would silently round the
    weights it shares with the full model. Tied tensors (lm_head <-> embed_tokens) stay tied.
    """
    cast: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = cast.setdefault((value.data_ptr(), value.dtype, tuple(value.shape)), value.to(dtype))
        state[key] = value
    old = model.config.dtype
    try:
        model.save_pretrained(out_dir, state_dict=state)
        # save_pretrained writes the live module's dtype into config.json: write the saved one instead
        model.config.dtype = dtype
        model.config.save_pretrained(out_dir)
    finally:
        model.config.dtype = old
    return Path(out_dir)


# --------------------------------------------------------------------------------------------- #
# ONNX
# --------------------------------------------------------------------------------------------- #

Exporter = Literal["dynamo", "torchscript"]


@dataclass
class OnnxExportInfo:
    """Where an ONNX export went, which exporter produced it, and why the ones before it failed."""

    path: Path
    exporter: Exporter
    errors: dict[str, str] = field(default_factory=dict)


def export_onnx(
    module: torch.nn.Module,
    path: Path,
    example: torch.Tensor,
    input_name: str = "pixel_values",
    output_name: str = "features",
    opset: int = 18,
    prefer: Sequence[Exporter] = ("dynamo", "torchscript"),
) -> OnnxExportInfo:
    """Export ``module(example) -> output`` with a dynamic batch axis, trying the exporters in order.

    The dynamo exporter (torch.export) comes first; the TorchScript exporter is the fallback. The
    result is checked with ``onnx.checker``. Raises RuntimeError naming every exporter's error.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = example.to(model_device(module))
    errors: dict[str, str] = {}
    for exporter in prefer:
        try:
            with torch.no_grad():
                if exporter == "dynamo":
                    batch = torch.export.Dim("batch", min=1, max=64)
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        input_names=[input_name],
                        output_names=[output_name],
                        dynamic_shapes=({0: batch},),
                        opset_version=opset,
                        dynamo=True,
                        external_data=False,
                        verbose=False,
                    )
                else:
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        input_names=[input_name],
                        output_names=[output_name],
                        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                        opset_version=min(opset, 17),
                        dynamo=False,
                    )
            onnx.checker.check_model(str(path))
            return OnnxExportInfo(path, exporter, errors)
        except Exception as exc:  # noqa: BLE001 - record it and try the next exporter
            errors[exporter] = f"{type(exc).__name__}: {str(exc)[:300]}"
            logger.warning("ONNX export with the %s exporter failed: %s", exporter, errors[exporter])
    raise RuntimeError(f"every ONNX exporter failed: {errors}")


def run_onnx(
    path: Path, pixel_values: torch.Tensor, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> torch.Tensor:
    """Run an exported visual module in onnxruntime; float32 CPU output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))
    name = session.get_inputs()[0].name
    out = session.run(None, {name: pixel_values.detach().to("cpu", torch.float32).numpy()})[0]
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def compare_onnx(path: Path, module: torch.nn.Module, pixel_values: torch.Tensor) -> dict[str, float]:
    """Run onnxruntime (CPU) and the torch module on the same batch and compare.

    Returns ``max_abs``, ``max_rel`` (elementwise, against |ref| + 1e-6), ``max_rel_to_scale`` (max
    abs error over the largest |ref|: the robust one) and ``batch``.
    """
    got = run_onnx(path, pixel_values).double().numpy()
    with torch.no_grad():
        ref = module.eval()(pixel_values.to(model_device(module))).double().cpu().numpy()
    diff = np.abs(got - ref)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float((diff / (np.abs(ref) + 1e-6)).max()),
        "max_rel_to_scale": float(diff.max() / (np.abs(ref).max() + 1e-12)),
        "batch": int(pixel_values.shape[0]),
    }


# --------------------------------------------------------------------------------------------- #
# Greedy generation
# --------------------------------------------------------------------------------------------- #


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


def compare_generations(ref: GenResult, got: GenResult) -> GenComparison:
    """Position-by-position token agreement and logit errors of ``got`` against ``ref``."""
    n = min(len(ref.tokens), len(got.tokens))
    total = max(len(ref.tokens), len(got.tokens), 1)
    agree = sum(int(a == b) for a, b in zip(ref.tokens[:n], got.tokens[:n], strict=True))
    prefix = next((i for i in range(n) if ref.tokens[i] != got.tokens[i]), n)
    k = min(prefix + 1, n)
    ref_logits, got_logits = ref.logits.float().cpu(), got.logits.float().cpu()
    prefix_err = float((ref_logits[:k] - got_logits[:k]).abs().max()) if k else float("inf")
    first_err = float((ref_logits[0] - got_logits[0]).abs().max()) if n else float("inf")
    return GenComparison(agree / total, ref.tokens == got.tokens, first_err, prefix, prefix_err)


def _pick(step_logits: torch.Tensor, tokens: list[int], logits: list[torch.Tensor]) -> torch.Tensor:
    """Greedy choice of a [1, vocab] step; records the token and the float32 logits."""
    step_logits = step_logits.float()
    logits.append(step_logits[0])
    nxt = step_logits.argmax(-1)
    tokens.append(int(nxt))
    return nxt


def _result(tokens: list[int], logits: list[torch.Tensor]) -> GenResult:
    return GenResult(tokens, torch.stack(logits).to("cpu", torch.float32))


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
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
    cache_kwarg = _cache_kwarg(llm)
    mask = prefix.mask.to(device)
    if prefix.kind == "seq2seq":
        encoded = llm.get_encoder()(inputs_embeds=prefix.embeds.to(device), attention_mask=mask, return_dict=True)
    states = prefix.embeds.to(device, model_dtype(llm)) if prefix.kind == "cross" else None

    def forward(token: torch.Tensor | None, cache: Any) -> Any:
        """Logits for the next position: the whole prefix first (token None), then one token."""
        nonlocal mask
        if prefix.kind == "decoder":
            if token is None:
                return llm(inputs_embeds=prefix.embeds.to(device), attention_mask=mask, use_cache=True)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            return llm(input_ids=token, attention_mask=mask, use_cache=True, **{cache_kwarg: cache})
        ids = token if token is not None else torch.tensor([[prefix.start]], dtype=torch.long, device=device)
        if prefix.kind == "seq2seq":
            return llm(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=ids, use_cache=True,
                       **{cache_kwarg: cache})
        return llm(input_ids=ids, encoder_hidden_states=states, use_cache=True, **{cache_kwarg: cache})

    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    out = forward(None, None)
    while True:
        nxt = _pick(out.logits[:, -1], tokens, logits)
        if tokens[-1] in prefix.eos or len(tokens) >= max_new_tokens:
            return _result(tokens, logits)
        out = forward(nxt[:, None], _cache_of(out))


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


# --------------------------------------------------------------------------------------------- #
# Weight-only quantization (optimum-quanto)
# --------------------------------------------------------------------------------------------- #

QuantWeights = Literal["int8", "int4"]

QUANTO_WEIGHTS_FILE = "model.safetensors"
QUANTO_MAP_FILE = "quanto_qmap.json"
QUANTO_ALIASES_FILE = "quanto_aliases.json"


def quantize_and_save(
    llm: torch.nn.Module, out_dir: Path, weights: QuantWeights, exclude: Sequence[str] | None = None
) -> Path:
    """Weight-only quantize a decoder-only LLM with optimum-quanto IN PLACE, freeze it, and save it.

    Pass a model you own (not one sharing modules with a full model you still use). ``out_dir``
    gets config.json, model.safetensors (quanto's state dict: ``*.weight._data``, ``*._scale``...),
    quanto_qmap.json (the quantization map) and quanto_aliases.json (tied keys). ``exclude``:
    module name patterns left in float (default: the lm_head).
    """
    from optimum.quanto import freeze, qint4, qint8, quantization_map, quantize
    from safetensors.torch import save_file

    qtypes = {"int8": qint8, "int4": qint4}
    if weights not in qtypes:
        raise ValueError(f"unknown quanto weights {weights!r}: use one of {', '.join(qtypes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quantize(llm, weights=qtypes[weights], exclude=list(exclude) if exclude is not None else ["lm_head"])
    freeze(llm)
    llm.config.save_pretrained(out_dir)
    state, aliases = _split_aliases(llm.state_dict())
    save_file(state, str(out_dir / QUANTO_WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / QUANTO_MAP_FILE).write_text(json.dumps(quantization_map(llm), indent=1, sort_keys=True))
    (out_dir / QUANTO_ALIASES_FILE).write_text(json.dumps(aliases, indent=1, sort_keys=True))
    logger.info("saved quanto %s LLM to %s", weights, out_dir)
    return out_dir


def _split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage: keep the first key of each tied group (embed_tokens) and
    record the others (lm_head.weight) as aliases restored at load time. Tensors come back on the CPU."""
    first: dict[tuple[int, torch.dtype, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, value in state.items():
        ident = (value.data_ptr(), value.dtype, tuple(value.shape))
        if value.numel() and ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
            out[key] = value.detach().to("cpu").contiguous()
    return out, aliases


def load_quantized(
    model_cls: type, out_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A fresh ``model_cls`` object from a :func:`quantize_and_save` directory (eval mode, on ``device``).

    ``dtype`` is that of the non-quantized parameters: use the dtype the LLM was quantized in.
    """
    from optimum.quanto import requantize
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    config = AutoConfig.from_pretrained(out_dir)
    # Not on torch.device("meta"): requantize() only fills the state dict, so non-persistent buffers
    # (LLaMA's rotary inv_freq) would stay uninitialised and the logits wrong.
    model = model_cls._from_config(config, dtype=dtype)
    state = load_file(str(out_dir / QUANTO_WEIGHTS_FILE))
    for alias, source in json.loads((out_dir / QUANTO_ALIASES_FILE).read_text()).items():
        state[alias] = state[source]
    qmap = json.loads((out_dir / QUANTO_MAP_FILE).read_text())
    requantize(model, state, qmap, device=torch.device(device))
    model.tie_weights()
    return model.eval()


def weight_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s parameters in ``dtype``, tied ones counted once (what its safetensors hold, headers aside)."""
    seen: set[int] = set()
    total = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for param in module.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * itemsize
    return total


def safetensors_size(path: Path) -> int:
    """Total size in bytes of the ``*.safetensors`` files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))
