"""Values derived from a spec, computed in one place, and the rules checked before any work.

``derive(spec, family)`` is the single validation pass after field validation (``vlmforge.families.resolve``
looks the family up and calls it): it computes every derived number once (``max_multimodal_len = max_batch_size x num_visual_features``,
``max_seq_len = max_input_len + max_output_len``, encoder input length), refuses a user value that
contradicts its formula (naming the formula and both numbers), and applies the cross-field rules.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict

from vlmforge.errors import SpecError
from vlmforge.specs.schema import BuildSpec, KvCacheDtype, QuantMethod

DEFAULT_MAX_OUTPUT_LEN = 512
FP8_MIN_COMPUTE_CAPABILITY = "8.9"


class Derived(BaseModel):
    """Numbers computed from a spec; never stored in the spec itself."""

    model_config = ConfigDict(frozen=True)

    num_visual_features: int
    """Visual tokens per image."""
    max_multimodal_len: int
    """max_batch_size x num_visual_features: rows of the prompt-embedding table."""
    max_input_len: int
    max_output_len: int
    max_seq_len: int
    """max_input_len + max_output_len."""
    max_encoder_input_len: int | None
    """Encoder-decoder families: the encoder's input length (BLIP2-T5: max_input_len; Nougat: batch x features)."""
    visual_max_batch_size: int
    """Images per visual-engine call (the builder's default when the spec leaves it unset)."""
    world_size: int
    """tp x pp: GPUs (MPI ranks) the LLM engine runs on."""
    encoder_decoder: bool
    use_fused_mlp: bool
    max_new_tokens: int
    """Tokens generated per validation input."""
    min_compute_capability: str | None
    """Lowest GPU compute capability the engine can be built for (fp8, w4a8_awq, fp8 KV cache: 8.9)."""


class FamilyRules(Protocol):
    """What the validation pass reads of a model family (:class:`vlmforge.families.base.ModelFamily` has it all)."""

    name: str
    encoder_decoder: bool
    fused_mlp_default: bool
    supports_fused_mlp: bool
    needs_code_source: bool
    default_code_source: str
    default_max_new_tokens: int
    encoder_input_formula: str

    def num_visual_features(self, spec: BuildSpec) -> int: ...

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int: ...

    def check_spec(self, spec: BuildSpec) -> None: ...


def derive(spec: BuildSpec, family: FamilyRules, *, visual_builder_default_batch: int = 4) -> Derived:
    """Compute derived values and check every rule; raises :class:`SpecError` naming path and fix."""
    limits = spec.limits
    nvf = family.num_visual_features(spec)

    # max_output_len / max_seq_len
    if limits.max_output_len is not None and limits.max_seq_len is not None:
        expected = limits.max_input_len + limits.max_output_len
        if limits.max_seq_len != expected:
            raise SpecError(
                f"max_seq_len must equal max_input_len + max_output_len = {limits.max_input_len} + "
                f"{limits.max_output_len} = {expected}, but the spec says {limits.max_seq_len}; "
                "set only two of the three",
                path="limits.max_seq_len",
            )
        max_output_len = limits.max_output_len
    elif limits.max_seq_len is not None:
        max_output_len = limits.max_seq_len - limits.max_input_len
        if max_output_len < 1:
            raise SpecError(
                f"max_seq_len ({limits.max_seq_len}) must exceed max_input_len ({limits.max_input_len}): "
                "max_output_len = max_seq_len - max_input_len would be " + str(max_output_len),
                path="limits.max_seq_len",
            )
    else:
        max_output_len = limits.max_output_len or DEFAULT_MAX_OUTPUT_LEN
    max_seq_len = limits.max_input_len + max_output_len

    encoder_decoder = family.encoder_decoder
    # multimodal table
    max_multimodal_len = limits.max_batch_size * nvf
    if limits.max_multimodal_len is not None and limits.max_multimodal_len != max_multimodal_len:
        raise SpecError(
            f"max_multimodal_len must equal max_batch_size x num_visual_features = {limits.max_batch_size} x {nvf} "
            f"= {max_multimodal_len}, but the spec says {limits.max_multimodal_len}; remove it (it is derived) "
            "or change max_batch_size",
            path="limits.max_multimodal_len",
        )

    max_encoder_input_len = family.encoder_input_len(spec, nvf) if encoder_decoder else None
    if limits.max_encoder_input_len is not None:
        if not encoder_decoder:
            raise SpecError(
                f"max_encoder_input_len applies to encoder-decoder families only; {family.name} is decoder-only: remove it",
                path="limits.max_encoder_input_len",
            )
        if limits.max_encoder_input_len != max_encoder_input_len:
            raise SpecError(
                f"max_encoder_input_len must equal {family.encoder_input_formula} = {max_encoder_input_len}, "
                f"but the spec says {limits.max_encoder_input_len}; remove it (it is derived)",
                path="limits.max_encoder_input_len",
            )
    if not encoder_decoder and limits.max_input_len < nvf:
        raise SpecError(
            f"max_input_len ({limits.max_input_len}) is smaller than one image's visual features ({nvf}): "
            f"the prompt holds the visual tokens, so raise max_input_len to at least {nvf} plus the text",
            path="limits.max_input_len",
        )

    # quantization rules
    quant = spec.quantization
    if encoder_decoder and quant.active:
        raise SpecError(
            f"{family.name} is an encoder-decoder family: TensorRT-LLM's enc_dec converter has no weight or KV-cache "
            "quantization and its quantize.py (NVIDIA ModelOpt) exports decoder-only LLMs only, so there is nothing to "
            f"build a quantized engine from; set quantization.method: none and kv_cache_dtype: auto (got "
            f"{quant.method.value}, {quant.kv_cache_dtype.value})",
            path="quantization.method" if quant.method is not QuantMethod.NONE else "quantization.kv_cache_dtype",
        )
    quantized = quant.method is not QuantMethod.NONE
    if limits.use_fused_mlp and quantized:
        raise SpecError(
            f"use_fused_mlp cannot be combined with quantization ({quant.method.value}): "
            "set limits.use_fused_mlp: false or quantization.method: none",
            path="limits.use_fused_mlp",
        )
    use_fused_mlp = limits.use_fused_mlp if limits.use_fused_mlp is not None else (
        family.fused_mlp_default and not quantized
    )
    if use_fused_mlp and not family.supports_fused_mlp:
        raise SpecError(f"{family.name} has no gated MLP to fuse: set limits.use_fused_mlp: false", path="limits.use_fused_mlp")

    # code source
    if family.needs_code_source and not spec.code_source:
        raise SpecError(
            f"{family.name} checkpoints need the model's own code: set code_source to the repository "
            f"(e.g. {family.default_code_source}) or a local clone",
            path="code_source",
        )
    if spec.code_source and not family.needs_code_source:
        raise SpecError(f"{family.name} needs no code_source: remove it", path="code_source")

    # parallelism
    heads = spec.architecture.num_attention_heads
    tp = spec.parallel.tp
    if heads is not None and heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 64]
        raise SpecError(
            f"tp={tp} must divide the LLM's {heads} attention heads; choose one of {divisors}",
            path="parallel.tp",
        )

    # visual batch
    visual_batch = spec.visual.max_batch_size or visual_builder_default_batch
    if visual_batch < limits.max_batch_size:
        origin = "visual.max_batch_size" if spec.visual.max_batch_size else "the visual builder's default"
        raise SpecError(
            f"the visual engine's batch ({visual_batch}, {origin}) is smaller than the LLM's max_batch_size "
            f"({limits.max_batch_size}): every image of a batch must fit one visual call; set "
            f"visual.max_batch_size: {limits.max_batch_size} or more",
            path="visual.max_batch_size",
        )
    family.check_spec(spec)

    max_new_tokens = spec.validation.max_new_tokens or family.default_max_new_tokens
    if max_new_tokens > max_output_len:
        raise SpecError(
            f"validation.max_new_tokens ({max_new_tokens}) exceeds max_output_len ({max_output_len}): "
            "lower it or raise limits.max_output_len",
            path="validation.max_new_tokens",
        )

    derived = Derived(
        num_visual_features=nvf,
        max_multimodal_len=max_multimodal_len,
        max_input_len=limits.max_input_len,
        max_output_len=max_output_len,
        max_seq_len=max_seq_len,
        max_encoder_input_len=max_encoder_input_len,
        visual_max_batch_size=visual_batch,
        world_size=spec.parallel.tp * spec.parallel.pp,
        encoder_decoder=encoder_decoder,
        use_fused_mlp=use_fused_mlp,
        max_new_tokens=max_new_tokens,
        min_compute_capability=FP8_MIN_COMPUTE_CAPABILITY
        if quant.method in (QuantMethod.FP8, QuantMethod.W4A8_AWQ) or quant.kv_cache_dtype is KvCacheDtype.FP8
        else None,
    )
    return derived
