"""mllama's hf-toolchain pieces (torch and transformers are imported inside): the visual engine's module and its
host-side inputs, the cross-attention LLM, the per-position visibility of the states, and the tiny model.

Visual engine, as TensorRT-LLM 1.2's builder exports it (``MLLaMAVisionWrapper``): transformers' vision model and the
projector on ``pixel_values`` [B, 1, max_tiles, 3, S, S], ``aspect_ratio_ids`` [B, 1] and ``aspect_ratio_mask``
[B, 1, max_tiles]; it gives [B, 1, max_tiles, P, hidden] (P = (S/14)^2 + 1 per tile). The batch axis is dynamic. The
host computes the aspect-ratio inputs from each image's size as the image processor does (:func:`tile_grid`), and an
image's features are the rows of its real tiles only, [1, tiles x P, hidden] (the padded tiles are never attended).

The LLM is transformers' ``MllamaForCausalLM`` (the text model with its cross-attention layers, and the head) fed
``cross_attention_states`` [B, S, hidden] and the states' visibility [B, L, S] (1 where a text position attends a
state, what the processor's ``cross_attention_mask`` says per tile, repeated per patch): :func:`causal_lm_class` turns
it into transformers' additive mask and ``full_text_row_masked_out_mask`` exactly as ``MllamaModel`` does.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

TINY_SOURCE = "tiny://mllama"
TINY_TILE = 28
"""tiny://mllama: 28-pixel tiles of 14-pixel patches (2x2 + 1 class token = 5 states per tile, at most 20 per image)."""
IMAGE_TOKEN, PYTHON_TAG, BEGIN = "<|image|>", "<|python_tag|>", "<|begin_of_text|>"
GATE_INIT = 1.0
"""Every gate of the tiny model (transformers initializes the cross-attention and tile-embedding gates to zero: the
image would change nothing); tanh(1) = 0.76 lets the images' states move the logits clearly."""


def _mllama_image_module() -> Any:
    """transformers' Mllama image-processing helpers: the PIL module in 5.x (its torchvision one needs torchvision),
    the only one in 4.57 (NVIDIA's 1.2 container)."""
    try:
        from transformers.models.mllama import image_processing_pil_mllama as module
    except ImportError:  # transformers 4.57
        from transformers.models.mllama import image_processing_mllama as module  # type: ignore[no-redef]
    return module


def tile_grid(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(tile rows, tile columns) the image processor cuts a height x width image into (``get_optimal_tiled_canvas``)."""
    canvas_h, canvas_w = _mllama_image_module().get_optimal_tiled_canvas(height, width, max_tiles, tile)
    return int(canvas_h) // tile, int(canvas_w) // tile


def aspect_inputs(sizes: list[tuple[int, int]], max_tiles: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``aspect_ratio_ids`` [n, 1] and ``aspect_ratio_mask`` [n, 1, max_tiles] of images of ``sizes`` (height, width),
    as the image processor makes them."""
    import torch

    supported = [tuple(r) for r in _mllama_image_module().get_all_supported_aspect_ratios(max_tiles)]
    ids = torch.zeros((len(sizes), 1), dtype=torch.long)
    mask = torch.zeros((len(sizes), 1, max_tiles), dtype=torch.long)
    for i, (height, width) in enumerate(sizes):
        grid = tile_grid(height, width, max_tiles, tile)
        ids[i, 0] = supported.index(grid) + 1
        mask[i, 0, : grid[0] * grid[1]] = 1
    return ids, mask


def visibility(ids: list[int], image_token_id: int, tiles: int | Sequence[int], states_per_tile: int) -> torch.Tensor:
    """[1, L, sum(tiles) x P]: 1 where a prompt position attends a state of an image (the processor's
    ``cross_attention_mask`` for images of ``tiles`` real tiles each, in order, real tiles only, repeated per patch)."""
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    counts = [tiles] if isinstance(tiles, int) else list(tiles)
    sparse = [get_cross_attention_token_mask(ids, image_token_id)]
    dense = torch.as_tensor(convert_sparse_cross_attention_mask_to_dense(
        sparse, num_tiles=[counts], max_num_tiles=max(counts), length=len(ids)))  # [1, L, images, most tiles]
    return torch.cat([dense[:, :, i, :count] for i, count in enumerate(counts)], dim=-1).repeat_interleave(
        states_per_tile, dim=-1)


@cache
def visual_module_class() -> type:
    import torch

    class MllamaVisualModule(torch.nn.Module):
        """(pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> projected states [B, 1, tiles, P, hidden]: the vision
        model and the projector (TensorRT-LLM 1.2's ``MLLaMAVisionWrapper``)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.vision_model = model.model.vision_model
            self.projector = model.model.multi_modal_projector

        def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                    aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
            out = self.vision_model(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                                    aspect_ratio_mask=aspect_ratio_mask).last_hidden_state
            return self.projector(out)

    return MllamaVisualModule


@cache
def causal_lm_class() -> type:
    """``MllamaForCausalLM`` taking the states' visibility [B, L, S] as ``cross_attention_mask`` (0/1), turned into
    transformers' additive [B, 1, L, S] mask and ``full_text_row_masked_out_mask`` [B, 1, L, 1] as ``MllamaModel``'s
    ``_prepare_cross_attention_mask`` does (a row that sees no state attends to all of them, and its cross-attention
    output is zeroed)."""
    import inspect

    import torch
    from transformers import MllamaForCausalLM

    class MllamaCrossAttentionLM(MllamaForCausalLM):
        def forward(self, *args: Any, cross_attention_mask: Any = None, full_text_row_masked_out_mask: Any = None,
                    **kwargs: Any) -> Any:
            if cross_attention_mask is not None and full_text_row_masked_out_mask is None:
                dtype = self.model.embed_tokens.weight.dtype
                lowest = torch.finfo(dtype).min
                inverted = (1.0 - cross_attention_mask.to(dtype))[:, None]
                additive = inverted.masked_fill(inverted.to(torch.bool), lowest)
                full_text_row_masked_out_mask = (additive != lowest).any(dim=-1).type_as(additive)[..., None]
                cross_attention_mask = additive * full_text_row_masked_out_mask
            return super().forward(*args, cross_attention_mask=cross_attention_mask,
                                   full_text_row_masked_out_mask=full_text_row_masked_out_mask, **kwargs)

    # the runner reads the forward's keywords (the cache's name, logits_to_keep): the parent's, as they are passed on
    forward: Any = MllamaCrossAttentionLM.forward
    forward.__signature__ = inspect.signature(MllamaForCausalLM.forward)
    MllamaCrossAttentionLM.__module__ = __name__
    return MllamaCrossAttentionLM


def tiny_tokenizer() -> Any:
    from vlmforge.families.tinykit import make_fast_tokenizer

    tokenizer = make_fast_tokenizer(template="none", vocab_size=320, image_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, PYTHON_TAG, BEGIN]})
    tokenizer.bos_token = BEGIN
    return tokenizer


def tiny_config() -> Any:
    import transformers
    from transformers import MllamaConfig

    from vlmforge.families.tinykit import EOS_ID, PAD_ID

    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                cross_attention_layers=[1], num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=tokenizer.convert_tokens_to_ids(BEGIN), eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                initializer_range=0.05, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=False)
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.57 (NVIDIA's 1.2 container) reads the legacy keys
        text.pop("rope_parameters")
        text.update(rope_theta=10000.0, rope_scaling={"rope_type": "default"})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  image_size=TINY_TILE, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[0],
                  vision_output_dim=64, initializer_range=0.05)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        IMAGE_TOKEN), tie_word_embeddings=False)


def tiny_model(seed: int) -> Any:
    """The tiny model with every gate at :data:`GATE_INIT` (transformers zeroes them)."""
    import torch
    from transformers import MllamaForConditionalGeneration

    from vlmforge.modeling.devices import seed_all

    seed_all(seed)
    model = MllamaForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("gate"):
                parameter.fill_(GATE_INIT)
    return model


def tiny_processor() -> Any:
    from transformers import MllamaProcessor

    from vlmforge.families.tinykit import pil_image_processor

    image_processor = pil_image_processor("MllamaImageProcessor", size={"height": TINY_TILE, "width": TINY_TILE},
                                          max_image_tiles=4)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer())
