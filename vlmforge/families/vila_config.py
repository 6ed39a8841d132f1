"""What a VILA checkpoint declares, read from its config.json without VILA's code (no torch here).

VILA (NVlabs/VILA) is a LLaVA-style model whose parts are plain transformers modules plus a small
multimodal projector. This module reads what both published layouts declare; :mod:`vlmforge.families.vila_model`
loads their weights into those parts:

* **VILA 1.0** (vila-2.7b/7b/13b, the ``v1.0`` tag, LLaVA-1.5's layout): one folder, ``config.json`` with
  ``model_type: llava_llama``, the LLaMA keys and LLaVA's ``mm_*`` keys; shards holding the LLaMA
  (``model.*``, ``lm_head.weight``), the projector (``model.mm_projector.*``) and the CLIP tower
  (``model.vision_tower.vision_tower.vision_model.*``). ``mm_vision_tower`` names the tower by Hub id: its
  config and image processor come from :data:`KNOWN_TOWERS`.
* **VILA1.5** (VILA1.5-3b/13b, Llama-3-VILA1.5-8B, the ``vila1.5`` branch): ``config.json`` with ``llm_cfg`` /
  ``vision_tower_cfg`` / ``mm_projector_cfg`` and the sub-folders ``llm/`` (a plain ``LlamaForCausalLM`` and
  its tokenizer), ``vision_tower/`` (``SiglipVisionModel`` and its image processor) and ``mm_projector/``
  (``layers.*`` tensors). vlmforge's convert stage writes this layout for both generations.

Not covered (refused with the reason): S2 multi-scale towers (VILA1.5-3b-s2, NVILA), InternViT
(VILA1.5-40b), non-LLaMA LLMs (NVILA's Qwen2), ``mm_use_im_start_end``.

**The ``mlp_downsample`` token order.** The projector merges each 2x2 block of patches into one token. VILA's
release code for VILA1.5 (``vila1.5`` branch, commit 6b941da, May 2024: ``DownSampleBlock.flat_square``
without a final permute) lists the merged tokens *column by column*; since the NVILA release (VILA main,
commit 36f6adc, Dec 2024) the same type name lists them *row by row*, and so does TensorRT-LLM's PyTorch
VILA. VILA1.5 checkpoints were trained with the release-time code, so vlmforge runs ``mlp_downsample`` in
**column** order (:data:`MLP_DOWNSAMPLE_ORDER`); ``config.json``'s ``vlmforge.mm_downsample_token_order``
(``column`` or ``row``) overrides it, and the converted checkpoint records the order used. The ``*_fix``
types are row order by definition. Not confirmed against NVIDIA's outputs on a real checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlmforge.errors import SourceError

TokenOrder = Literal["column", "row"]
SelectFeature = Literal["patch", "cls_patch"]
Layout = Literal["vila1.5", "vila1.0"]

MLP_DOWNSAMPLE_ORDER: TokenOrder = "column"
"""Token order of ``mlp_downsample`` when config.json does not say: VILA1.5's release code (see the module doc)."""
VLMFORGE_KEY = "vlmforge"
"""config.json key of vlmforge's own settings: ``mm_downsample_token_order``, ``conv_mode``, ``source_layout``."""
TOWER_PREFIX_V10 = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX_V10 = "model.mm_projector."
LLAVA_ONLY_KEYS = ("mm_", "use_mm_proj", "tune_mm_", "freeze_mm_", "image_aspect_ratio", "image_grid_pinpoints",
                   "tokenizer_model_max_length", "tokenizer_padding_side", "s2", VLMFORGE_KEY)
"""Top-level keys of a VILA 1.0 config.json that are not the LLaMA's."""
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class KnownTower:
    """A tower VILA 1.0 names by Hub id: its CLIPVisionConfig and CLIP image processor settings."""

    config: dict[str, Any]
    processor: dict[str, Any]


def _clip(image: int, **config: Any) -> KnownTower:
    crop = {"height": image, "width": image}
    return KnownTower({"model_type": "clip_vision_model", "image_size": image, "patch_size": 14, **config},
                      {"size": {"shortest_edge": image}, "crop_size": crop, "image_mean": OPENAI_CLIP_MEAN,
                       "image_std": OPENAI_CLIP_STD, "resample": 3})


_VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
          "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TINY_CLIP_TOWER = "vlmforge/tiny-clip-vit-84"
KNOWN_TOWERS: dict[str, KnownTower] = {
    "openai/clip-vit-large-patch14-336": _clip(336, **_VIT_L),  # every VILA 1.0 checkpoint
    "openai/clip-vit-large-patch14": _clip(224, **_VIT_L),
    # tiny://vila1.0's tower (no such Hub repo: the tiny checkpoint carries its weights)
    TINY_CLIP_TOWER: _clip(84, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           projection_dim=32, hidden_act="quick_gelu"),
}
TOWER_CLASSES = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel"}
"""Vision towers this module runs (model_type -> transformers class)."""


# --- settings read from config.json --------------------------------------------------------------------


@dataclass(frozen=True)
class VilaSettings:
    """What a VILA config.json says, in one vocabulary for both layouts."""

    layout: Layout
    projector_type: str
    token_order: TokenOrder
    """Order of the merged tokens of the downsample projectors (see the module doc)."""
    select_layer: int
    """Index into the tower's hidden states (embeddings first): -2 is the second to last layer's output."""
    select_feature: SelectFeature
    """``patch`` drops the first token (CLIP's CLS), ``cls_patch`` keeps all (SigLIP has no CLS)."""
    image_aspect_ratio: str | None
    mm_hidden_size: int
    llm: dict[str, Any]
    """The LLaMA's config."""
    tower: dict[str, Any]
    """The tower's config (model_type, image_size, patch_size, hidden_size...)."""
    tower_name: str | None = None
    """VILA 1.0: ``mm_vision_tower`` (a Hub id)."""
    conv_mode: str | None = None
    """Chat template named in config.json (``vlmforge.conv_mode``); None: told by the tokenizer."""

    @property
    def tower_tokens(self) -> int:
        """Tokens the tower's hidden states hold after feature selection."""
        grid = (int(self.tower["image_size"]) // int(self.tower["patch_size"])) ** 2
        cls = 1 if self.tower["model_type"] == "clip_vision_model" else 0
        return grid + cls - (1 if self.select_feature == "patch" else 0)

    @property
    def num_visual_features(self) -> int:
        return projected_tokens(self.projector_type, self.tower_tokens)


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"unreadable config.json in {model_dir}: {exc}") from None
    if not isinstance(config, dict):
        raise SourceError(f"{model_dir}/config.json is not a JSON object")
    return config


def llm_config_v10(config: dict[str, Any]) -> dict[str, Any]:
    """The LLaMA config inside a VILA 1.0 config.json (model_type llava_llama -> llama)."""
    out = {k: v for k, v in config.items() if not k.startswith(LLAVA_ONLY_KEYS)}
    out["model_type"], out["architectures"] = "llama", ["LlamaForCausalLM"]
    return out


def parse_settings(config: dict[str, Any]) -> VilaSettings:
    """The settings of a VILA config.json; a SourceError names the key for what this module cannot run."""
    own = config.get(VLMFORGE_KEY) or {}
    if config.get("s2") or config.get("dynamic_s2"):
        raise SourceError("config.json: s2 is set: S2 multi-scale towers (VILA1.5-3b-s2, NVILA) need VILA's "
                          "s2wrapper and are not supported")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise SourceError("config.json: mm_use_im_start_end / mm_use_im_patch_token: image start/end tokens are not "
                          "supported (no released VILA checkpoint sets them)")
    if isinstance(config.get("llm_cfg"), dict):
        layout: Layout = "vila1.5"
        llm = dict(config["llm_cfg"])
        tower = config.get("vision_tower_cfg")
        if not isinstance(tower, dict):
            raise SourceError("config.json: vision_tower_cfg must be the tower's config (a mapping), as VILA1.5 saves it")
        projector = config.get("mm_projector_cfg") or {}
        kind = projector.get("mm_projector_type") if isinstance(projector, dict) else None
        tower_name = None
    elif "mm_vision_tower" in config and config.get("model_type") in ("llava_llama", "llava"):
        layout = "vila1.0"
        llm = llm_config_v10(config)
        tower_name = str(config["mm_vision_tower"])
        known = KNOWN_TOWERS.get(tower_name)
        if known is None:
            raise SourceError(f"config.json: mm_vision_tower {tower_name!r} is not a tower vlmforge knows "
                              f"({', '.join(KNOWN_TOWERS)}); VILA 1.0 checkpoints use openai/clip-vit-large-patch14-336")
        tower = known.config
        kind = config.get("mm_projector_type", "linear")
    else:
        raise SourceError("config.json is not a VILA checkpoint's: expected llm_cfg (VILA1.5) or model_type "
                          "llava_llama with mm_vision_tower (VILA 1.0)")
    arch = (llm.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch != "LlamaForCausalLM" or llm.get("model_type", "llama") != "llama":
        raise SourceError(f"config.json: the LLM is {arch} ({llm.get('model_type')}); vlmforge runs VILA with LLaMA-family "
                          "LLMs only (NVILA's Qwen2 is not supported)")
    if tower.get("model_type") not in TOWER_CLASSES:
        raise SourceError(f"config.json: vision tower {tower.get('model_type')!r} is not supported (CLIP and SigLIP are; "
                          "VILA1.5-40b's InternViT needs VILA's own code)")
    if not isinstance(kind, str):
        raise SourceError("config.json: mm_projector_cfg.mm_projector_type is missing")
    projector_kind(kind)  # refuses unknown types
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise SourceError(f"config.json: mm_vision_select_feature {select!r} is not supported: patch or cls_patch")
    order = own.get("mm_downsample_token_order", default_token_order(kind))
    if order not in ("column", "row") or (kind.endswith("_fix") and order != "row"):
        fix = f" ({kind} is row order by definition)" if kind.endswith("_fix") else ""
        raise SourceError(f"config.json: {VLMFORGE_KEY}.mm_downsample_token_order {order!r}: use column or row{fix}")
    mm_hidden = int(config.get("mm_hidden_size") or tower["hidden_size"])
    if mm_hidden != int(tower.get("hidden_size", mm_hidden)):
        raise SourceError(f"config.json: mm_hidden_size {mm_hidden} is not the tower's hidden_size {tower['hidden_size']}")
    settings = VilaSettings(layout=layout, projector_type=kind, token_order=order,
                            select_layer=int(config.get("mm_vision_select_layer", -2)), select_feature=select,
                            image_aspect_ratio=config.get("image_aspect_ratio"), mm_hidden_size=mm_hidden, llm=llm,
                            tower=dict(tower), tower_name=tower_name, conv_mode=own.get("conv_mode"))
    settings.num_visual_features  # noqa: B018 - refuses a downsample projector on a non-square grid
    return settings


def default_token_order(kind: str) -> TokenOrder:
    """``mlp_downsample``: :data:`MLP_DOWNSAMPLE_ORDER` (VILA1.5's release code); the ``*_fix`` types are row order."""
    return MLP_DOWNSAMPLE_ORDER if kind == "mlp_downsample" else "row"


def projector_kind(kind: str) -> tuple[str, int]:
    """(family of the type, block size or number of Linears); ValueError-free: unknown types are a SourceError."""
    if kind in ("identity", "linear"):
        return kind, 1
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return "downsample", 2
    if kind == "mlp_downsample_3x3_fix":
        return "downsample", 3
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match and int(match.group(1)) >= 1:
        return "mlp", int(match.group(1))
    raise SourceError(f"config.json: mm_projector_type {kind!r} is not supported: identity, linear, mlpNx_gelu, "
                      "mlp_downsample, mlp_downsample_2x2_fix, mlp_downsample_3x3_fix")


def projected_tokens(kind: str, n: int) -> int:
    """Visual tokens the LLM sees for ``n`` selected vision tokens."""
    group, k = projector_kind(kind)
    if group != "downsample":
        return n
    s = math.isqrt(n)
    if s * s != n:
        raise SourceError(f"{kind} merges a square grid of vision tokens, but feature selection leaves {n}")
    return math.ceil(s / k) ** 2


# --- chat templates (llava/conversation.py) -----------------------------------------------------------------


@dataclass(frozen=True)
class ConvTemplate:
    """One user turn and the generation prompt, as ``llava/conversation.py``'s ``get_prompt()`` writes them."""

    before: str
    after: str
    stop: str | None
    """The template's own end-of-turn token (besides the tokenizer's EOS)."""


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
LLAMA3_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
                 "assistant. You are able to understand the visual content that the user provides, and assist the user "
                 "with a variety of tasks using natural language.")
CONV_TEMPLATES: dict[str, ConvTemplate] = {
    # VILA 1.0, VILA1.5-3b / 13b
    "vicuna_v1": ConvTemplate(VICUNA_SYSTEM + " USER: ", " ASSISTANT:", None),
    # Llama-3-VILA1.5-8B: LongVILA-era template (VILA 54c9706; what TensorRT-LLM 1.2 sends). The vila1.5 branch's
    # differed (<|end_of_text|>, a system header for the assistant): which one the 8B was trained with is unverified.
    "llama_3": ConvTemplate(LLAMA3_SYSTEM + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    # VILA1.5-40b (Yi-34B): the template applies, the InternViT tower is not supported
    "hermes-2": ConvTemplate("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n",
                             "<|im_end|><|im_start|>assistant\n", "<|im_end|>"),
}


def conv_mode_for(tokenizer: Any, declared: str | None = None) -> str:
    """The chat template: as config.json declares it, else by the tokenizer's special tokens (Llama-3's
    ``<|eot_id|>``, Yi/Hermes' ``<|im_end|>``, else vicuna). VILA itself takes it from ``--conv-mode``."""
    if declared is not None:
        if declared not in CONV_TEMPLATES:
            raise ValueError(f"conv_mode {declared!r} is not one of {', '.join(CONV_TEMPLATES)}")
        return declared
    vocab = tokenizer.get_vocab()
    if "<|eot_id|>" in vocab:
        return "llama_3"
    if "<|im_end|>" in vocab:
        return "hermes-2"
    return "vicuna_v1"
