"""Gemma 3 (google/gemma-3-4b-it, -12b-it, -27b-it): SigLIP-So400m at 896x896 + pooled projector + Gemma3 text LLM.

transformers-5 layout of ``Gemma3ForConditionalGeneration`` (what the hf toolchain takes apart)::

    model.model.vision_tower          SiglipVisionModel (896/14 = 64x64 patches)
    model.model.multi_modal_projector Gemma3MultiModalProjector (4x4 average pool: 16x16 = 256 tokens, RMSNorm, matmul)
    model.model.language_model        Gemma3TextModel (no head; sliding-window and global layers)
    model.lm_head                     Linear (tied to the token embedding)

Every image is resized to one size and gives ``mm_tokens_per_image`` (256) tokens: the visual engine is one fixed-size
ONNX module, tower + projector. The processor writes each image as ``\\n\\n<start_of_image>`` + 256
``<image_soft_token>`` + ``<end_of_image>\\n\\n`` in place of the prompt's ``<start_of_image>``.

Two things a naive port gets silently wrong, both kept here:

- **The image tokens attend to each other bidirectionally during the prefill** (each image's run of soft tokens is one
  block; transformers builds that mask from ``token_type_ids`` in ``Gemma3Model.forward``, causal elsewhere). The
  family's LLM (:func:`image_text_lm_class`) is a ``Gemma3ForCausalLM`` that takes the same ``token_type_ids`` and
  builds the same masks (``Gemma3ForConditionalGeneration.create_masks_for_generate``); the family's prefix carries
  them (``LlmPrefix.token_type_ids``), and the runner's prefill passes them on. Decoding steps are causal, as in
  transformers (a new token is no image token).
- **Text embeddings are scaled by sqrt(hidden), image features are not**: the prefix is the LLM's own (scaling)
  embedding of the prompt ids with the projector's rows spliced in afterwards, as ``Gemma3Model`` does.

TensorRT-LLM: 1.2's engine builder (``build_multimodal_engine.py``, ``trtllm-build``) has no Gemma3 multimodal
support, so a trtllm plan is refused with that reason; the PyTorch backend (``vlmforge deploy --backend trtllm-serve``)
serves ``Gemma3ForConditionalGeneration`` checkpoints as they are. torch and transformers are imported inside the hf
hooks only: the spec and plan layers import this module without them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError
from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts, DecoderOnlyFamily, wrap_language_model
from vlmforge.plans.model import DialectInfo, PlanContext
from vlmforge.specs.schema import BuildSpec, Dialect

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from vlmforge.families.contract import ImageFeatures
    from vlmforge.modeling.generation import LlmPrefix

BOI_TOKEN = "<start_of_image>"
"""What a prompt holds per image (the processor expands it to the image's full sequence)."""
EOI_TOKEN = "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"
START_TURN, END_TURN = "<start_of_turn>", "<end_of_turn>"
PROMPT_TEMPLATE = START_TURN + "user\n{images}{text}" + END_TURN + "\n" + START_TURN + "model\n"
"""gemma-3-*-it's chat template for one user turn (its ``<bos>`` is the tokenizer's): the images, then the text."""
DEFAULT_USER_TEXT = "Describe the image."
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}{% endif %}"
    "{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
"""The tiny model's chat template: gemma-3-it's turns, a user turn's images before its text (:data:`PROMPT_TEMPLATE`);
trtllm-serve takes images through the chat API only, so a model folder it serves needs one."""
NO_ENGINE_REASON = (
    "TensorRT-LLM 1.2's engine builder has no Gemma3 multimodal support (build_multimodal_engine.py has no gemma3 "
    "--model_type and the 1.2 multimodal runner no Gemma3 path; its bidirectional image-token mask is not in the "
    "engine's attention either); only TensorRT-LLM's PyTorch backend serves Gemma3ForConditionalGeneration. Build it "
    "with the hf toolchain (vlmforge build MODEL --toolchain hf) and deploy it with --backend trtllm-serve (or the "
    "vlmforge runner)")

# The tiny test model (tiny://gemma3): (32/4)^2 = 64 patches pooled 2x2 to 16 tokens (Gemma 3: 4096 pooled 4x4 to 256).
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 4
TINY_TOKENS = 16
TINY_VOCAB_SIZE = 336
TINY_SLIDING_WINDOW = 12
"""Smaller than the 16-token image block and the prompt: the sliding layers' window cuts through both (Gemma 3:
1024)."""
TINY_NUM_ATTENTION_HEADS = 4
TINY_INIT = 0.06
"""initializer_range of the tiny model: 0.08 left float16 near-ties of 0.0001 in the two-image validation request (its
agreement fell to 0.8); at 0.06 the smallest top-2 gap is 0.02 and the image still moves the logits."""
TINY_PROJECTION_INIT = 0.4
"""Std of the tiny projector's matrix (transformers starts it at zero): image rows of rms about 2.3 (0.4 x sqrt(32))
beside text embeddings of about 0.5 (0.06 x sqrt(64)), so a wrong image moves the first logits by 0.5 or more."""
TINY_SPECIALS = (START_TURN, END_TURN, BOI_TOKEN, EOI_TOKEN, IMAGE_SOFT_TOKEN)


def _tiny_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    from vlmforge.families.tinykit import train_bpe_tokenizer

    tok = train_bpe_tokenizer(vocab_size=320, template="bos")
    tok.add_special_tokens(list(TINY_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_SOFT_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
        model_input_names=["input_ids", "attention_mask"])


def _tiny_processor() -> Any:
    from transformers import Gemma3Processor

    from vlmforge.families.tinykit import pil_image_processor

    image_processor = pil_image_processor(
        "Gemma3ImageProcessor", size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Gemma3Processor(image_processor=image_processor, tokenizer=_tiny_tokenizer(), image_seq_length=TINY_TOKENS,
                           chat_template=TINY_CHAT_TEMPLATE)


def _tiny_config(tokenizer: Any) -> Any:
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in TINY_SPECIALS}
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, layer_norm_eps=1e-6)
    text = Gemma3TextConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=TINY_NUM_ATTENTION_HEADS, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=TINY_SLIDING_WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256, bos_token_id=BOS_ID, eos_token_id=[EOS_ID, ids[END_TURN]], pad_token_id=PAD_ID,
        initializer_range=TINY_INIT)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TINY_TOKENS,
                        boi_token_index=ids[BOI_TOKEN], eoi_token_index=ids[EOI_TOKEN],
                        image_token_index=ids[IMAGE_SOFT_TOKEN], initializer_range=TINY_INIT)


@cache
def _visual_module_class() -> type:
    import torch

    class Gemma3VisualModule(torch.nn.Module):
        """pixel_values [B, 3, S, S] -> pooled, projected image features [B, mm_tokens_per_image, llm_hidden]
        (``Gemma3Model.get_image_features``: the tower's last hidden state through the projector)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.vision_tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            pixel_values = pixel_values.to(self.vision_tower.dtype)
            hidden = self.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
            return self.projector(hidden)

    return Gemma3VisualModule


@cache
def image_text_lm_class() -> type:
    """``Gemma3ForCausalLM`` that also takes ``token_type_ids`` (1 on image tokens): given them, it builds the masks
    ``Gemma3ForConditionalGeneration.create_masks_for_generate`` builds (image blocks bidirectional, causal elsewhere,
    sliding windows kept). Its forward keeps the parent's signature (the runner reads ``cache``/``past_key_values`` and
    ``logits_to_keep`` from it) and works with transformers 5 and 4.57 (NVIDIA's TensorRT-LLM 1.2 image)."""
    import inspect

    import torch
    from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    parent = inspect.signature(Gemma3ForCausalLM.forward)
    cache_name = "cache" if "cache" in parent.parameters else "past_key_values"
    make_masks = Gemma3ForConditionalGeneration.create_masks_for_generate
    mask_params = set(inspect.signature(make_masks).parameters)
    params = list(parent.parameters.values())
    extra = inspect.Parameter("token_type_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    signature = parent.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if i else p
                                           for i, p in enumerate(params[:at])] + [extra] + params[at:])

    class Gemma3ImageTextLM(Gemma3ForCausalLM):
        """The language model of a Gemma3 VLM, fed prompt embeddings with the image rows spliced in."""

        def forward(self, token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
            if token_type_ids is not None and not isinstance(kwargs.get("attention_mask"), dict):
                embeds = kwargs.get("inputs_embeds")
                if embeds is None:
                    embeds = kwargs["inputs_embeds"] = self.get_input_embeddings()(kwargs.pop("input_ids"))
                cache = kwargs.get(cache_name)
                if kwargs.get("use_cache") is not False and cache is None:
                    cache = kwargs[cache_name] = DynamicCache(config=self.config)  # as generate() makes it
                start = cache.get_seq_length() if cache is not None else 0
                steps = torch.arange(start, start + embeds.shape[1], device=embeds.device)
                if kwargs.get("position_ids") is None:
                    kwargs["position_ids"] = steps[None]
                if "cache_position" in mask_params and kwargs.get("cache_position") is None:
                    kwargs["cache_position"] = steps
                given = {"config": self.config, "inputs_embeds": embeds, "input_embeds": embeds,
                         "attention_mask": kwargs.get("attention_mask"), "cache": cache, "past_key_values": cache,
                         "position_ids": kwargs["position_ids"], "cache_position": steps,
                         "token_type_ids": token_type_ids.to(embeds.device)}
                kwargs["attention_mask"] = make_masks(**{k: v for k, v in given.items() if k in mask_params})
            return super().forward(**kwargs)

    Gemma3ImageTextLM.forward.__signature__ = signature  # type: ignore[attr-defined]
    return Gemma3ImageTextLM


@register_family
class Gemma3Family(DecoderOnlyFamily):
    """Gemma 3: 256 pooled SigLIP tokens per 896x896 image, bidirectional within each image during the prefill."""

    name: ClassVar[str] = "gemma3"
    description: ClassVar[str] = "Gemma 3 (google/gemma-3-*-it), SigLIP 896 + pooled projector + Gemma3 LLM"
    default_num_visual_features: ClassVar[int] = 256
    llm_kind: ClassVar[str] = "gemma3"
    tiny_source: ClassVar[str | None] = "tiny://gemma3"
    quantizable: ClassVar[bool] = True
    plan_dialects: ClassVar[tuple[Dialect, ...]] = ()
    images_per_prompt_limit: ClassVar[int | None] = None  # one <start_of_image> per image, each its own block
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = (
        "vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        raise PlanError(f"{spec.name}: no TensorRT-LLM {info.release} engine path: {NO_ENGINE_REASON}")

    def visual_model_type(self, ctx: PlanContext) -> str:
        raise PlanError(NO_ENGINE_REASON)

    # --- hf toolchain -----------------------------------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        import torch
        from transformers import Gemma3ForConditionalGeneration

        from vlmforge.modeling.devices import seed_all

        processor = _tiny_processor()
        seed_all(seed)
        model = Gemma3ForConditionalGeneration(_tiny_config(processor.tokenizer)).eval()
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, TINY_PROJECTION_INIT)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """mm_tokens_per_image (256) and the text model's attention heads."""
        text = config.get("text_config") or {}
        return ArchitectureFacts(int(config.get("mm_tokens_per_image", 256)), int(text.get("num_attention_heads", 8)))

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """gemma-3-it's user turn, one ``<start_of_image>`` per image before the text; text that already holds
        ``<start_of_image>`` is kept as it is (its count is checked against the images')."""
        self.check_image_count(num_images)
        text = DEFAULT_USER_TEXT if text is None else text
        if BOI_TOKEN in text:
            return text
        return PROMPT_TEMPLATE.format(images=BOI_TOKEN * num_images, text=text)

    def visual_module(self, model: Any) -> torch.nn.Module:
        return _visual_module_class()(model).eval()

    def extract_llm(self, model: Any) -> Any:
        """A :func:`image_text_lm_class` around the full model's own language model and head (shared, not copied);
        transformers 4.57's mask reads ``mm_tokens_per_image`` from the text config."""
        return wrap_language_model(model, image_text_lm_class(), mm_tokens_per_image=model.config.mm_tokens_per_image)

    def llm_class(self) -> type:
        return image_text_lm_class()

    def _prompt_ids(self, processor: Any, prompt: str | None, counts: list[int]) -> Any:
        """The prompt's ids, each ``<start_of_image>`` expanded to the image's full sequence (what Gemma3Processor
        does); every image gives the processor's image_seq_length tokens."""
        prompt = self.format_prompt(prompt, len(counts))
        assert prompt is not None
        if prompt.count(BOI_TOKEN) != len(counts):
            raise ValueError(f"a Gemma3 prompt for {len(counts)} image(s) holds exactly {len(counts)} {BOI_TOKEN}, one "
                             f"per image in order: {prompt!r}")
        wrong = [count for count in counts if count != processor.image_seq_length]
        if wrong:
            raise ValueError(f"Gemma3 images give {processor.image_seq_length} tokens each (the processor's "
                             f"image_seq_length), got {wrong}")
        expanded = prompt.replace(BOI_TOKEN, processor.full_image_sequence)
        return processor.tokenizer(expanded, return_tensors="pt").input_ids

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        return int(self._prompt_ids(processor, prompt, self.visual_counts(num_visual_features)).shape[1])

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """The LLM's own (sqrt(hidden)-scaled) embeddings of the prompt, the image soft tokens replaced by the images'
        rows (unscaled, as ``Gemma3Model`` splices them), and their ``token_type_ids`` for the bidirectional mask."""
        import torch

        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        parts = self.image_features(features)
        device = model_device(llm)
        ids = self._prompt_ids(processor, prompt, [int(part.shape[1]) for part in parts]).to(device)
        embeds = llm.get_input_embeddings()(ids)
        image = ids == processor.tokenizer.image_token_id
        rows = torch.cat([part.to(device, embeds.dtype) for part in parts], dim=1)
        embeds = embeds.masked_scatter(image.unsqueeze(-1), rows)
        eos = llm.generation_config.eos_token_id
        eos = eos if eos is not None else llm.config.eos_token_id
        return LlmPrefix("decoder", embeds, torch.ones_like(ids), eos_ids(eos), token_type_ids=image.long())
