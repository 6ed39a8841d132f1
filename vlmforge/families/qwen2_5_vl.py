"""Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct, -72B-Instruct): Qwen2-VL's processor, 2x2 merge, chat
template and M-RoPE, with a window-attention vision tower.

Everything but the tower is Qwen2-VL's (:class:`~vlmforge.families.qwen2_vl.Qwen2VlFamily`): smart_resize to multiples
of 28 within the same pixel limits (min_pixels 3136, max_pixels 12845056 in the Instruct checkpoints'
preprocessor_config.json), (h/14)(w/14)/4 tokens per image, the Qwen2 text model with M-RoPE (transformers'
``get_rope_index`` gives a still image the positions Qwen2-VL's does: time = start, the video-only
``tokens_per_second`` spacing does not apply), the LLM as ``Qwen2_5_VLForCausalLM``. The tower differs: RMSNorm,
gated SiLU MLP and window attention (:mod:`vlmforge.families.qwen2_5_vl_hf`); its visual engine takes five inputs
computed on the host (rows, rope table, window order, window mask, image mask), rows dynamic, and the window size is
saved beside the engine with the rope frequencies.

TensorRT-LLM: 1.2's engine builder has no Qwen2.5-VL (``build_multimodal_engine.py`` has no qwen2_5_vl
``--model_type`` and its qwen2_vl export has no window attention), so every trtllm plan is refused with that reason;
TensorRT-LLM's PyTorch backend (``vlmforge deploy --backend trtllm-serve``) serves
``Qwen2_5_VLForConditionalGeneration`` checkpoints as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError, SpecError
from vlmforge.families import register_family
from vlmforge.families.qwen2_vl import MERGE, PATCH, ROPE_FILE, ROPE_KEY, Qwen2VlFamily
from vlmforge.plans.model import DialectInfo, PlanContext
from vlmforge.specs.schema import BuildSpec, Dialect, ImageSize
from vlmforge.specs.visual import FamilyNumber

if TYPE_CHECKING:
    import torch

WINDOW_KEY = "window_size"
"""The tower's window size in pixels, saved in ``vision_rope.safetensors`` beside the rope frequencies (the host's
window order needs it)."""
WINDOW_SIZE = 112
"""window_size of every Qwen2.5-VL checkpoint's vision_config (4 merged units a side)."""
NO_ENGINE_REASON = (
    "TensorRT-LLM 1.2's engine builder has no Qwen2.5-VL support (build_multimodal_engine.py has no qwen2_5_vl "
    "--model_type, and its qwen2_vl visual export has no window attention); only TensorRT-LLM's PyTorch backend "
    "serves Qwen2_5_VLForConditionalGeneration. Build it with the hf toolchain (vlmforge build MODEL --toolchain hf) "
    "and deploy it with --backend trtllm-serve (or the vlmforge runner)")


@register_family
class Qwen25VlFamily(Qwen2VlFamily):
    """Qwen2.5-VL: Qwen2-VL's dynamic resolution and M-RoPE, a window-attention ViT (hf toolchain; no 1.2 engine)."""

    name: ClassVar[str] = "qwen2_5_vl"
    description: ClassVar[str] = "Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct), dynamic resolution, window-attention ViT"
    builder_model_type: ClassVar[str] = ""
    hf_class: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    hf_unsupported_reason: ClassVar[str] = ""
    plan_dialects: ClassVar[tuple[Dialect, ...]] = ()
    default_max_image_size: ClassVar[ImageSize | None] = ImageSize(height=504, width=504)
    """Qwen2-VL's default largest image (324 tokens); raise visual.max_image_size for larger images."""
    tiny_source: ClassVar[str | None] = "tiny://qwen2.5-vl"
    visual_engine_axes: ClassVar[dict[str, dict[int, str]]] = {
        "rows": {0: "rows"}, "rotary_pos_emb": {0: "rows"}, "window_index": {0: "tokens"},
        "window_mask": {1: "rows", 2: "rows"}, "attention_mask": {1: "rows", 2: "rows"}, "features": {0: "tokens"}}
    """The visual engine's inputs (rows dynamic; tokens = rows / 4)."""

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        raise PlanError(f"{spec.name}: no TensorRT-LLM {info.release} engine path: {NO_ENGINE_REASON}")

    def visual_model_type(self, ctx: PlanContext) -> str:
        raise PlanError(NO_ENGINE_REASON)

    def family_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        """None: the numbers Qwen2-VL's plans pass (--max_num_tokens, --min/max_hw_dims) have no plan here."""
        return ()

    def check_checkpoint_config(self, spec: BuildSpec, config: dict[str, Any]) -> None:
        """Qwen2-VL's patch and merge check, and a window of whole merged units (transformers divides it by 28)."""
        super().check_checkpoint_config(spec, config)
        window = int((config.get("vision_config") or {}).get("window_size", WINDOW_SIZE))
        if window < PATCH * MERGE:
            raise SpecError(f"{spec.source}'s vision_config has window_size {window}, under one merged unit "
                            f"({PATCH * MERGE} pixels); every Qwen2.5-VL checkpoint has {WINDOW_SIZE}", path="source")

    # --- hf toolchain ---------------------------------------------------------------------------------------

    def tiny_config(self) -> Any:
        from vlmforge.families.qwen2_5_vl_hf import tiny_config

        return tiny_config()

    def visual_module(self, model: Any) -> torch.nn.Module:
        """(rows, rotary_pos_emb, window_index, window_mask, attention_mask) -> [rows/4, llm_hidden]."""
        from vlmforge.families.qwen2_5_vl_hf import visual_module_class

        return visual_module_class()(model).eval()

    def save_visual_extras(self, model: Any, vision_dir: Path) -> None:
        """``vision_rope.safetensors``: the tower's rotary inverse frequencies and its window size (pixels)."""
        import torch
        from safetensors.torch import save_file

        visual = model.model.visual
        inv_freq = visual.rotary_pos_emb.inv_freq.detach().to("cpu", copy=True).float().contiguous()
        window = torch.tensor([int(visual.config.window_size)], dtype=torch.int64)
        save_file({ROPE_KEY: inv_freq, WINDOW_KEY: window}, str(Path(vision_dir) / ROPE_FILE))

    def load_visual_extras(self, vision_dir: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = Path(vision_dir) / ROPE_FILE
        extras = load_file(str(path)) if path.is_file() else {}
        if set(extras) != {ROPE_KEY, WINDOW_KEY}:
            raise FileNotFoundError(f"{path}: a qwen2_5_vl visual engine needs its rope frequencies and window size "
                                    "beside it (the hf toolchain's visual stage writes them): rebuild the engine")
        return extras

    def module_extras(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        import torch

        visual: Any = module.visual
        return {ROPE_KEY: visual.rotary_pos_emb.inv_freq,
                WINDOW_KEY: torch.tensor([int(visual.config.window_size)], dtype=torch.int64)}

    def engine_feed(self, rows: torch.Tensor, grids: list[tuple[int, int, int]],
                    extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Qwen2-VL's rows, rope table and image mask, with the window order of the merged units and the window
        mask (rows in window order) between them (the module's argument order)."""
        from vlmforge.families.qwen2_5_vl_hf import window_mask, window_order

        feed = super().engine_feed(rows, grids, extras)
        order, windows = window_order(grids, int(extras[WINDOW_KEY][0]), PATCH, MERGE)
        return {"rows": feed["rows"], "rotary_pos_emb": feed["rotary_pos_emb"], "window_index": order,
                "window_mask": window_mask(windows, MERGE * MERGE), "attention_mask": feed["attention_mask"]}
