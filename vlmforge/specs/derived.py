"""Values derived from a spec, computed in one place, and the rules checked before any work.

``derive(spec, family)`` is the single validation pass after field validation (``vlmforge.families.resolve``
looks the family up and calls it): it computes every derived number once from the spec and the family's visual
contract (:mod:`vlmforge.specs.visual`): ``max_multimodal_len = max_batch_size x max_images_per_prompt x tokens of
the largest image``, ``max_seq_len = max_input_len + max_output_len``, encoder input length, the visual engine's
batch), records how each was reached (``vlmforge plan --explain``), refuses a user value that contradicts its
formula (naming the formula and both numbers), and applies the cross-field rules.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from vlmforge.errors import SpecError
from vlmforge.specs.schema import BuildSpec, ImageSize, KvCacheDtype, QuantMethod
from vlmforge.specs.visual import VisualContract, VisualPlacement

DEFAULT_MAX_OUTPUT_LEN = 512
FP8_MIN_COMPUTE_CAPABILITY = "8.9"


class Explained(BaseModel):
    """One derived number and how it was reached."""

    model_config = ConfigDict(frozen=True)

    name: str
    value: int | str | bool | None
    formula: str
    """The rule with the spec's numbers in it, or where the value was taken from."""
    note: str = ""
    """What reads it (a trtllm-build flag, the runner) or why the rule holds."""


class Derived(BaseModel):
    """Numbers computed from a spec; never stored in the spec itself.

    Fields added after the first release are left out of dumps at the value every earlier spec had, so earlier
    plans, manifests and fingerprints read exactly as before."""

    model_config = ConfigDict(frozen=True)

    num_visual_features: int
    """Visual tokens per image: the family's fixed count, or the count of the largest image (visual.max_image_size)
    for families whose count depends on the image's size."""
    max_multimodal_len: int
    """max_batch_size x max_images_per_prompt x num_visual_features: rows of the prompt-embedding table."""
    max_input_len: int
    max_output_len: int
    max_seq_len: int
    """max_input_len + max_output_len."""
    max_encoder_input_len: int | None
    """Encoder-decoder families: the encoder's input length (BLIP2-T5: max_input_len; Nougat: batch x features);
    cross-attention decoders: the states one request attends to (mllama: images x tiles x (patches + 1))."""
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
    max_images_per_prompt: int = Field(default=1, exclude_if=lambda value: value == 1)
    """Images one prompt carries: limits.max_images_per_prompt, or 1."""
    max_image_size: ImageSize | None = Field(default=None, exclude_if=lambda value: value is None)
    """The largest image the budgets were counted at (families whose tokens depend on the image's size)."""
    explanation: tuple[Explained, ...] = Field(default=(), exclude=True)
    """How each number was reached, in order (``vlmforge plan --explain``); never dumped or fingerprinted (the spec
    and the numbers themselves are)."""


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

    def visual_contract(self, spec: BuildSpec) -> VisualContract: ...

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int: ...

    def check_spec(self, spec: BuildSpec) -> None: ...


def derive(spec: BuildSpec, family: FamilyRules, *, visual_builder_default_batch: int = 4) -> Derived:
    """Compute derived values and check every rule; raises :class:`SpecError` naming path and fix."""
    limits = spec.limits
    explained: list[Explained] = []

    def explain(name: str, value: int | str | bool | None, formula: str, note: str = "") -> None:
        explained.append(Explained(name=name, value=value, formula=formula, note=note))

    # the visual contract: tokens of the largest image, images per prompt
    contract = family.visual_contract(spec)
    nvf = contract.tokens_per_image
    size = contract.max_image_size
    if spec.visual.max_image_size is not None and not contract.size_dependent:
        raise SpecError(
            f"{family.name} resizes every image to its vision tower's input, so its visual tokens ({nvf}) do not "
            f"depend on the image's size: remove visual.max_image_size",
            path="visual.max_image_size",
        )
    images = limits.max_images_per_prompt or 1
    ceiling = contract.max_images_per_prompt
    if ceiling is not None and images > ceiling:
        raise SpecError(
            f"{family.name} takes at most {ceiling} image{'s' if ceiling > 1 else ''} per prompt, but "
            f"limits.max_images_per_prompt is {images}: set it to {ceiling} or less (or remove it)",
            path="limits.max_images_per_prompt",
        )
    if size is None:
        at_size = " (every image is resized to one size)" if family.resized_to_one_size else " (the most one image gives)"
    elif spec.visual.max_image_size is not None:
        at_size = f" at visual.max_image_size {size}"
    else:
        at_size = f" at {family.name}'s default largest image {size} (set visual.max_image_size to change it)"
    explain("visual_placement", contract.placement.value, f"{family.name}'s visual contract",
            f"position ids: {contract.position_id_dims} axis" + ("" if contract.position_id_dims == 1 else "es"))
    explain("num_visual_features", nvf, contract.tokens_source + at_size, "visual tokens of the largest image")
    explain("max_images_per_prompt", images,
            "limits.max_images_per_prompt" if limits.max_images_per_prompt else "default",
            f"{family.name} takes " + (f"at most {ceiling}" if ceiling is not None else "any number") + " per prompt")

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
        output_formula = "limits.max_output_len"
    elif limits.max_seq_len is not None:
        max_output_len = limits.max_seq_len - limits.max_input_len
        if max_output_len < 1:
            raise SpecError(
                f"max_seq_len ({limits.max_seq_len}) must exceed max_input_len ({limits.max_input_len}): "
                "max_output_len = max_seq_len - max_input_len would be " + str(max_output_len),
                path="limits.max_seq_len",
            )
        output_formula = f"max_seq_len - max_input_len = {limits.max_seq_len} - {limits.max_input_len}"
    else:
        max_output_len = limits.max_output_len or DEFAULT_MAX_OUTPUT_LEN
        output_formula = "limits.max_output_len" if limits.max_output_len else "default"
    max_seq_len = limits.max_input_len + max_output_len

    encoder_decoder = family.encoder_decoder
    # multimodal table
    max_multimodal_len = limits.max_batch_size * images * nvf
    if images == 1:
        mm_formula = f"max_batch_size x num_visual_features = {limits.max_batch_size} x {nvf}"
    else:
        mm_formula = (f"max_batch_size x max_images_per_prompt x num_visual_features = "
                      f"{limits.max_batch_size} x {images} x {nvf}")
    if limits.max_multimodal_len is not None and limits.max_multimodal_len != max_multimodal_len:
        raise SpecError(
            f"max_multimodal_len must equal {mm_formula} = {max_multimodal_len}, but the spec says "
            f"{limits.max_multimodal_len}; remove it (it is derived) or change max_batch_size",
            path="limits.max_multimodal_len",
        )
    explain("max_multimodal_len", max_multimodal_len, mm_formula,
            "trtllm-build --max_multimodal_len: rows of the prompt-embedding table"
            if contract.placement is not VisualPlacement.CROSS_ATTENTION or encoder_decoder
            else "visual rows of one LLM batch (no prompt table: the decoder cross-attends to them)")

    # encoder states the decoder attends to: an encoder-decoder's encoder input, or a decoder's cross-attention states
    has_encoder_states = encoder_decoder or contract.placement is VisualPlacement.CROSS_ATTENTION
    max_encoder_input_len = family.encoder_input_len(spec, nvf) if has_encoder_states else None
    if limits.max_encoder_input_len is not None:
        if max_encoder_input_len is None:
            raise SpecError(
                f"max_encoder_input_len applies to encoder-decoder and cross-attention families only; {family.name} "
                "is decoder-only with its visual tokens in the prompt: remove it",
                path="limits.max_encoder_input_len",
            )
        if not encoder_decoder and limits.max_encoder_input_len < max_encoder_input_len:
            raise SpecError(
                f"max_encoder_input_len ({limits.max_encoder_input_len}) cannot hold the cross-attention states of the "
                f"largest prompt: {family.encoder_input_formula} = {max_encoder_input_len}; remove it (it is derived)",
                path="limits.max_encoder_input_len",
            )
        if limits.max_encoder_input_len != max_encoder_input_len:
            raise SpecError(
                f"max_encoder_input_len must equal {family.encoder_input_formula} = {max_encoder_input_len}, "
                f"but the spec says {limits.max_encoder_input_len}; remove it (it is derived)",
                path="limits.max_encoder_input_len",
            )
    visual_tokens = images * nvf
    if contract.placement.takes_input_positions and limits.max_input_len < visual_tokens:
        if images == 1 and size is None and not encoder_decoder:
            message = (f"max_input_len ({limits.max_input_len}) is smaller than one image's visual features ({nvf}): "
                       f"the prompt holds the visual tokens, so raise max_input_len to at least {nvf} plus the text")
        else:
            what = (f"{images} images" if images > 1 else "one image") + (f" of {size}" if size is not None else "")
            count = f"{images} x {nvf} = {visual_tokens}" if images > 1 else str(nvf)
            fixes = [f"raise limits.max_input_len to at least {visual_tokens} plus the text"]
            fixes += ["lower visual.max_image_size"] if size is not None else []
            fixes += ["lower limits.max_images_per_prompt"] if images > 1 else []
            message = (f"max_input_len ({limits.max_input_len}) cannot hold the visual tokens of {what} ({count} "
                       f"tokens, {contract.tokens_source}): the {'encoder input' if encoder_decoder else 'prompt'} "
                       "holds them; " + " or ".join(fixes))
        raise SpecError(message, path="limits.max_input_len")
    explain("max_input_len", limits.max_input_len, "limits.max_input_len",
            f"prompt positions: text plus {images} x {nvf} = {visual_tokens} visual tokens"
            if contract.placement.takes_input_positions else "text tokens (the visual states go to cross-attention)")
    explain("max_output_len", max_output_len, output_formula)
    explain("max_seq_len", max_seq_len, f"max_input_len + max_output_len = {limits.max_input_len} + {max_output_len}")
    if max_encoder_input_len is not None:
        explain("max_encoder_input_len", max_encoder_input_len, family.encoder_input_formula,
                "trtllm-build --max_encoder_input_len of the decoder" + ("" if encoder_decoder else
                                                                         " (its cross-attention states per request)"))

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
    explain("use_fused_mlp", use_fused_mlp, "limits.use_fused_mlp" if limits.use_fused_mlp is not None
            else f"{family.name}'s default" + (", off when quantized" if family.fused_mlp_default else ""))

    # code source
    if family.needs_code_source and not spec.code_source:
        raise SpecError(
            f"{family.name} checkpoints need the model's own code: set code_source to the repository "
            f"(e.g. {family.default_code_source}) or a local clone",
            path="code_source",
        )
    if spec.code_source and not family.needs_code_source:
        raise SpecError(f"{family.name} needs no code_source: remove it", path="code_source")
    if spec.artifacts.hf_checkpoint and quant.active:
        # a quantized build's hf/ is ModelOpt's unified export of the whole model: calibrated formats only
        if quant.method.weight_only or quant.method is QuantMethod.NONE:
            why = ("is served by the hf runner on torch's low-bit kernels and is a TensorRT-LLM build-time format, "
                   "not a checkpoint format" if quant.method.weight_only
                   else "with a quantized KV cache alone has no quantized weights to export")
            raise SpecError(
                "artifacts.hf_checkpoint on a quantized spec publishes ModelOpt's unified checkpoint of the whole "
                f"model, which holds ModelOpt's calibrated formats (int4_awq, w4a8_awq, int8_sq, fp8); "
                f"{quant.method.value} {why}: pick one of those methods, or set artifacts.hf_checkpoint: false",
                path="quantization.method",
            )
        if quant.kv_cache_dtype not in (KvCacheDtype.AUTO, KvCacheDtype.FP8):
            raise SpecError(
                f"artifacts.hf_checkpoint: ModelOpt's unified exporter writes FP8 KV caches only (kv_cache_dtype "
                f"{quant.kv_cache_dtype.value} is refused as an invalid KV cache quantization format): set "
                "quantization.kv_cache_dtype: fp8 or auto, or artifacts.hf_checkpoint: false",
                path="quantization.kv_cache_dtype",
            )

    # parallelism
    heads = spec.architecture.num_attention_heads
    tp = spec.parallel.tp
    if heads is not None and heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 64]
        raise SpecError(
            f"tp={tp} must divide the LLM's {heads} attention heads; choose one of {divisors}",
            path="parallel.tp",
        )
    world_size = spec.parallel.tp * spec.parallel.pp
    explain("world_size", world_size, f"tp x pp = {spec.parallel.tp} x {spec.parallel.pp}", "GPUs (MPI ranks) of the LLM")

    # visual batch: every image of an LLM batch in one visual-engine call
    visual_batch = spec.visual.max_batch_size or visual_builder_default_batch
    origin = "visual.max_batch_size" if spec.visual.max_batch_size else "the visual builder's default"
    per_image = contract.engine_inputs_per_image
    engine_inputs = limits.max_batch_size * images * per_image
    if images * per_image == 1:
        need = f"the LLM's max_batch_size ({limits.max_batch_size})"
    else:
        need = (f"the visual-engine inputs of one LLM batch: max_batch_size x max_images_per_prompt x inputs per "
                f"image = {limits.max_batch_size} x {images} x {per_image} = {engine_inputs}")
    if visual_batch < engine_inputs:
        raise SpecError(
            f"the visual engine's batch ({visual_batch}, {origin}) is smaller than {need}: every image of a batch "
            f"must fit one visual call; set visual.max_batch_size: {engine_inputs} or more",
            path="visual.max_batch_size",
        )
    explain("visual_max_batch_size", visual_batch, origin, f"at least {need}")
    for number in contract.family_numbers:
        explain(number.name, number.value, number.formula, number.note)
    family.check_spec(spec)

    max_new_tokens = spec.validation.max_new_tokens or family.default_max_new_tokens
    if max_new_tokens > max_output_len:
        raise SpecError(
            f"validation.max_new_tokens ({max_new_tokens}) exceeds max_output_len ({max_output_len}): "
            "lower it or raise limits.max_output_len",
            path="validation.max_new_tokens",
        )
    explain("max_new_tokens", max_new_tokens, "validation.max_new_tokens" if spec.validation.max_new_tokens
            else f"{family.name}'s default", "tokens generated per validation input")
    fp8 = quant.method in (QuantMethod.FP8, QuantMethod.W4A8_AWQ) or quant.kv_cache_dtype is KvCacheDtype.FP8
    min_cc = FP8_MIN_COMPUTE_CAPABILITY if fp8 else None
    explain("min_compute_capability", min_cc, "fp8 weights, activations or KV cache" if fp8 else "no fp8")

    return Derived(
        num_visual_features=nvf,
        max_multimodal_len=max_multimodal_len,
        max_input_len=limits.max_input_len,
        max_output_len=max_output_len,
        max_seq_len=max_seq_len,
        max_encoder_input_len=max_encoder_input_len,
        visual_max_batch_size=visual_batch,
        world_size=world_size,
        encoder_decoder=encoder_decoder,
        use_fused_mlp=use_fused_mlp,
        max_new_tokens=max_new_tokens,
        min_compute_capability=min_cc,
        max_images_per_prompt=images,
        max_image_size=size,
        explanation=tuple(explained),
    )
