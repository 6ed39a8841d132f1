"""The tiny VILA checkpoints, written in the real on-disk layouts with random weights (no download).

``tiny://vila`` is the VILA1.5 layout (``llm/``, ``vision_tower/`` with SigLIP tensors under their transformers-4
names ``vision_model.*``, ``mm_projector/`` with an ``mlp_downsample`` projector, config.json with ``llm_cfg`` /
``vision_tower_cfg`` / ``mm_projector_cfg``, modelled on VILA1.5-3b's). ``tiny://vila1.0`` is the VILA 1.0 layout
(one folder, two shards holding the LLaMA, ``model.mm_projector.*`` and
``model.vision_tower.vision_tower.vision_model.*``, an ``llava_llama`` config.json with LLaVA's ``mm_*`` keys,
the tower named by ``mm_vision_tower``, no preprocessor_config.json). The loader reads them exactly as it reads
the published checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmforge.families.vila_config import CONV_TEMPLATES, KNOWN_TOWERS, TINY_CLIP_TOWER
from vlmforge.families.vila_model import VilaProjector, projector_config

TINY_VOCAB_SIZE = 512
TINY_NUM_ATTENTION_HEADS = 4
TINY_SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
               "image_size": 126, "patch_size": 14}
"""9 x 9 = 81 patches: an odd grid, padded to 10 x 10 and merged 2 x 2 into 25 visual tokens (VILA1.5: 27 -> 28 -> 196)."""
PROJECTOR_STD = 0.2
"""Init scale of the tiny projectors."""
LLM_INIT = 0.08
"""Init scale of the tiny LLMs. VILA's chat template is long (about 60 tokens here): with LLaVA's 0.05 the random
LLM's near-uniform attention lets the image move the first logits by only 0.2-0.45 (wrong-image check too weak);
0.08 gives 0.75-1.8 over seeds 0-2, and float16 still agrees with float32 on every token."""


def _llama_config(**extra: Any) -> Any:
    from transformers import LlamaConfig

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

    return LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=TINY_NUM_ATTENTION_HEADS, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=LLM_INIT,
                       tie_word_embeddings=False, **extra)


def _tokenizer() -> Any:
    """The tiny BPE, trained with vicuna_v1's system prompt as well: it then takes about as many tokens as with a
    real LLaMA tokenizer (with the shared corpus alone it would take 125 of them and drown the image)."""
    from vlmforge.families.tinykit import CORPUS, make_fast_tokenizer

    corpus = (*CORPUS, CONV_TEMPLATES["vicuna_v1"].before + "<image>\nPlease describe the traffic condition."
              + CONV_TEMPLATES["vicuna_v1"].after + " The road is busy.")
    # <image> is not a token for VILA: prompts are split at the text "<image>" (tokenizer_image_token)
    return make_fast_tokenizer(template="bos", vocab_size=TINY_VOCAB_SIZE, image_token=False, corpus=corpus)


def _projector(kind: str, mm_hidden: int, hidden: int) -> VilaProjector:
    projector = VilaProjector(kind, mm_hidden, hidden)
    with torch.no_grad():
        for param in projector.parameters():
            param.normal_(0, PROJECTOR_STD)
    return projector


def _legacy_vision_key(key: str) -> str:
    """transformers-5 vision-model tensor name -> the transformers-4 name VILA's checkpoints carry."""
    return key if key.startswith("vision_model.") else "vision_model." + key


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_tiny_vila15(root: Path, seed: int = 0) -> None:
    """The VILA1.5 layout, as vila1.5's ``LlavaMetaModel.save_pretrained`` writes it."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vlmforge.modeling.devices import seed_all

    seed_all(seed)
    root.mkdir(parents=True, exist_ok=True)
    llm_cfg = _llama_config(model_max_length=512, tokenizer_model_max_length=512, tokenizer_padding_side="right")
    LlamaForCausalLM(llm_cfg).eval().save_pretrained(root / "llm")
    _tokenizer().save_pretrained(root / "llm")
    tower_cfg = SiglipVisionConfig(**TINY_SIGLIP)
    tower_cfg.architectures = ["SiglipVisionModel"]
    tower = SiglipVisionModel(tower_cfg).eval()
    tower_cfg.save_pretrained(root / "vision_tower")
    save_file({_legacy_vision_key(k): v.contiguous() for k, v in tower.state_dict().items()},
              str(root / "vision_tower" / "model.safetensors"), metadata={"format": "pt"})
    size = TINY_SIGLIP["image_size"]
    _write_json(root / "vision_tower" / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": size, "width": size}})
    projector = _projector("mlp_downsample", tower_cfg.hidden_size, llm_cfg.hidden_size)
    _write_json(root / "mm_projector" / "config.json", projector_config("mlp_downsample") | {"torch_dtype": "float32"})
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()},
              str(root / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
    _write_json(root / "config.json", {
        "_name_or_path": "tiny-vila", "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
        "llm_cfg": llm_cfg.to_dict() | {"_name_or_path": "./llm", "architectures": ["LlamaForCausalLM"]},
        "vision_tower_cfg": tower_cfg.to_dict() | {"_name_or_path": "./vision_tower"},
        "mm_projector_cfg": projector_config("mlp_downsample"),
        "hidden_size": llm_cfg.hidden_size, "mm_hidden_size": tower_cfg.hidden_size, "image_aspect_ratio": "resize",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_projector_lr": None, "model_dtype": "torch.float32", "num_video_frames": 8,
        "resume_path": "./vlm", "s2": False, "s2_max_split_size": 336, "s2_scales": "336,672,1008",
        "interpolate_mode": "linear", "vision_resolution": -1, "drop_path_rate": 0.0, "tune_language_model": True,
        "tune_mm_projector": True, "tune_vision_tower": True, "transformers_version": "4.36.2",
    })


def write_tiny_vila10(root: Path, seed: int = 0) -> None:
    """The VILA 1.0 layout: LLaVA-1.5's ``LlavaLlamaForCausalLM.save_pretrained``, one folder, two shards."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    from vlmforge.modeling.devices import seed_all

    seed_all(seed)
    root.mkdir(parents=True, exist_ok=True)
    llm_cfg = _llama_config()
    llm = LlamaForCausalLM(llm_cfg).eval()
    tower_cfg = {k: v for k, v in KNOWN_TOWERS[TINY_CLIP_TOWER].config.items() if k != "model_type"}
    tower = CLIPVisionModel(CLIPVisionConfig(**tower_cfg)).eval()
    projector = _projector("mlp2x_gelu", tower.config.hidden_size, llm_cfg.hidden_size)
    state: dict[str, torch.Tensor] = dict(llm.state_dict())
    state |= {"model.mm_projector." + k.removeprefix("layers."): v for k, v in projector.state_dict().items()}
    state |= {"model.vision_tower.vision_tower." + _legacy_vision_key(k): v for k, v in tower.state_dict().items()}
    first = {k for k in state if k.startswith("model.layers.0.")} | {"model.embed_tokens.weight"}
    shards = {"model-00001-of-00002.safetensors": sorted(first), "model-00002-of-00002.safetensors": sorted(set(state) - first)}
    weight_map = {}
    for name, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(root / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, name)
    _write_json(root / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(root / "config.json", llm_cfg.to_dict() | {
        "_name_or_path": "tiny-vila1.0", "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": TINY_CLIP_TOWER, "mm_hidden_size": tower.config.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "mm_projector_lr": None, "tokenizer_model_max_length": 512,
        "tokenizer_padding_side": "right",
    })
    _tokenizer().save_pretrained(root)
