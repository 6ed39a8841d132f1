"""VILA's model parts as torch modules: the projector of our own, the visual module, the assembled model, loaders.

What the checkpoints declare, and why the ``mlp_downsample`` token order is what it is, is in
:mod:`vlmforge.families.vila_config`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlmforge.errors import SourceError
from vlmforge.families.vila_config import (
    PROJECTOR_PREFIX_V10,
    TOWER_CLASSES,
    TOWER_PREFIX_V10,
    VLMFORGE_KEY,
    SelectFeature,
    TokenOrder,
    VilaSettings,
    default_token_order,
    parse_settings,
    projector_kind,
    read_config,
)

# --- the projector (llava/model/multimodal_projector/base_projector.py, rewritten) ----------------------------


def merge_patches(x: torch.Tensor, k: int, order: TokenOrder) -> torch.Tensor:
    """[B, s*s, C] row-major patch grid -> [B, ceil(s/k)^2, k*k*C]: each k x k block becomes one token.

    Zero rows and columns are added at the bottom and right to make s a multiple of k (VILA pads 27 -> 28).
    A merged token's channels are its block's patches row by row (k=2: top-left, top-right, bottom-left,
    bottom-right). ``order``: ``column`` lists the merged tokens column by column (VILA1.5's
    ``mlp_downsample``), ``row`` row by row (NVILA-era ``mlp_downsample``, the ``*_fix`` types).
    """
    b, n, c = x.shape
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{n} vision tokens are not a square grid")
    pad = (-s) % k
    grid = F.pad(x.reshape(b, s, s, c), (0, 0, 0, pad, 0, pad))
    m = (s + pad) // k
    blocks = grid.reshape(b, m, k, m, k, c).permute(0, 1, 3, 2, 4, 5)  # [B, i, j, di, dj, C]
    if order == "column":
        blocks = blocks.transpose(1, 2)  # [B, j, i, di, dj, C]
    elif order != "row":
        raise ValueError(f"token order must be 'column' or 'row', got {order!r}")
    return blocks.reshape(b, m * m, k * k * c)


class MergePatches(nn.Module):
    """Layer 0 of the downsample projectors (VILA's DownSampleBlock): no parameters."""

    def __init__(self, k: int, order: TokenOrder) -> None:
        super().__init__()
        self.k, self.order = k, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge_patches(x, self.k, self.order)

    def extra_repr(self) -> str:
        return f"k={self.k}, order={self.order}"


def projector_layers(kind: str, d: int, h: int, order: TokenOrder) -> nn.Module:
    """VILA's ``MultimodalProjector.layers`` with VILA's indices, so VILA's tensor names load as they are."""
    group, n = projector_kind(kind)
    if group == "identity":
        return nn.Identity()
    if group == "linear":
        return nn.Linear(d, h)  # layers.weight, layers.bias
    if group == "mlp":
        mods: list[nn.Module] = [nn.Linear(d, h)]
        for _ in range(n - 1):
            mods += [nn.GELU(), nn.Linear(h, h)]
        return nn.Sequential(*mods)  # layers.0, layers.2, ...
    if n == 2:  # layers.1 (LayerNorm), .2, .4
        return nn.Sequential(MergePatches(2, order), nn.LayerNorm(4 * d), nn.Linear(4 * d, h), nn.GELU(), nn.Linear(h, h))
    return nn.Sequential(MergePatches(3, order), nn.LayerNorm(9 * d), nn.Linear(9 * d, 3 * d), nn.GELU(),
                         nn.LayerNorm(3 * d), nn.Linear(3 * d, h), nn.GELU(), nn.Linear(h, h))  # layers.1,2,4,5,7


class VilaProjector(nn.Module):
    """VILA's MultimodalProjector (``self.layers`` only): vision features [B, N, d] -> LLM rows [B, N', h].

    ``order``: the downsample types' token order, by default the type's own (:func:`default_token_order`)."""

    def __init__(self, kind: str, mm_hidden_size: int, hidden_size: int, order: TokenOrder | None = None) -> None:
        super().__init__()
        order = order or default_token_order(kind)
        if kind.endswith("_fix") and order != "row":
            raise ValueError(f"{kind} lists its merged tokens row by row; got order {order!r}")
        self.kind, self.order = kind, order
        self.layers = projector_layers(kind, mm_hidden_size, hidden_size, order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VilaVisualModule(nn.Module):
    """pixel_values [B, 3, H, W] -> projected features [B, N, llm_hidden]: VILA's VisionTower, then the projector."""

    def __init__(self, tower: nn.Module, projector: VilaProjector, select_layer: int, select_feature: SelectFeature) -> None:
        super().__init__()
        self.tower, self.projector = tower, projector
        self.select_layer, self.drop_first = select_layer, select_feature == "patch"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values.to(self.tower.dtype), output_hidden_states=True, return_dict=True)
        features = out.hidden_states[self.select_layer]
        if self.drop_first:
            features = features[:, 1:]
        return self.projector(features)


# --- the assembled model ------------------------------------------------------------------------------------


class VilaConfig:
    """The top-level config.json of the VILA1.5 layout, written for the model's current parts."""

    def __init__(self, model: VilaModel) -> None:
        self._model = model
        self.dtype: torch.dtype = next(model.llm.parameters()).dtype

    def to_dict(self) -> dict[str, Any]:
        m, s = self._model, self._model.settings
        tower_cls = type(m.vision_tower).__name__
        return {
            "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
            "llm_cfg": m.llm.config.to_dict() | {"_name_or_path": "./llm", "architectures": ["LlamaForCausalLM"],
                                                 "dtype": str(self.dtype).removeprefix("torch.")},
            "vision_tower_cfg": m.vision_tower.config.to_dict() | {"_name_or_path": "./vision_tower",
                                                                   "architectures": [tower_cls]},
            "mm_projector_cfg": projector_config(s.projector_type),
            "hidden_size": m.llm.config.hidden_size, "mm_hidden_size": s.mm_hidden_size,
            "image_aspect_ratio": s.image_aspect_ratio, "mm_vision_select_layer": s.select_layer,
            "mm_vision_select_feature": s.select_feature, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
            "model_dtype": str(self.dtype),
            VLMFORGE_KEY: {"mm_downsample_token_order": s.token_order, "source_layout": s.layout}
            | ({"conv_mode": s.conv_mode} if s.conv_mode else {}),
        }

    def save_pretrained(self, out_dir: Path) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def projector_config(kind: str) -> dict[str, Any]:
    return {"_name_or_path": "./mm_projector", "architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
            "mm_projector_type": kind}


class VilaModel(nn.Module):
    """The float reference of a VILA checkpoint: ``llm`` (LlamaForCausalLM), ``vision_tower`` (CLIPVisionModel or
    SiglipVisionModel) and ``mm_projector`` (:class:`VilaProjector`), VILA's own attribute names."""

    def __init__(self, llm: Any, tower: Any, projector: VilaProjector, settings: VilaSettings) -> None:
        super().__init__()
        self.llm, self.vision_tower, self.mm_projector = llm, tower, projector
        self.settings = settings
        self.config = VilaConfig(self)

    @classmethod
    def from_pretrained(cls, model_dir: Path, dtype: torch.dtype = torch.float32, device_map: str = "cpu") -> VilaModel:
        return load_vila(Path(model_dir), dtype, device_map)

    @property
    def visual(self) -> VilaVisualModule:
        return VilaVisualModule(self.vision_tower, self.mm_projector, self.settings.select_layer,
                                self.settings.select_feature).eval()

    def save_pretrained(self, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The VILA1.5 layout: ``llm/``, ``vision_tower/``, ``mm_projector/`` and config.json (``state_dict``: the
        tensors to write, e.g. cast copies; the parts' own by default)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        state = state_dict if state_dict is not None else self.state_dict()
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), self.config.dtype)
        for name, part in (("llm", self.llm), ("vision_tower", self.vision_tower)):
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            old = part.config.dtype
            try:
                part.save_pretrained(out / name, state_dict=sub)
                part.config.dtype = dtype  # save_pretrained writes the live module's dtype
                part.config.save_pretrained(out / name)
            finally:
                part.config.dtype = old
        (out / "mm_projector").mkdir(parents=True, exist_ok=True)
        (out / "mm_projector" / "config.json").write_text(json.dumps(projector_config(self.settings.projector_type),
                                                                     indent=2) + "\n")
        projector = {k.removeprefix("mm_projector."): v.contiguous() for k, v in state.items()
                     if k.startswith("mm_projector.")}
        save_file(projector, str(out / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
        old_dtype = self.config.dtype
        try:
            self.config.dtype = dtype
            self.config.save_pretrained(out)
        finally:
            self.config.dtype = old_dtype


# --- loading -------------------------------------------------------------------------------------------------


def read_tensors(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a folder's ``*.safetensors`` (or ``pytorch_model*.bin``) files whose names start with
    ``prefix`` (safetensors: only those are read). Buffers older transformers saved are left out."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise SourceError(f"no weights (*.safetensors or pytorch_model*.bin) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                state |= {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}  # noqa: SIM118
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            state |= {k: v for k, v in loaded.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.endswith(("rotary_emb.inv_freq", "embeddings.position_ids"))}


def fit_vision_keys(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tower tensor names as ``module`` has them: transformers 4 saved ``vision_model.*``, 5 has no such level."""
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in module.state_dict()):
        return {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _checked(loaded: tuple[Any, dict[str, Any]], what: Path) -> Any:
    """from_pretrained(..., output_loading_info=True): a tensor the checkpoint lacks is an error, never random."""
    model, info = loaded
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise SourceError(f"{what} lacks {len(missing)} tensors the model needs: {', '.join(missing[:5])}")
    return model


def _tower_class(model_type: str) -> Any:
    import transformers

    return getattr(transformers, TOWER_CLASSES[model_type])


def _load_v15(root: Path, settings: VilaSettings, dtype: torch.dtype, device: str) -> tuple[Any, Any, nn.Module]:
    from transformers import LlamaForCausalLM

    folders = {name: root / name for name in ("llm", "vision_tower", "mm_projector")}
    for name, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise SourceError(f"{folder}/config.json is missing: a VILA1.5 checkpoint has llm/, vision_tower/ and "
                              f"mm_projector/ sub-folders ({name}/ is incomplete)")
    tower_cfg = read_config(folders["vision_tower"])
    for key in ("model_type", "image_size", "patch_size", "hidden_size"):
        if key in tower_cfg and tower_cfg[key] != settings.tower.get(key):
            raise SourceError(f"vision_tower/config.json says {key} {tower_cfg[key]!r} but config.json's vision_tower_cfg "
                              f"says {settings.tower.get(key)!r}")
    kind = read_config(folders["mm_projector"]).get("mm_projector_type")
    if kind != settings.projector_type:
        raise SourceError(f"mm_projector/config.json says mm_projector_type {kind!r} but config.json's mm_projector_cfg "
                          f"says {settings.projector_type!r}")
    llm = _checked(LlamaForCausalLM.from_pretrained(folders["llm"], dtype=dtype, device_map=device,
                                                    output_loading_info=True), folders["llm"])
    tower = _checked(_tower_class(settings.tower["model_type"]).from_pretrained(
        folders["vision_tower"], dtype=dtype, device_map=device, output_loading_info=True), folders["vision_tower"])
    projector = VilaProjector(kind, settings.mm_hidden_size, llm.config.hidden_size, settings.token_order)
    projector.load_state_dict(read_tensors(folders["mm_projector"]), strict=True)
    return llm, tower, projector


def _load_v10(root: Path, settings: VilaSettings, dtype: torch.dtype, device: str) -> tuple[Any, Any, nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    class _SkipVisual(LlamaForCausalLM):
        """Loads the LLaMA from the shared shards without reporting the tower and projector tensors as unexpected."""

        _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^model\.mm_projector\.", r"^model\.vision_tower\."]

    llm = _checked(_SkipVisual.from_pretrained(root, config=LlamaConfig.from_dict(settings.llm), dtype=dtype,
                                               device_map=device, output_loading_info=True), root)
    llm.__class__ = LlamaForCausalLM  # the same module tree: a plain LlamaForCausalLM from here on
    tower_cls = _tower_class(settings.tower["model_type"])
    tower_state = {k[len(TOWER_PREFIX_V10):]: v for k, v in read_tensors(root, TOWER_PREFIX_V10).items()}
    if tower_state:  # the checkpoint carries its (frozen) tower
        config_cls = _tower_class(settings.tower["model_type"]).config_class
        tower = tower_cls(config_cls(**{k: v for k, v in settings.tower.items() if k != "model_type"}))
        tower.load_state_dict(fit_vision_keys(tower, tower_state), strict=True)
        tower = tower.to(device, dtype)
    else:  # VILA's own path (delay_load): the tower named by mm_vision_tower, from the Hub or a local folder
        assert settings.tower_name is not None
        try:
            loaded = tower_cls.from_pretrained(settings.tower_name, dtype=dtype, device_map=device, output_loading_info=True)
        except OSError as exc:
            raise SourceError(f"{root} holds no tower tensors (model.vision_tower.*), so the tower is mm_vision_tower "
                              f"{settings.tower_name!r} (as VILA loads it), which cannot be loaded: {exc}") from None
        tower = _checked(loaded, Path(settings.tower_name))
    projector = VilaProjector(settings.projector_type, settings.mm_hidden_size, llm.config.hidden_size,
                              settings.token_order)
    state = read_tensors(root, PROJECTOR_PREFIX_V10)
    # v1.0's builder returns the bare Linear / Sequential: model.mm_projector.{weight,0.weight,...} -> layers.*
    projector.load_state_dict({"layers." + k[len(PROJECTOR_PREFIX_V10):]: v for k, v in state.items()}, strict=True)
    return llm, tower, projector


def load_vila(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> VilaModel:
    """A VILA 1.0 or VILA1.5 checkpoint (or vlmforge's converted one) as a :class:`VilaModel` in eval mode."""
    settings = parse_settings(read_config(model_dir))
    load = _load_v15 if settings.layout == "vila1.5" else _load_v10
    llm, tower, projector = load(Path(model_dir), settings, dtype, device)
    return VilaModel(llm.eval(), tower.eval(), projector.to(device, dtype).eval(), settings).eval()
