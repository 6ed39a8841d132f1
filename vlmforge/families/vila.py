"""VILA (Efficient-Large-Model/vila-*, VILA1.5-*): a LLaMA, a CLIP or SigLIP tower and a small projector.

hf toolchain: no VILA code at all. :mod:`vlmforge.families.vila_config` reads what a VILA 1.0 or VILA1.5
checkpoint declares, :mod:`vlmforge.families.vila_model` loads it into ``LlamaForCausalLM``,
``CLIPVisionModel`` / ``SiglipVisionModel`` and vlmforge's own projector (:class:`~vlmforge.families.vila_model.VilaModel`),
and this module does VILA's processing (``llava/mm_utils.py``, ``llava/conversation.py``, ``llava/eval/run_vila.py``):

* the user's text gets ``<image>\\n`` in front unless it holds ``<image>`` (:meth:`VilaFamily.format_prompt`), then
  the checkpoint's chat template around it (vicuna_v1, llama_3 or hermes-2, told by the tokenizer's special tokens
  or ``config.json``'s ``vlmforge.conv_mode``);
* ``<image>`` is not a token: the prompt is tokenized in chunks split at it, one BOS kept, and the image's
  feature rows go where it was;
* images are resized (``image_aspect_ratio: resize``) or padded to a square with the mean colour (``pad``) before
  the tower's image processor.

The validation reference has no transformers class to come from: it is the :class:`VilaModel` assembly in
float32, fed the same prompt (:meth:`VilaFamily.reference_generate`, spliced the way TensorRT-LLM's prompt table
does and decoded by transformers' ``generate``). trtllm toolchain: the plan is unchanged; TensorRT-LLM's visual
builder and LLaMA converter import VILA's code (``--vila_path``), so the plan fetches it.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts, DecoderOnlyFamily
from vlmforge.families.vila_config import CONV_TEMPLATES, ConvTemplate, conv_mode_for
from vlmforge.plans.model import PlanContext, Step
from vlmforge.specs.schema import Dialect

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.families.contract import ImageFeatures
    from vlmforge.modeling.generation import GenResult, LlmPrefix

# The seed's source patches (0.9 dialect): load the vision tower eagerly, and make AWQ work without
# replacing Hugging Face's LLaMA implementation.
SEED_PATCHES: tuple[tuple[str, str, str], ...] = (
    ("patch-delay-load", "s/delay_load=True/delay_load=False/g", "llava/model/llava_arch.py"),
    (
        "patch-attention-mask",
        "/vision_tower = self.get_vision_tower()/a \\\n    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)",
        "llava/model/llava_arch.py",
    ),
    (
        "patch-seqlens",
        "s/seqlens_in_batch=sorted_seqlens_in_batch/#seqlens_in_batch=sorted_seqlens_in_batch/g",
        "llava/model/language_model/llava_llama.py",
    ),
)

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
"""VILA's sentinel id for the image in a tokenized prompt (llava/constants.py)."""
DEFAULT_USER_TEXT = "Describe the image."
PROCESSOR_FILE = "vila_processor.json"
"""Written beside the tokenizer and image processor by :meth:`VilaProcessor.save_pretrained`."""


class VilaProcessor:
    """VILA's processing inputs: the LLM's tokenizer, the tower's image processor, ``image_aspect_ratio`` and the
    chat template (``conv_mode``)."""

    def __init__(self, tokenizer: Any, image_processor: Any, image_aspect_ratio: str | None, conv_mode: str) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_aspect_ratio, self.conv_mode = image_aspect_ratio, conv_mode_for(tokenizer, conv_mode)

    @property
    def template(self) -> ConvTemplate:
        return CONV_TEMPLATES[self.conv_mode]

    def chat_prompt(self, query: str) -> str:
        return self.template.before + query + self.template.after

    @property
    def stop_token_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id}
        if self.template.stop is not None:
            ids.add(self.tokenizer.convert_tokens_to_ids(self.template.stop))
        return frozenset(i for i in ids if isinstance(i, int) and i != self.tokenizer.unk_token_id)

    def save_pretrained(self, out_dir: Path) -> None:
        out = Path(out_dir)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        (out / PROCESSOR_FILE).write_text(json.dumps({"image_aspect_ratio": self.image_aspect_ratio,
                                                      "conv_mode": self.conv_mode}, indent=2) + "\n")


def tokenizer_image_token(prompt: str, tokenizer: Any) -> list[int]:
    """``llava/mm_utils.py``: each chunk between ``<image>`` tokenized on its own, the first chunk's BOS kept once
    (and the first id of every chunk dropped when there is one), :data:`IMAGE_TOKEN_INDEX` where ``<image>`` was."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """The image centred on a square of ``fill`` (``llava/mm_utils.py``)."""
    from PIL import Image as PilImage

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    out = PilImage.new(image.mode, (side, side), fill)
    out.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return out


def _clip_image_processor(**settings: Any) -> Any:
    """CLIP's PIL image processor: ``CLIPImageProcessorPil`` in transformers 5, ``CLIPImageProcessor`` in 4 (the
    TensorRT-LLM image's, where the trtllm flow loads this family's reference)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(**settings)


@register_family
class VilaFamily(DecoderOnlyFamily):
    """VILA: the visual builder imports VILA's own code (--vila_path); the hf toolchain needs none of it."""

    name: ClassVar[str] = "vila"
    description: ClassVar[str] = "VILA 1.0 / VILA1.5 (Efficient-Large-Model/*), CLIP or SigLIP + projector + LLaMA"
    default_num_visual_features: ClassVar[int] = 576
    llm_kind: ClassVar[str] = "llama"
    fused_mlp_default: ClassVar[bool] = True
    supports_fused_mlp: ClassVar[bool] = True
    needs_code_source: ClassVar[bool] = True
    default_code_source: ClassVar[str] = "https://github.com/Efficient-Large-Model/VILA.git"
    code_dir_name: ClassVar[str] = "VILA"
    golden_prompt: ClassVar[str | None] = "Please describe the traffic condition."
    tiny_source: ClassVar[str | None] = "tiny://vila"
    extra_tiny_sources: ClassVar[tuple[str, ...]] = ("tiny://vila1.0",)
    quantizable: ClassVar[bool] = True
    # VILA 1.0 keeps the tower and projector in the LLaMA's shards; VILA1.5 in vision_tower/ (transformers-4 names
    # vision_model.*, transformers-5 ones embeddings./encoder./...) and mm_projector/ (layers.*). The LLM's tensors
    # (model.embed_tokens/layers/norm, lm_head) match none of these.
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = (
        "model.mm_projector.", "model.vision_tower.", "vision_model.", "layers.",
        "embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.", "head.",
    )
    llm_config_keys: ClassVar[tuple[str, ...]] = (
        "llm_cfg",  # VILA1.5; VILA 1.0's LLaMA keys are top-level:
        "vocab_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act", "attention_bias",
        "attention_dropout", "mlp_bias", "head_dim", "pretraining_tp", "tie_word_embeddings", "use_cache",
        "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "torch_dtype", "dtype", "model_dtype",
        "model_max_length", "tokenizer_model_max_length", "tokenizer_padding_side", "transformers_version",
    )
    visual_config_files: ClassVar[tuple[str, ...]] = (
        "vision_tower/config.json", "vision_tower/preprocessor_config.json", "mm_projector/config.json",
    )

    # --- trtllm plan (the seed's; unchanged) ---------------------------------------------------------

    def code_path(self, ctx: PlanContext) -> str:
        source = ctx.spec.code_source or ""
        return ctx.layout.code_dir if "://" in source or source.endswith(".git") else source

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        source = ctx.spec.code_source or ""
        code = self.code_path(ctx)
        steps: list[Step] = []
        if code == ctx.layout.code_dir:
            steps.append(ctx.step("fetch-code", ["git", "clone", "--", source, code], tool="git", outputs=[code]))
        if ctx.dialect.dialect is Dialect.V0_9:
            steps += super().fetch_steps(ctx)
            for name, script, relpath in SEED_PATCHES:
                target = posixpath.join(code, relpath)
                steps.append(ctx.step(name, ["sed", "-i", "--", script, target], tool="sed", edits=[target]))
        else:
            requirements = posixpath.join(ctx.dialect.cwd, "requirements-vila.txt")
            steps.append(ctx.step("install-code-deps", ["python", "-m", "pip", "install", "-r", "requirements-vila.txt"],
                                  tool="pip", inputs=[requirements]))
            steps += super().fetch_steps(ctx)
        return steps

    def visual_model_type(self, ctx: PlanContext) -> str:
        return "vila"

    def visual_extra_args(self, ctx: PlanContext) -> list[str]:
        return ["--vila_path", self.code_path(ctx)]

    # --- hf toolchain ---------------------------------------------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        """tiny://vila: the VILA1.5 layout."""
        from vlmforge.families.vila_tiny import write_tiny_vila15

        write_tiny_vila15(Path(out_dir), seed)

    def make_tiny_source(self, source: str, out_dir: Path, seed: int = 0) -> None:
        if source == "tiny://vila1.0":
            from vlmforge.families.vila_tiny import write_tiny_vila10

            write_tiny_vila10(Path(out_dir), seed)
        else:
            super().make_tiny_source(source, out_dir, seed)

    def hf_model_class(self) -> type:
        """vlmforge's own assembly of transformers modules (VILA has no transformers class)."""
        from vlmforge.families.vila_model import VilaModel

        return VilaModel

    def load_model(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu") -> Any:
        from vlmforge.families.vila_model import load_vila

        return load_vila(Path(model_dir), dtype, device)

    def missing_processor_files(self, model_dir: Path) -> list[str]:
        """The tokenizer (llm/ in VILA1.5, the top level in VILA 1.0 and in saved processors) and the image processor
        (VILA1.5: vision_tower/; VILA 1.0's comes from its named tower when the folder has none)."""
        root = Path(model_dir)
        tokenizer = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if (root / PROCESSOR_FILE).is_file():
            wanted = [("", tokenizer), ("", ("preprocessor_config.json",))]
        elif (root / "llm").is_dir():
            wanted = [("llm/", tokenizer), ("vision_tower/", ("preprocessor_config.json",))]
        else:
            wanted = [("", tokenizer)]
        return [" or ".join(sub + name for name in names) for sub, names in wanted
                if not any((root / sub / name).is_file() for name in names)]

    def load_processor(self, model_dir: Path) -> VilaProcessor:
        """From a saved processor (:data:`PROCESSOR_FILE`), or a VILA1.5 (``llm/``, ``vision_tower/``) or VILA 1.0
        folder (tokenizer at the top; image processor from preprocessor_config.json or the named tower)."""
        from transformers import AutoImageProcessor, AutoTokenizer, LlamaConfig

        from vlmforge.families.vila_config import KNOWN_TOWERS, parse_settings, read_config

        root = Path(model_dir)
        if (root / PROCESSOR_FILE).is_file():
            saved = json.loads((root / PROCESSOR_FILE).read_text())
            return VilaProcessor(AutoTokenizer.from_pretrained(root), AutoImageProcessor.from_pretrained(root),
                                 saved.get("image_aspect_ratio"), saved["conv_mode"])
        settings = parse_settings(read_config(root))
        if settings.layout == "vila1.5":
            tokenizer, image_processor = (AutoTokenizer.from_pretrained(root / "llm"),
                                          AutoImageProcessor.from_pretrained(root / "vision_tower"))
        else:  # the LLaMA's config: AutoTokenizer would read config.json, whose llava_llama transformers does not know
            tokenizer = AutoTokenizer.from_pretrained(root, config=LlamaConfig.from_dict(settings.llm))
            if (root / "preprocessor_config.json").is_file():
                image_processor = AutoImageProcessor.from_pretrained(root)
            else:
                assert settings.tower_name is not None
                image_processor = _clip_image_processor(**KNOWN_TOWERS[settings.tower_name].processor)
        return VilaProcessor(tokenizer, image_processor, settings.image_aspect_ratio,
                             conv_mode_for(tokenizer, settings.conv_mode))

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """Visual tokens from the tower's grid, the feature selection and the projector (VILA1.5-3b: 27x27 = 729
        -> 14x14 = 196; VILA 1.0: 24x24 = 576); heads from ``llm_cfg`` (1.5) or the top level (1.0)."""
        from vlmforge.families.vila_config import parse_settings

        settings = parse_settings(config)
        return ArchitectureFacts(settings.num_visual_features, int(settings.llm["num_attention_heads"]))

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """The user's turn as ``llava/eval/run_vila.py`` makes it: ``<image>\\n`` in front unless the text holds
        ``<image>``. The chat template, which depends on the checkpoint, is added with the processor
        (:meth:`VilaProcessor.chat_prompt`), so formatting twice changes nothing."""
        self.check_image_count(num_images)  # one image per prompt: llm_prefix splices one
        text = DEFAULT_USER_TEXT if text is None else text
        return text if IMAGE_TOKEN in text else f"{IMAGE_TOKEN}\n{text}"

    def pixel_values(self, processor: VilaProcessor, images: list[Image.Image]) -> torch.Tensor:
        """``llava/mm_utils.py`` ``process_images``: ``resize`` to the tower's size (bicubic, PIL's default for RGB)
        or ``pad`` to a square with the mean colour first, then the tower's image processor."""
        import torch
        from PIL import Image as PilImage

        image_processor, aspect = processor.image_processor, processor.image_aspect_ratio
        prepared = []
        for image in images:
            image = image.convert("RGB")
            if aspect == "resize":
                size = getattr(image_processor, "crop_size", None) or image_processor.size
                image = image.resize((size["width"], size["height"]), PilImage.Resampling.BICUBIC)
            elif aspect == "pad":
                image = expand2square(image, tuple(int(m * 255) for m in image_processor.image_mean))
            prepared.append(image)
        return image_processor(images=prepared, return_tensors="pt")["pixel_values"].to(torch.float32)

    def visual_module(self, model: Any) -> torch.nn.Module:
        return model.visual

    def extract_llm(self, model: Any) -> Any:
        """The checkpoint's own ``LlamaForCausalLM`` (VILA1.5's ``llm/``; VILA 1.0's LLaMA tensors)."""
        return model.llm

    def llm_class(self) -> type:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM

    def _prompt_ids(self, processor: VilaProcessor, prompt: str | None) -> list[int]:
        query = self.format_prompt(prompt)
        assert query is not None
        if query.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"a VILA prompt holds exactly one {IMAGE_TOKEN}: {query!r}")
        return tokenizer_image_token(processor.chat_prompt(query), processor.tokenizer)

    def prompt_length(self, processor: VilaProcessor, prompt: str | None,
                      num_visual_features: int | Sequence[int]) -> int:
        (count,) = self.visual_counts(num_visual_features)
        return len(self._prompt_ids(processor, prompt)) - 1 + count

    def llm_prefix(self, llm: Any, processor: VilaProcessor, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """The text chunks' embeddings with the image's feature rows between them (VILA's
        ``prepare_inputs_labels_for_multimodal``, one image); stops at EOS and the template's end of turn."""
        import torch

        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import LlmPrefix

        (features,) = self.image_features(features)
        ids = self._prompt_ids(processor, prompt)
        cut = ids.index(IMAGE_TOKEN_INDEX)
        device = model_device(llm)
        embed = llm.get_input_embeddings()
        before, after = (embed(torch.tensor([part], dtype=torch.long, device=device)) for part in (ids[:cut], ids[cut + 1:]))
        embeds = torch.cat([before, features.to(device, before.dtype), after], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        return LlmPrefix("decoder", embeds, mask, processor.stop_token_ids)

    def reference_generate(self, model: Any, processor: VilaProcessor, image: Image.Image | Sequence[Image.Image],
                           prompt: str | None, max_new_tokens: int) -> GenResult:
        """The float reference: :class:`VilaModel`'s tower and projector on the image, the features placed the way
        TensorRT-LLM's prompt table does (ids ``vocab_size + i`` looked up in ``[embed_tokens; features]``), and
        transformers' greedy ``generate`` on the LLM."""
        import torch

        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import ref_generate

        device = model_device(model)
        with torch.no_grad():
            features = model.visual(self.pixel_values(processor, self.image_list(image)).to(device))[0]
        vocab = model.llm.config.vocab_size
        ids: list[int] = []
        for token in self._prompt_ids(processor, prompt):
            ids += list(range(vocab, vocab + features.shape[0])) if token == IMAGE_TOKEN_INDEX else [token]
        weight = model.llm.get_input_embeddings().weight
        table = torch.cat([weight, features.to(weight.dtype)])
        embeds = table[torch.tensor(ids, device=device)].unsqueeze(0)
        inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=device),
                  "eos_token_id": sorted(processor.stop_token_ids), "pad_token_id": processor.tokenizer.pad_token_id}
        return ref_generate(model.llm, inputs, max_new_tokens)
