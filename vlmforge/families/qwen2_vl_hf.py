"""Qwen2-VL's hf-toolchain pieces (torch and transformers are imported inside): the visual engine's module and its
host-side inputs, M-RoPE position ids, the standalone M-RoPE LLM, and the tiny model.

Visual engine, as TensorRT-LLM 1.2's builder exports it: transformers' vision tower computes its rotary table and its
per-image attention blocks (cu_seqlens) from ``image_grid_thw`` with data-dependent loops, so the engine takes them as
inputs computed here on the host: the patch rows [rows, 1176], ``rotary_pos_emb`` [rows, head_dim/2] (the h and w
frequencies of each row) and a block-diagonal additive ``attention_mask`` [1, rows, rows] (0 within an image, the
dtype's minimum across images); it gives [rows/4, llm_hidden] (the 2x2 merge). ``rows`` is dynamic.

M-RoPE (transformers' ``get_rope_index``): text positions count up on all three axes; an image's t x h x w merged grid
takes (start + t, start + row, start + column) and the text after it starts at start + max(t, h, w). Every generated
token then takes the previous maximum + 1 on all three axes (the "rope delta" of each request).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

TINY_SOURCE = "tiny://qwen2-vl"
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 16
"""tiny://qwen2-vl's processor: 4 to 16 tokens per image (real checkpoints: 4 to 16384)."""
TINY_VOCAB = 336
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
"""Qwen2-VL's special tokens (the tiny tokenizer adds them after its BPE vocabulary)."""
VIDEO_PAD = "<|video_pad|>"
TINY_INIT = 0.07
"""The tiny LLM's weight scale: at 0.05 the merged image rows move its first logits by only 0.2 (another image's
rows must change them clearly: tests/families/test_families_hf.py); at 0.07 by 0.66 or more, with first-step
margins of 0.03 or more (float16 validation holds)."""


def rotary_table(grids: Sequence[tuple[int, int, int]], inv_freq: torch.Tensor, merge: int) -> torch.Tensor:
    """``rotary_pos_emb`` [rows, head_dim/2] of the images' patch rows, in the processor's row order (2x2 merge
    windows contiguous): each row's h frequencies then its w frequencies (transformers' axial vision rope;
    ``inv_freq`` [head_dim/4] is the tower's, saved beside the visual engine)."""
    import torch

    inv_freq = inv_freq.float()
    parts = []
    for t, h, w in grids:
        hpos = torch.arange(h)[:, None].expand(h, w).reshape(h // merge, merge, w // merge, merge)
        wpos = torch.arange(w)[None, :].expand(h, w).reshape(h // merge, merge, w // merge, merge)
        hpos, wpos = (p.permute(0, 2, 1, 3).flatten() for p in (hpos, wpos))
        pos = torch.stack([hpos, wpos], dim=-1).repeat(t, 1).float()  # [rows, 2]
        parts.append((pos[..., None] * inv_freq).flatten(1))  # [rows, 2 * head_dim/4]
    return torch.cat(parts)


def block_mask(grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """The additive attention mask [1, rows, rows]: rows attend within their own image (frame) only."""
    import torch

    sizes = [h * w for t, h, w in grids for _ in range(t)]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    mask = torch.zeros((owner.numel(), owner.numel()), dtype=torch.float32)
    mask.masked_fill_(owner[:, None] != owner[None, :], torch.finfo(torch.float32).min)
    return mask[None]


def mrope_positions(ids: torch.Tensor, image_id: int, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """M-RoPE position ids [3, 1, L] of one prompt ``ids`` [1, L] whose runs of ``image_id`` are the images' merged
    (h, w) grids in order (transformers' ``get_rope_index`` for images, t = 1)."""
    import torch

    row = ids[0].tolist()
    columns: list[torch.Tensor] = []
    start, i, image = 0, 0, 0
    while i < len(row):
        if row[i] != image_id:
            j = i
            while j < len(row) and row[j] != image_id:
                j += 1
            columns.append(torch.arange(start, start + j - i).expand(3, -1))
            start += j - i
            i = j
            continue
        if image >= len(grids):
            raise ValueError(f"the prompt holds more image tokens than its {len(grids)} images' features")
        h, w = grids[image]
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        columns.append(torch.stack([torch.zeros(h * w, dtype=torch.long), hh.flatten(), ww.flatten()]) + start)
        start += max(h, w)
        i += h * w
        image += 1
    return torch.cat(columns, dim=1)[:, None].to(ids.device)


@cache
def visual_module_class() -> type:
    import torch

    class Qwen2VisualModule(torch.nn.Module):
        """(patch rows [rows, 1176], rotary_pos_emb [rows, head_dim/2], attention_mask [1, rows, rows]) -> merged
        features [rows/4, llm_hidden]: transformers' Qwen2-VL vision tower with its rope and attention blocks as
        inputs (TensorRT-LLM 1.2's export)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.visual = model.model.visual
            config = self.visual.config
            self.heads = config.num_heads
            self.head_dim = (getattr(config, "embed_dim", None) or config.hidden_size) // config.num_heads
            """Qwen2-VL's tower width is ``embed_dim`` (its ``hidden_size`` is the LLM's); Qwen2.5-VL's is
            ``hidden_size``."""

        def forward(self, rows: torch.Tensor, rotary_pos_emb: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
            x = self.visual.patch_embed(rows)
            cos, sin = self.rope(rotary_pos_emb)
            for block in self.visual.blocks:
                x = self.block(block, x, cos, sin, attention_mask)
            return self.visual.merger(x)

        @staticmethod
        def rope(rotary_pos_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(cos, sin) [rows, head_dim] of the rope table (its h and w halves twice, as transformers does)."""
            emb = torch.cat([rotary_pos_emb, rotary_pos_emb], dim=-1)
            return emb.cos(), emb.sin()

        def block(self, block: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
            """One vision block (its own norms and MLP: LayerNorm and QuickGELU in Qwen2-VL, RMSNorm and a gated
            SiLU MLP in Qwen2.5-VL), its attention under the additive ``attention_mask`` [1, rows, rows]."""
            from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

            attn, n = block.attn, x.shape[0]
            qkv = attn.qkv(block.norm1(x)).reshape(n, 3, self.heads, self.head_dim)
            q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, rows, head_dim]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask[:, None].to(q.dtype), scale=attn.scaling)
            x = x + attn.proj(out[0].transpose(0, 1).reshape(n, -1))
            return x + block.mlp(block.norm2(x))

    return Qwen2VisualModule


VARIANTS = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VL", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VL", "Qwen2_5_VLProcessor"),
}
"""Family name -> (transformers module, class prefix, processor class): Qwen2.5-VL's text model, processor and
M-RoPE are Qwen2-VL's under other names."""


@cache
def causal_lm_class(variant: str = "qwen2_vl") -> type:
    """``Qwen2VLForCausalLM`` (``Qwen2_5_VLForCausalLM``): the M-RoPE text model and its head, saved and loaded on
    their own (transformers has no causal-LM class for them: a Qwen2ForCausalLM with the same weights would rotate
    image rows wrongly)."""
    import importlib

    import torch
    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from vlmforge.modeling.generation import cache_kwarg, cache_of

    module, prefix, _ = VARIANTS[variant]
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    configuration = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    text_config_class = getattr(configuration, f"{prefix}TextConfig")
    text_model_class = getattr(modeling, f"{prefix}TextModel")

    class Qwen2VLForCausalLM(getattr(modeling, f"{prefix}PreTrainedModel"), GenerationMixin):  # type: ignore[misc]
        config_class = text_config_class
        base_model_prefix = "model"
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.model = text_model_class(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.model.embed_tokens

        def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                    cache: Any = None, inputs_embeds: Any = None, use_cache: bool | None = None,
                    logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
            """position_ids: [3, B, L] M-RoPE ids, or [B, L] (the same on all three axes, e.g. decode steps)."""
            # the text model's cache keyword and output field: ``cache`` in transformers 5, ``past_key_values`` in
            # 4.57 (NVIDIA's 1.2 container)
            name = cache_kwarg(self.model)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **{name: cache}, **kwargs)
            hidden = out.last_hidden_state
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, keep]), **{name: cache_of(out)})

    Qwen2VLForCausalLM.__name__ = Qwen2VLForCausalLM.__qualname__ = f"{prefix}ForCausalLM"
    Qwen2VLForCausalLM.__module__ = __name__
    return Qwen2VLForCausalLM


@cache
def processor_class(variant: str = "qwen2_vl") -> type:
    """Qwen2VLProcessor (Qwen2_5_VLProcessor) without its video processor (transformers' video processors need
    torchvision)."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    name = VARIANTS[variant][2]

    class Qwen2VLImageProcessor(getattr(transformers, name)):  # type: ignore[misc]
        """The Qwen2-VL / Qwen2.5-VL processor for images only (its video processor needs torchvision)."""

        # transformers 4.57 checks these class attributes, not __init__'s signature: no video processor, and any
        # fast tokenizer (the tiny model's is a plain PreTrainedTokenizerFast; a real checkpoint's a Qwen2 one)
        attributes = ["image_processor", "tokenizer"]
        tokenizer_class = "AutoTokenizer"

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:
            self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PAD
            self.video_token = VIDEO_PAD
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    Qwen2VLImageProcessor.__name__ = name
    return Qwen2VLImageProcessor


def tiny_text_config() -> tuple[dict[str, Any], dict[str, int]]:
    """The tiny M-RoPE LLM's text config and the special token ids (tiny://qwen2-vl's and tiny://qwen2.5-vl's)."""
    import transformers

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS_ID,
                eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=TINY_INIT,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.57 (NVIDIA's 1.2 container) reads the legacy key
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        text["rope_theta"] = 10000.0
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END))}
    return text, ids


def tiny_config() -> Any:
    from transformers import Qwen2VLConfig

    text, ids = tiny_text_config()
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=0.05)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         initializer_range=TINY_INIT, **ids)


def tiny_tokenizer() -> Any:
    from vlmforge.families.tinykit import make_fast_tokenizer

    tokenizer = make_fast_tokenizer(template="none", vocab_size=320, image_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PAD, VISION_START, VISION_END, VIDEO_PAD,
                                                                 IM_START, IM_END]})
    tokenizer.image_token = IMAGE_PAD
    return tokenizer


def tiny_processor(variant: str = "qwen2_vl") -> Any:
    from vlmforge.families.tinykit import pil_image_processor

    image_processor = pil_image_processor(
        "Qwen2VLImageProcessor", size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        patch_size=14, merge_size=2, temporal_patch_size=2)
    return processor_class(variant)(image_processor=image_processor, tokenizer=tiny_tokenizer())
