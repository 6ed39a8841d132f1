"""Base classes for model families: what a family must say, and the shared plan shapes.

Three levels, as in optimum's exporters: :class:`ModelFamily` (the contract), the two shapes
:class:`DecoderOnlyFamily` and :class:`EncoderDecoderFamily` (how their trtllm plans are written),
then one small class per family in its own module, mostly class constants.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError
from vlmforge.families.contract import VisualContractHooks
from vlmforge.plans.checkpoint import check_checkpoint_support, checkpoint_argv, checkpoint_report
from vlmforge.specs.schema import BuildSpec, Dialect, KvCacheDtype, QuantMethod, parse_source

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.families.contract import ImageFeatures
    from vlmforge.modeling.generation import GenResult, LlmPrefix
    from vlmforge.plans.model import DialectInfo, PlanContext, Step

SEED_PROMPT = "Question: which city is this? Answer:"
PROCESSOR_FILES = (("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "tokenizer_config.json"))
"""What a checkpoint folder holds for its processor (one of each group), unless the family says otherwise."""


@dataclass(frozen=True)
class ArchitectureFacts:
    """What a checkpoint's config says about the numbers a plan depends on."""

    num_visual_features: int
    num_attention_heads: int


class ModelFamily(VisualContractHooks):
    """A family of multimodal models: its facts, its rules and its build steps (its visual contract:
    :class:`~vlmforge.families.contract.VisualContractHooks`)."""

    name: ClassVar[str]
    """Registry name, used in specs (``family: llava``)."""
    description: ClassVar[str]
    encoder_decoder: ClassVar[bool] = False
    """The LLM is an encoder-decoder (no weight quantization in TensorRT-LLM)."""
    llm_kind: ClassVar[str]
    """Which convert_checkpoint.py directory serves the LLM: opt, llama or enc_dec."""
    needs_code_source: ClassVar[bool] = False
    default_code_source: ClassVar[str] = ""
    code_dir_name: ClassVar[str] = ""
    fused_mlp_default: ClassVar[bool] = False
    supports_fused_mlp: ClassVar[bool] = False
    default_max_new_tokens: ClassVar[int] = 30
    takes_prompt: ClassVar[bool] = True
    """The model reads user text (Nougat reads the image alone)."""
    golden_prompt: ClassVar[str | None] = SEED_PROMPT
    """Prompt of the golden validation inputs; None for prompt-free models (Nougat)."""
    tiny_source: ClassVar[str | None] = None
    """``tiny://`` name of the family's locally generated test model, if it has one."""
    extra_tiny_sources: ClassVar[tuple[str, ...]] = ()
    """More ``tiny://`` models of the family (other checkpoint layouts), made by :meth:`make_tiny_source`."""

    # --- facts (the visual ones: vlmforge.families.contract) ----------------------------------

    encoder_input_formula: ClassVar[str] = ""

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int:
        raise NotImplementedError(f"{self.name} is not an encoder-decoder family")

    def check_spec(self, spec: BuildSpec) -> None:
        """Family-specific rules beyond the shared ones; raise SpecError."""

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        """Refuse what the dialect's scripts cannot do for this family; raise PlanError."""

    # --- hf toolchain -----------------------------------------------------------------------
    # Implemented by every family module; torch and transformers are imported inside them, so the
    # spec and plan layers never need torch.

    plan_dialects: ClassVar[tuple[Dialect, ...]] = (Dialect.V0_9, Dialect.V1_2)
    """TensorRT-LLM dialects whose scripts build this family (``vlmforge families``; the others refuse its plan)."""
    hf_supported: ClassVar[bool] = True
    """The hf toolchain can build this family (every family today; a family that needs foreign model code would not)."""
    hf_unsupported_reason: ClassVar[str] = ""
    """Why the hf toolchain cannot build this family (when hf_supported is False)."""
    quantizable: ClassVar[bool] = False
    """The hf toolchain can weight-quantize this family's LLM (decoder-only families)."""
    logit_scale_tolerance: ClassVar[float] = 1e-3
    """ONNX-vs-torch visual check: largest error allowed, relative to the output's scale."""
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = ()
    """Checkpoint tensor-name prefixes of everything the visual engine holds (vision encoder, projector).
    The visual stage's fingerprint hashes only these tensors, so new LLM weights reuse the visual engine.
    Empty: unknown, the whole checkpoint counts (always correct, never reused across revisions)."""
    llm_config_keys: ClassVar[tuple[str, ...]] = ()
    """Top-level config.json keys that only the LLM reads, left out of the visual stage's fingerprint
    (every other key counts, so a key this list misses costs a rebuild, never a stale engine)."""
    visual_config_files: ClassVar[tuple[str, ...]] = ()
    """Further files (relative paths) the visual engine is built from, hashed into its fingerprint when present
    (config.json and the top-level processor configs always are)."""

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        """Write a deterministic random-weight checkpoint with a real tokenizer and processor (no download)."""
        raise NotImplementedError

    def tiny_sources(self) -> tuple[str, ...]:
        """Every ``tiny://`` model of the family: :attr:`tiny_source` first."""
        return ((self.tiny_source,) if self.tiny_source else ()) + self.extra_tiny_sources

    def make_tiny_source(self, source: str, out_dir: Path, seed: int = 0) -> None:
        """Write the tiny model ``source`` (one of :meth:`tiny_sources`)."""
        if source != self.tiny_source:
            raise ValueError(f"{self.name} makes no {source}; its tiny models: {', '.join(self.tiny_sources()) or 'none'}")
        self.make_tiny(out_dir, seed)

    def missing_processor_files(self, model_dir: Path) -> list[str]:
        """Processor files a checkpoint folder lacks (each entry names the alternatives), checked before loading."""
        return [" or ".join(names) for names in PROCESSOR_FILES if not any((model_dir / n).is_file() for n in names)]

    def hf_model_class(self) -> type:
        """The transformers class of the full reference model (what :meth:`load_model` loads)."""
        raise NotImplementedError

    def load_model(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu") -> Any:
        """The full reference model (eval mode)."""
        return self.hf_model_class().from_pretrained(model_dir, dtype=dtype, device_map=device).eval()

    def load_processor(self, model_dir: Path) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir)

    def save_processor(self, processor: Any, model_dir: Path, target: Path) -> None:
        """Write ``processor`` (loaded from ``model_dir``) into ``target``, for :meth:`load_processor` to read back."""
        processor.save_pretrained(target)

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """num_visual_features and LLM attention heads read from the checkpoint's config.json."""
        raise NotImplementedError

    def checkpoint_facts(self, model_dir: Path, config: dict[str, Any]) -> ArchitectureFacts:
        """:meth:`architecture_facts` of a checkpoint folder (Pix2Struct reads max_patches beside config.json)."""
        return self.architecture_facts(config)

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """Wrap user text the way the model expects for ``num_images`` images (their placeholders, chat template);
        None stays None. ValueError for more images than the family takes."""
        self.check_image_count(num_images)
        return text

    def pixel_values(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        """Preprocess images into the visual engine's input [B, 3, H, W] (float32): the processor's image part."""
        from vlmforge.modeling.images import image_processor_pixel_values

        return image_processor_pixel_values(processor, images)

    def visual_module(self, model: Any) -> torch.nn.Module:
        """pixel_values -> exactly the features the LLM consumes."""
        raise NotImplementedError

    def extract_llm(self, model: Any) -> Any:
        """The language model alone (a standalone transformers model, its own save_pretrained)."""
        raise NotImplementedError

    def llm_class(self) -> type:
        """The transformers class of the standalone LLM."""
        raise NotImplementedError

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        """``llm_prefix(...).length`` from the tokenizer alone, so a server can refuse a long prompt before any
        forward: ``num_visual_features`` is one image's count, or one count per image of the prompt. Raises
        ValueError for a prompt the family cannot take."""
        raise NotImplementedError

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """What the LLM is fed for one request: its images' features (one [1, N, hidden] tensor, or one per image of
        the prompt, in order; see :meth:`image_features`) and the user's text (formatted here)."""
        raise NotImplementedError

    def generate(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None,
                 max_new_tokens: int) -> GenResult:
        """Greedy generation from the LLM alone, fed the visual features of the request's image(s) (batch 1)."""
        from vlmforge.modeling.generation import greedy_prefix

        return greedy_prefix(llm, self.llm_prefix(llm, processor, features, prompt), max_new_tokens)

    def reference_generate(self, model: Any, processor: Any, image: Image.Image | Sequence[Image.Image],
                           prompt: str | None, max_new_tokens: int) -> GenResult:
        """Greedy generation of the full reference model (batch 1), fed what its processor makes of the image (or the
        prompt's images, in order) and the prompt formatted for them."""
        from vlmforge.modeling.generation import ref_generate

        images = self.image_list(image)
        inputs = processor(images=images, text=self.format_prompt(prompt, len(images)), return_tensors="pt")
        return ref_generate(model, dict(inputs), max_new_tokens)

    # --- trtllm plan ------------------------------------------------------------------------

    def trtllm_steps(self, ctx: PlanContext) -> list[Step]:
        raise NotImplementedError

    def visual_model_type(self, ctx: PlanContext) -> str:
        """The visual builder's --model_type for this model in this dialect."""
        raise NotImplementedError

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        """Bring the checkpoint (and model code) into the workspace."""
        hf_dir = ctx.layout.hf_dir
        return [ctx.step("fetch", self.fetch_argv(ctx, ctx.spec.source, hf_dir), tool=self.fetch_tool(ctx),
                         outputs=[hf_dir])]

    def fetch_tool(self, ctx: PlanContext) -> str:
        return "git" if self._git_clone_url(ctx, ctx.spec.source) else "vlmforge"

    def fetch_argv(self, ctx: PlanContext, source: str, dest: str) -> list[str]:
        url = self._git_clone_url(ctx, source)
        if url:
            return ["git", "clone", "--", url, dest]
        return ["vlmforge", "fetch", "--", source, dest]

    def _git_clone_url(self, ctx: PlanContext, source: str) -> str | None:
        """The seed's dialect clones Hugging Face repos with git; 1.2 uses vlmforge's verified, pinned fetch."""
        parsed = parse_source(source)
        if ctx.dialect.dialect is Dialect.V0_9 and parsed.scheme == "hf" and parsed.revision is None:
            return f"https://huggingface.co/{parsed.location}"
        return None

    def run_text_args(self, ctx: PlanContext) -> list[str]:
        """--max_new_tokens / --input_text of the validation run, as the seed writes them."""
        args: list[str] = []
        validation = ctx.spec.validation
        if validation.max_new_tokens is not None:
            args += ["--max_new_tokens", str(validation.max_new_tokens)]
        if validation.input_text is not None:
            text = validation.input_text
            # run.py's argparse reads a separate value that starts with '-' as an option ("expected one argument"):
            # attached, it is the option's value whatever it holds.
            args += [f"--input_text={text}"] if text.startswith("-") else ["--input_text", text]
        return args

    def validate_step(self, ctx: PlanContext, engine_args: list[str], inputs: list[str]) -> Step:
        info = ctx.dialect
        argv = ctx.python(posixpath.join(info.multimodal_dir, "run.py")) + self.run_text_args(ctx)
        argv += ["--hf_model_dir", ctx.layout.hf_dir] + engine_args
        world = ctx.derived.world_size
        if world > 1:
            argv = ["mpirun", "-n", str(world), "--allow-run-as-root"] + argv
        return ctx.step("validate", argv, tool=posixpath.join(info.multimodal_dir, "run.py"), gpus=world,
                        inputs=inputs + [ctx.layout.hf_dir])

    def visual_step(self, ctx: PlanContext) -> tuple[Step, str]:
        """The visual engine build and the directory it writes."""
        info = ctx.dialect
        script = posixpath.join(info.multimodal_dir, info.visual_builder)
        argv = ctx.python(script) + ["--model_type", self.visual_model_type(ctx), "--model_path", ctx.layout.hf_dir]
        if info.engine_layout == "unified":
            out = posixpath.join(ctx.layout.engine_dir, "vision")
            argv += ["--output_dir", out]
        else:
            out = posixpath.join(info.cwd, ctx.layout.visual_dir_split)
        if ctx.derived.visual_max_batch_size != ctx.dialect.visual_builder_default_batch:  # else the builder's own
            argv += ["--max_batch_size", str(ctx.derived.visual_max_batch_size)]
        argv += self.visual_extra_args(ctx)
        return ctx.step("build-visual", argv, tool=script, gpus=1, inputs=[ctx.layout.hf_dir], outputs=[out]), out

    def visual_extra_args(self, ctx: PlanContext) -> list[str]:
        return []

    def sizing_flag_for_output(self, ctx: PlanContext, *, decoder_input_len: int | None = None) -> list[str]:
        """--max_output_len (0.9) or --max_seq_len (1.2), from derived values."""
        if ctx.dialect.uses_max_seq_len:
            seq = ctx.derived.max_seq_len if decoder_input_len is None else decoder_input_len + ctx.derived.max_output_len
            return ["--max_seq_len", str(seq)]
        return ["--max_output_len", str(ctx.derived.max_output_len)]


class DecoderOnlyFamily(ModelFamily):
    """Families whose LLM is decoder-only (OPT, LLaMA): visual features are prepended as a prompt table."""

    emit_beam_width: ClassVar[bool] = False
    """Always pass --max_beam_width (the seed's OPT commands do; its LLaMA ones don't)."""
    release_converter: ClassVar[bool] = False
    """1.2 plans convert with the release's own convert_checkpoint.py / quantize.py, as in 0.9 (the LLM has no
    ``vlmforge checkpoint`` writer, e.g. Qwen2-VL's M-RoPE LLM)."""

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        return []

    def converter_kind(self, spec: BuildSpec) -> str:
        """Which script_dirs entry converts this spec's LLM: :attr:`llm_kind` (InternVL's depends on the checkpoint)."""
        return self.llm_kind

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        """1.2 plans write the checkpoint with ``vlmforge checkpoint``: refuse what its writer cannot produce."""
        if info.dialect is not Dialect.V0_9 and not self.release_converter:
            check_checkpoint_support(spec, self.llm_kind)

    def llm_build_flags(self, ctx: PlanContext) -> list[str]:
        spec = ctx.spec
        gemm = "auto" if spec.quantization.method is QuantMethod.FP8 and ctx.dialect.uses_max_seq_len else spec.dtype.value
        flags = ["--gemm_plugin", gemm]
        if ctx.derived.use_fused_mlp:
            flags += ["--use_fused_mlp"] if ctx.dialect.dialect is Dialect.V0_9 else ["--use_fused_mlp", "enable"]
        if self.emit_beam_width or spec.limits.max_beam_width != 1:
            flags += ["--max_beam_width", str(spec.limits.max_beam_width)]
        return flags

    def convert_step(self, ctx: PlanContext) -> Step:
        """The TensorRT-LLM checkpoint. 1.2: ``vlmforge checkpoint`` (ModelOpt, or vlmforge's own converter where
        ModelOpt has no exporter), verified by reading it back, on any machine with torch. 0.9: the seed's scripts."""
        spec = ctx.spec
        hf_dir, ckpt = ctx.layout.hf_dir, ctx.layout.checkpoint_dir
        if ctx.dialect.dialect is not Dialect.V0_9 and not self.release_converter:
            report = checkpoint_report(ctx.layout)
            argv = checkpoint_argv(spec, hf_dir, ckpt, report)
            return ctx.step("checkpoint", argv, tool="vlmforge", gpus=1 if spec.quantization.needs_calibration else 0,
                            inputs=[hf_dir], outputs=[ckpt, report])
        info = ctx.dialect
        quant = spec.quantization
        parallel: list[str] = []
        if spec.parallel.tp > 1:
            parallel += ["--tp_size", str(spec.parallel.tp)]
        if spec.parallel.pp > 1:
            parallel += ["--pp_size", str(spec.parallel.pp)]
        if quant.needs_calibration:
            qformat = "full_prec" if quant.method is QuantMethod.NONE else quant.method.value
            argv = ctx.python(info.quantize_script) + [
                "--model_dir", hf_dir, "--output_dir", ckpt, "--dtype", spec.dtype.value,
                "--qformat", qformat, "--calib_size", str(quant.calibration.size),
            ]
            if quant.kv_cache_dtype is not KvCacheDtype.AUTO:
                argv += ["--kv_cache_dtype", quant.kv_cache_dtype.value]
            return ctx.step("quantize", argv + parallel, tool=info.quantize_script, gpus=1, inputs=[hf_dir],
                            outputs=[ckpt])
        script = posixpath.join(info.script_dirs[self.converter_kind(spec)], "convert_checkpoint.py")
        argv = ctx.python(script) + self.convert_extra_args(ctx) + [
            "--model_dir", hf_dir, "--output_dir", ckpt, "--dtype", spec.dtype.value,
        ] + parallel
        if quant.method.weight_only:
            argv += ["--use_weight_only", "--weight_only_precision", quant.method.value.removesuffix("_wo")]
        return ctx.step("convert", argv, tool=script, inputs=[hf_dir], outputs=[ckpt])

    def llm_step(self, ctx: PlanContext) -> tuple[Step, str]:
        derived = ctx.derived
        ckpt = ctx.layout.checkpoint_dir
        out = posixpath.join(ctx.layout.engine_dir, "llm") if ctx.dialect.engine_layout == "unified" else ctx.layout.engine_dir
        argv = ["trtllm-build", "--checkpoint_dir", ckpt, "--output_dir", out] + self.llm_build_flags(ctx) + [
            "--max_batch_size", str(ctx.spec.limits.max_batch_size),
            "--max_input_len", str(derived.max_input_len),
            *self.sizing_flag_for_output(ctx),
            "--max_multimodal_len", str(derived.max_multimodal_len),
        ]
        return ctx.step("build-llm", argv, tool="trtllm-build", gpus=1, inputs=[ckpt], outputs=[out]), out

    def trtllm_steps(self, ctx: PlanContext) -> list[Step]:
        steps = self.fetch_steps(ctx)
        steps.append(self.convert_step(ctx))
        llm, llm_dir = self.llm_step(ctx)
        visual, visual_dir = self.visual_step(ctx)
        steps += [llm, visual]
        if ctx.dialect.engine_layout == "unified":
            engine_args = ["--engine_dir", ctx.layout.engine_dir]
        else:
            engine_args = ["--visual_engine_dir", ctx.layout.visual_dir_split, "--llm_engine_dir", llm_dir]
        steps.append(self.validate_step(ctx, engine_args, [llm_dir, visual_dir]))
        return steps


class EncoderDecoderFamily(ModelFamily):
    """Families whose LLM is an encoder-decoder (T5, BART): converted by examples/enc_dec."""

    encoder_decoder: ClassVar[bool] = True
    llm_kind: ClassVar[str] = "enc_dec"
    builds_encoder: ClassVar[bool] = True
    """Nougat's encoder is the visual Swin: only the decoder is a TensorRT-LLM engine."""
    context_fmha_disable: ClassVar[bool] = False

    def convert_model_type(self, ctx: PlanContext) -> str:
        raise NotImplementedError

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        return []

    def plugin_flags(self, ctx: PlanContext) -> list[str]:
        dtype = ctx.spec.dtype.value
        if ctx.dialect.dialect is Dialect.V0_9:
            flags = ["--paged_kv_cache", "disable", "--moe_plugin", "disable", "--enable_xqa", "disable",
                     "--use_custom_all_reduce", "disable"]
        else:
            flags = ["--kv_cache_type", "continuous", "--moe_plugin", "disable"]
        flags += ["--gemm_plugin", dtype, "--bert_attention_plugin", dtype, "--gpt_attention_plugin", dtype,
                  "--remove_input_padding", "enable"]
        if self.context_fmha_disable:
            flags += ["--context_fmha", "disable"]
        return flags + ["--max_beam_width", str(ctx.spec.limits.max_beam_width)]

    def checkpoint_component(self, ctx: PlanContext, component: str) -> str:
        root = posixpath.join(ctx.layout.workspace, "trt_models", ctx.spec.name, ctx.layout.variant)
        if ctx.dialect.dialect is Dialect.V0_9:
            return posixpath.join(root, f"tp{ctx.spec.parallel.tp}", f"pp{ctx.spec.parallel.pp}", component)
        return posixpath.join(root, component)

    def trtllm_steps(self, ctx: PlanContext) -> list[Step]:
        spec, derived, info = ctx.spec, ctx.derived, ctx.dialect
        steps = self.fetch_steps(ctx)
        hf_dir = ctx.layout.hf_dir
        ckpt_root = posixpath.join(ctx.layout.workspace, "trt_models", spec.name, ctx.layout.variant)
        script = posixpath.join(info.script_dirs["enc_dec"], "convert_checkpoint.py")
        argv = ctx.python(script) + ["--model_type", self.convert_model_type(ctx), "--model_dir", hf_dir,
                                     "--output_dir", ckpt_root, "--tp_size", str(spec.parallel.tp),
                                     "--pp_size", str(spec.parallel.pp)]
        if info.dialect is Dialect.V0_9:
            argv += ["--weight_data_type", "float32"]
        argv += ["--dtype", spec.dtype.value] + self.convert_extra_args(ctx)
        steps.append(ctx.step("convert", argv, tool=script, inputs=[hf_dir], outputs=[ckpt_root]))

        llm_root = posixpath.join(ctx.layout.engine_dir, "llm") if info.engine_layout == "unified" else ctx.layout.engine_dir
        built: list[str] = []
        if self.builds_encoder:
            enc_ckpt, enc_out = self.checkpoint_component(ctx, "encoder"), posixpath.join(llm_root, "encoder")
            argv = ["trtllm-build", "--checkpoint_dir", enc_ckpt, "--output_dir", enc_out] + self.plugin_flags(ctx)
            argv += ["--max_batch_size", str(spec.limits.max_batch_size)]
            if not info.uses_max_seq_len:
                argv += ["--max_output_len", str(derived.max_output_len)]
            argv += ["--max_input_len", str(derived.max_input_len), "--max_multimodal_len", str(derived.max_multimodal_len)]
            steps.append(ctx.step("build-encoder", argv, tool="trtllm-build", gpus=1, inputs=[enc_ckpt], outputs=[enc_out]))
            built.append(enc_out)
        dec_ckpt, dec_out = self.checkpoint_component(ctx, "decoder"), posixpath.join(llm_root, "decoder")
        argv = ["trtllm-build", "--checkpoint_dir", dec_ckpt, "--output_dir", dec_out] + self.plugin_flags(ctx)
        argv += ["--max_batch_size", str(spec.limits.max_batch_size)]
        argv += self.sizing_flag_for_output(ctx, decoder_input_len=self.decoder_input_len(ctx))
        argv += ["--max_input_len", str(self.decoder_input_len(ctx)),
                 "--max_encoder_input_len", str(derived.max_encoder_input_len)]
        steps.append(ctx.step("build-decoder", argv, tool="trtllm-build", gpus=1, inputs=[dec_ckpt], outputs=[dec_out]))
        built.append(dec_out)

        visual, visual_dir = self.visual_step(ctx)
        steps.append(visual)
        if info.engine_layout == "unified":
            engine_args = ["--engine_dir", ctx.layout.engine_dir]
        else:
            engine_args = ["--visual_engine_dir", ctx.layout.visual_dir_split, "--llm_engine_dir", llm_root]
        steps.append(self.validate_step(ctx, engine_args, built + [visual_dir]))
        return steps

    def decoder_input_len(self, ctx: PlanContext) -> int:
        """Decoder prompt length: 1 (the decoder start token) for both seed families."""
        return 1

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        if spec.parallel.pp > 1 and info.dialect is Dialect.V0_9:
            raise PlanError("parallel.pp: the 0.9 multimodal runner has no pipeline parallelism for encoder-decoder models")


def wrap_language_model(model: Any, llm_class: Any, **config: Any) -> Any:
    """``llm_class(text_config)`` around ``model``'s own language model and head (shared, not copied; nothing is
    allocated for the two submodules it replaces), with ``config``'s attributes set on the text config and the
    generation ids taken from the full model. What every decoder-only family's ``extract_llm`` does."""
    import copy

    import torch

    from vlmforge.modeling.devices import model_dtype

    text_config = copy.deepcopy(model.config.text_config)
    text_config.dtype = model_dtype(model.model.language_model)
    for key, value in config.items():
        setattr(text_config, key, value)
    cls = llm_class(text_config) if not isinstance(llm_class, type) else llm_class
    with torch.device("meta"):
        llm = cls(text_config)
    llm.model = model.model.language_model
    llm.lm_head = model.lm_head
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model.generation_config, key, None)
        setattr(llm.generation_config, key, value if value is not None else getattr(text_config, key, None))
    return llm.eval()


def expand_image_tokens(tokenizer: Any, prompt: str, token: str, counts: list[int], what: str) -> Any:
    """The prompt's ids with its k-th ``token`` repeated ``counts[k]`` times (one placeholder per image, in order, as
    the families' processors expand them); ValueError naming ``what`` (the family's prompt) otherwise."""
    if prompt.count(token) != len(counts):
        exactly = "exactly one" if len(counts) == 1 else f"exactly {len(counts)}"
        raise ValueError(f"a {what} prompt for {len(counts)} image{'s' if len(counts) > 1 else ''} holds {exactly} "
                         f"{token}, one per image in order: {prompt!r}")
    head, *tails = prompt.split(token)
    expanded = head + "".join(token * count + tail for count, tail in zip(counts, tails, strict=True))
    return tokenizer(expanded, return_tensors="pt").input_ids

