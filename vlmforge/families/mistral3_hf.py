"""Mistral3's hf-toolchain pieces (torch and transformers are imported inside): the visual engine's module and its
host-side inputs, the image-only Pixtral processor, and the tiny model.

Visual engine (shape-dynamic, unlike TensorRT-LLM 1.2's fixed 1540x1540 canvas): transformers' Pixtral tower crops
each image's patch grid, builds its 2D rotary positions and its per-image attention blocks, and the patch merger
unfolds each image's grid, all with Python loops over ``image_sizes``. Here the host does that bookkeeping instead:

- ``rows`` [R, 3*p*p]: every image's patches, flattened as the patch convolution reads them (a Linear), ordered so
  each ``spatial_merge_size`` x ``spatial_merge_size`` merge window is contiguous (the merger becomes a reshape);
- ``positions`` [R, 2] (float32, whole numbers): each row's (row, column) in its image's patch grid (the axial
  rope's angles come from them inside the graph, with the tower's own frequencies);
- ``image_ids`` [R] (float32, whole numbers): which image of the call each row belongs to (the block mask is built
  inside the graph from them: O(R) input bytes instead of an R x R mask).

The output is [R / merge^2, llm_hidden], each image's merged rows in raster order: what the LLM's ``[IMG]`` tokens
take. ``R`` is dynamic, so one engine takes any image size and any number of images per call.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

IMG, IMG_BREAK, IMG_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
INST, INST_END = "[INST]", "[/INST]"
"""Mistral3's image and instruction tokens (the tiny tokenizer adds them after its BPE vocabulary)."""
TINY_PATCH = 4
TINY_MERGE = 2
TINY_LONGEST_EDGE = 32
"""tiny://mistral3: 4-pixel patches merged 2x2, images resized to a longest edge of 32: at most 4 x 4 = 16 [IMG]
tokens per image (Mistral-Small-3.1: 14-pixel patches, 1540 pixels, 55 x 55 = 3025)."""
TINY_VOCAB = 336
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST]' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '[IMG]' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
"""The tiny model's chat template: a user turn's images, then its text, in ``[INST]...[/INST]`` (the family's
:data:`~vlmforge.families.mistral3.PROMPT_TEMPLATE`); trtllm-serve takes images through the chat API only, so a model
folder it serves needs one."""
TINY_INIT = 0.06


def window_order(height: int, width: int, merge: int) -> torch.Tensor:
    """Raster indices of a ``height`` x ``width`` patch grid reordered so each merge x merge window is contiguous
    (windows in raster order, raster order within a window)."""
    import torch

    grid = torch.arange(height * width).reshape(height // merge, merge, width // merge, merge)
    return grid.permute(0, 2, 1, 3).flatten()


def patch_rows(pixels: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """One image's pixels [3, H, W] (H and W multiples of patch x merge) as its patch rows [H/p * W/p, 3*p*p] in
    :func:`window_order`, each row flattened as the patch convolution's weight is (channel, y, x)."""
    channels, height, width = pixels.shape
    h, w = height // patch, width // patch
    rows = pixels.reshape(channels, h, patch, w, patch).permute(1, 3, 0, 2, 4).reshape(h * w, -1)
    return rows[window_order(h, w, merge)]


def grid_positions(grids: Sequence[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """``positions`` [R, 2] (float32: the runners feed every engine input as float32): each row's (row, column) in
    its image's patch grid, rows in :func:`window_order`."""
    import torch

    parts = []
    for _, h, w in grids:
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([hh.flatten(), ww.flatten()], dim=-1)[window_order(h, w, merge)])
    return torch.cat(parts).float()


def image_index(grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """``image_ids`` [R] (float32): the image (0, 1, ... within the call) each row belongs to."""
    import torch

    sizes = torch.tensor([h * w for _, h, w in grids])
    return torch.repeat_interleave(torch.arange(len(grids)), sizes).float()


def rope_theta(config: Any) -> float:
    """The vision tower's rope base: ``rope_parameters`` in transformers 5, ``rope_theta`` in 4.57."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


@cache
def visual_module_class() -> type:
    import torch

    class Mistral3VisualModule(torch.nn.Module):
        """(rows [R, 3*p*p], positions [R, 2], image_ids [R]) -> merged, projected features [R/m^2, llm_hidden]:
        transformers' Pixtral tower and Mistral3 projector (norm, patch merger, MLP) with the per-image bookkeeping
        taken from the host (module docstring). The same math in transformers 5 and 4.57 (whose rotary tables
        differ in layout, not in value)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            config = model.config
            self.tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector
            self.merge = int(config.spatial_merge_size)
            layer = config.vision_feature_layer
            if not isinstance(layer, int):
                raise ValueError(f"vision_feature_layer {layer!r}: vlmforge's Mistral3 visual engine takes one layer "
                                 "(every Mistral3 checkpoint's -1)")
            self.layers = layer % (len(self.tower.transformer.layers) + 1)  # hidden_states[0] is ln_pre's output
            vision = config.vision_config
            dim = int(vision.head_dim)
            base = 1.0 / (rope_theta(vision) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            # the h axis takes the even frequencies, the w axis the odd ones (transformers' axial rope)
            self.register_buffer("inv_freq", torch.cat([base[0::2], base[1::2]]), persistent=False)

        def forward(self, rows: torch.Tensor, positions: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
            from transformers.models.pixtral.modeling_pixtral import apply_rotary_pos_emb

            tower, projector = self.tower, self.projector
            weight = tower.patch_conv.weight
            x = tower.ln_pre(torch.nn.functional.linear(rows.to(weight.dtype), weight.flatten(1)))  # [R, hidden]
            positions, image_ids = positions.to(x.device), image_ids.to(x.device)  # host-made: CPU tensors
            quarter = self.inv_freq.shape[0] // 2
            angles = torch.cat([positions[:, :1].float() * self.inv_freq[:quarter],
                                positions[:, 1:].float() * self.inv_freq[quarter:]], dim=-1)
            angles = torch.cat([angles, angles], dim=-1)
            cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
            same = image_ids[:, None] == image_ids[None, :]
            mask = torch.zeros(same.shape, dtype=x.dtype, device=x.device).masked_fill(~same, torch.finfo(x.dtype).min)
            n = x.shape[0]
            for layer in tower.transformer.layers[:self.layers]:
                attn = layer.attention
                h = layer.attention_norm(x)
                q, k, v = (proj(h).reshape(n, attn.num_heads, attn.head_dim).transpose(0, 1)[None]
                           for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
                q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
                x = x + attn.o_proj(out[0].transpose(0, 1).reshape(n, -1))
                x = x + layer.feed_forward(layer.ffn_norm(x))
            x = projector.norm(x)
            windows = self.merge * self.merge  # each window's rows are contiguous: unfold's (channel, k) order
            x = x.reshape(n // windows, windows, -1).transpose(1, 2).reshape(n // windows, -1)
            x = projector.patch_merger.merging_layer(x)
            return projector.linear_2(projector.act(projector.linear_1(x)))

    return Mistral3VisualModule


def expand_images(prompt: str, grids: Sequence[tuple[int, int]]) -> str:
    """``prompt`` with its k-th ``[IMG]`` replaced by the k-th image's merged ``grids[k]`` = (rows, columns):
    ``[IMG]`` x columns then ``[IMG_BREAK]`` per row, the last row ending in ``[IMG_END]`` (PixtralProcessor's
    expansion); ValueError unless the prompt holds one ``[IMG]`` per image."""
    if prompt.count(IMG) != len(grids):
        raise ValueError(f"a Mistral3 prompt for {len(grids)} image(s) holds exactly {len(grids)} {IMG}, one per "
                         f"image in order: {prompt!r}")
    head, *tails = prompt.split(IMG)
    parts = [head]
    for (rows, columns), tail in zip(grids, tails, strict=True):
        parts.append((IMG * columns + IMG_BREAK) * (rows - 1) + IMG * columns + IMG_END + tail)
    return "".join(parts)


@cache
def processor_class() -> type:
    """PixtralProcessor's image and text work without its module (transformers 5's imports torchvision), saved under
    PixtralProcessor's name and settings, so transformers' own class loads the folder where torchvision is."""
    import transformers
    from transformers import BatchFeature
    from transformers.processing_utils import ProcessorMixin

    class PixtralImageTextProcessor(ProcessorMixin):  # type: ignore[misc]
        """Images resized (longest edge, multiples of patch x merge) and the prompt's ``[IMG]`` expanded."""

        attributes = ["image_processor", "tokenizer"]
        tokenizer_class = "AutoTokenizer"
        if int(transformers.__version__.split(".")[0]) < 5:  # 4.57 (NVIDIA's 1.2 image) checks it; 5 deprecates it
            image_processor_class = "AutoImageProcessor"

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, patch_size: int = 16,
                     spatial_merge_size: int = 1, chat_template: Any = None, image_token: str = IMG,
                     image_break_token: str = IMG_BREAK, image_end_token: str = IMG_END, **kwargs: Any) -> None:
            self.patch_size = int(patch_size)
            self.spatial_merge_size = int(spatial_merge_size)
            self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, \
                image_end_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        @property
        def factor(self) -> int:
            """Pixels per merged token side (patch x merge: 28 for Mistral-Small-3.1)."""
            return self.patch_size * self.spatial_merge_size

        def preprocess(self, images: Sequence[Any]) -> Any:
            """pixel_values [B, 3, H, W] (padded to the largest) and image_sizes [B, 2] (each image's resized size)."""
            factor = self.factor
            return self.image_processor(images=list(images), patch_size={"height": factor, "width": factor},
                                        return_tensors="pt")

        def __call__(self, images: Any = None, text: str | None = None, return_tensors: str = "pt",
                     **kwargs: Any) -> Any:
            data: dict[str, Any] = {}
            grids: list[tuple[int, int]] = []
            if images is not None:
                out = self.preprocess(images if isinstance(images, (list, tuple)) else [images])
                data.update(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"])
                grids = [(int(h) // self.factor, int(w) // self.factor) for h, w in out["image_sizes"].tolist()]
            if text is not None:
                data.update(self.tokenizer(expand_images(text, grids), return_tensors="pt"))
            return BatchFeature(data, tensor_type=None if return_tensors == "pt" else return_tensors)

    PixtralImageTextProcessor.__name__ = "PixtralProcessor"
    return PixtralImageTextProcessor


def tiny_tokenizer() -> Any:
    from vlmforge.families.tinykit import make_fast_tokenizer

    tokenizer = make_fast_tokenizer(template="bos", vocab_size=320)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMG, IMG_BREAK, IMG_END, INST, INST_END]})
    return tokenizer


def tiny_processor() -> Any:
    from vlmforge.families.tinykit import pil_image_processor

    image_processor = pil_image_processor("PixtralImageProcessor", size={"longest_edge": TINY_LONGEST_EDGE},
                                          patch_size={"height": TINY_PATCH, "width": TINY_PATCH},
                                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return processor_class()(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=TINY_PATCH,
                             spatial_merge_size=TINY_MERGE, chat_template=TINY_CHAT_TEMPLATE)


def tiny_config(tokenizer: Any) -> Any:
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 head_dim=8, image_size=TINY_LONGEST_EDGE, patch_size=TINY_PATCH,
                                 initializer_range=TINY_INIT)
    text = MistralConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         sliding_window=None, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         initializer_range=TINY_INIT)
    return Mistral3Config(vision_config=vision, text_config=text,
                          image_token_index=tokenizer.convert_tokens_to_ids(IMG), spatial_merge_size=TINY_MERGE,
                          vision_feature_layer=-1, multimodal_projector_bias=False, projector_hidden_act="gelu",
                          initializer_range=TINY_INIT, tie_word_embeddings=False)
