"""NVIDIA ModelOpt: the quantization recipes TensorRT-LLM 1.2's quantize.py applies, calibration, and the fake-quant
LLM saved and restored (how the hf runner serves int4_awq, w4a8_awq, int8_sq, fp8 and quantized KV caches).

The recipes mirror ``tensorrt_llm/quantization/quantize_by_modelopt.py`` (1.2), with two deliberate differences:
the int8 KV cache quantizes the attention's k/v matmul inputs (``*[kv]_bmm_quantizer``, as ModelOpt's own FP8 KV
config does), because 1.2's ``*.k_proj.output_quantizer`` entries have no effect on transformers' LLaMA (the
checkpoint came out with ``kv_cache_quant_algo: null``); and the weight-only formats are not calibrated (TensorRT-LLM
writes fp16 weights and quantizes them when it builds). ModelOpt 0.47 writes its configs as lists of entries,
0.37 (NVIDIA's 1.2 image) as dicts: both are handled. Calibration runs on whatever device the model is on.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import torch

from vlmforge.errors import ToolchainUnavailable
from vlmforge.specs.schema import KvCacheDtype, QuantMethod

log = logging.getLogger(__name__)

STATE_FILE = "modelopt_state.pth"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "modelopt.json"

PRESETS = {
    QuantMethod.INT4_AWQ: "INT4_AWQ_CFG",
    QuantMethod.W4A8_AWQ: "W4A8_AWQ_BETA_CFG",
    QuantMethod.INT8_SQ: "INT8_SMOOTHQUANT_CFG",
    QuantMethod.FP8: "FP8_DEFAULT_CFG",
}
"""quantize.py --qformat -> ModelOpt's preset config (the same names in ModelOpt 0.37 and 0.47)."""

_NOTHING = {"*weight_quantizer": {"enable": False}, "*input_quantizer": {"enable": False},
            "*lm_head*": {"enable": False}, "*output_layer*": {"enable": False}, "default": {"enable": False}}
"""quantize_by_modelopt's EMPTY_CFG: every quantizer off (weight-only formats with a quantized KV cache)."""

KV_ENTRIES = {
    KvCacheDtype.FP8: {"*[kv]_bmm_quantizer": {"num_bits": (4, 3), "axis": None, "enable": True}},
    KvCacheDtype.INT8: {"*[kv]_bmm_quantizer": {"num_bits": 8, "axis": None, "enable": True}},
}


def require_modelopt() -> str:
    """ModelOpt's version; a clear error where it is not installed."""
    try:
        import modelopt
    except ImportError as exc:
        raise ToolchainUnavailable(
            f"NVIDIA ModelOpt is not installed ({exc}): pip install -c constraints.txt -e '.[hf]' (nvidia-modelopt)"
        ) from None
    return str(modelopt.__version__)


def _is_list_cfg(cfg: dict[str, Any]) -> bool:
    return isinstance(cfg["quant_cfg"], list)


def _set_block_size(cfg: dict[str, Any], block: int) -> None:
    """The int4 group (quantize.py --awq_block_size), in either config form."""
    if _is_list_cfg(cfg):
        entries = [e["cfg"] for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e]
    else:
        entries = [cfg["quant_cfg"]["*weight_quantizer"]]
    for entry in entries:
        first = entry[0] if isinstance(entry, list) else entry
        first["block_sizes"].pop("-1", None)
        first["block_sizes"][-1] = block


def _add_entries(cfg: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
    """Add ``{pattern: attributes}`` entries (the dict form) to a config of either form."""
    if _is_list_cfg(cfg):
        for pattern, attributes in entries.items():
            attributes = dict(attributes)
            entry: dict[str, Any] = {"quantizer_name": pattern, "enable": attributes.pop("enable", True)}
            if attributes:
                entry["cfg"] = attributes
            cfg["quant_cfg"].append(entry)
    else:
        cfg["quant_cfg"].update(copy.deepcopy(entries))


def quant_config(method: QuantMethod, kv_cache: KvCacheDtype = KvCacheDtype.AUTO, group_size: int = 128) -> dict[str, Any] | None:
    """The ModelOpt config quantize.py builds for ``method`` and ``kv_cache``; None where nothing is calibrated."""
    import modelopt.torch.quantization as mtq

    if method in PRESETS:
        cfg = copy.deepcopy(getattr(mtq, PRESETS[method]))
        if method in (QuantMethod.INT4_AWQ, QuantMethod.W4A8_AWQ):
            _set_block_size(cfg, group_size)
    elif kv_cache is not KvCacheDtype.AUTO:  # in the form the installed ModelOpt writes its presets in
        listed = isinstance(mtq.FP8_DEFAULT_CFG["quant_cfg"], list)
        cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}] if listed else copy.deepcopy(_NOTHING),
               "algorithm": "max"}
    else:
        return None
    if kv_cache is not KvCacheDtype.AUTO:
        _add_entries(cfg, KV_ENTRIES[kv_cache])
    _no_norm_quantizers(cfg)
    return cfg


def _no_norm_quantizers(cfg: dict[str, Any]) -> None:
    """No quantizer on ``nn.LayerNorm`` (OPT's norms): the presets' ``*input_quantizer`` pattern also switches on
    ModelOpt's QuantLayerNorm input quantizer, which no engine has (TensorRT-LLM's norms run in float, and neither
    export writes a scale for it), so the fake-quant model would compute what nothing serves."""
    if _is_list_cfg(cfg):
        cfg["quant_cfg"].append({"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False})
    else:
        cfg["quant_cfg"]["nn.LayerNorm"] = {"*": {"enable": False}}


def calibrate(llm: torch.nn.Module, method: QuantMethod, kv_cache: KvCacheDtype, group_size: int,
              batches: Sequence[dict[str, torch.Tensor]]) -> bool:
    """Insert ModelOpt's quantizers into ``llm`` (in place) and calibrate them by running ``llm(**batch)`` over
    ``batches`` (inputs_embeds, attention_mask, position_ids); False (``llm`` untouched) where the format
    calibrates nothing (weight-only without a quantized KV cache)."""
    import modelopt.torch.quantization as mtq

    cfg = quant_config(method, kv_cache, group_size)
    if cfg is None:
        return False
    if not batches:
        raise ValueError("calibration needs at least one batch")

    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    with redirect_stdout(sys.stderr):  # ModelOpt prints progress on stdout, which `--json` keeps for its result
        mtq.quantize(llm, cfg, forward_loop=forward_loop)
    return True


def save_fake_quant(llm: torch.nn.Module, out_dir: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The fake-quant LLM: config.json, model.safetensors (weights in ``dtype``, quantizer buffers as they are) and
    modelopt_state.pth (ModelOpt's record of the quantizers it inserted; torch.save). Returns modelopt.json."""
    import modelopt.torch.opt as mto
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, value in llm.state_dict().items():
        if value.numel() and value.data_ptr() in seen:
            aliases[key] = seen[value.data_ptr()]
            continue
        seen[value.data_ptr()] = key
        is_weight = value.is_floating_point() and "quantizer" not in key
        state[key] = (value.to(dtype) if is_weight else value).detach().to("cpu").contiguous()
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    torch.save(mto.modelopt_state(llm), out_dir / STATE_FILE)
    config = copy.deepcopy(llm.config)  # type: ignore[attr-defined]
    config.dtype = dtype
    config.save_pretrained(out_dir)
    meta = {"modelopt": require_modelopt(), "aliases": aliases}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def load_fake_quant(model_cls: type, out_dir: Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """The fake-quant LLM :func:`save_fake_quant` wrote, quantizers restored (same ModelOpt version only: its
    saved state does not restore across versions)."""
    import modelopt.torch.opt as mto
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from vlmforge.modeling.devices import model_from_config

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / META_FILE).read_text())
    installed = require_modelopt()
    if meta["modelopt"] != installed:
        raise ToolchainUnavailable(f"{out_dir} was quantized with ModelOpt {meta['modelopt']}; this machine has "
                                   f"{installed}, and ModelOpt's saved state restores only in the same version: "
                                   f"install nvidia-modelopt=={meta['modelopt']} or rebuild the engine")
    config = AutoConfig.from_pretrained(out_dir)
    with torch.device(device):
        model = model_from_config(model_cls, config, dtype)
    # ModelOpt's state holds no tensors of ours: a plain pickle of its own records (trusted: our own artifact)
    with redirect_stdout(sys.stderr):
        model = mto.restore_from_modelopt_state(model, torch.load(out_dir / STATE_FILE, weights_only=False))
    state = load_file(str(out_dir / WEIGHTS_FILE), device=str(device))
    for alias, source in meta["aliases"].items():
        state[alias] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{out_dir}: the fake-quant weights do not fit {model_cls.__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.to(dtype).eval()  # the quantizers' buffers too (AWQ/SmoothQuant multiply inputs by theirs)


def _quantizers(llm: torch.nn.Module) -> list[tuple[str, Any]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [(name, module) for name, module in llm.named_modules() if isinstance(module, TensorQuantizer)]


@contextmanager
def kv_cache_quantizers_off(llm: torch.nn.Module) -> Iterator[None]:
    """The fake-quant LLM without its KV-cache quantizers for a while (what a read-back checkpoint is compared with:
    the KV cache's quantization happens in the engine's attention, not in the checkpoint's tensors)."""
    switched = [q for name, q in _quantizers(llm) if name.endswith(("k_bmm_quantizer", "v_bmm_quantizer")) and q.is_enabled]
    for quantizer in switched:
        quantizer.disable()
    try:
        yield
    finally:
        for quantizer in switched:
            quantizer.enable()


def round_pre_quant_scales(llm: torch.nn.Module, dtype: torch.dtype) -> int:
    """Round every pre-quant scale (AWQ, SmoothQuant) to ``dtype`` in place, as the checkpoint stores them: the
    engine multiplies by the rounded ones. Returns how many there were."""
    count = 0
    for _, quantizer in _quantizers(llm):
        scale = getattr(quantizer, "pre_quant_scale", None)
        if scale is not None:
            quantizer.pre_quant_scale = scale.to(dtype).to(scale.dtype)
            count += 1
    return count


def round_weights_as_exported(llm: torch.nn.Module) -> int:
    """Set the int8 (SmoothQuant) and FP8 weights of the fake-quant ``llm`` in place to what ModelOpt's exporters
    write for them. The exporters quantize ``w / (amax / maxbound)`` with ``round`` (half to even); the fake-quant
    forward rounds ``w * (maxbound / amax)``. Where ``w`` falls on a rounding tie in float32 the two give codes one
    step apart. With activation quantization downstream, that one step moves the logits by percents of their scale
    (tiny-vila int8_sq, 16 calibration samples: one q_proj code, 0.062 of 2.78). The weight quantizers then
    re-quantize the rounded weights to themselves. Returns how many linears were rounded."""
    from modelopt.torch.export.model_config import QUANTIZATION_FP8, QUANTIZATION_INT8_SQ
    from modelopt.torch.export.quant_utils import get_quantization_format, get_weight_scaling_factor

    count = 0
    with torch.inference_mode():  # the TensorRT-LLM export leaves inference tensors behind
        for module in llm.modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is None or not getattr(quantizer, "is_enabled", False):
                continue
            kind = get_quantization_format(module)
            if kind not in (QUANTIZATION_INT8_SQ, QUANTIZATION_FP8):
                continue
            scale = get_weight_scaling_factor(module).float()
            scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)  # per tensor / per channel
            weight = module.weight.float() / scale
            codes = weight.round().clamp(-128, 127) if kind == QUANTIZATION_INT8_SQ else (
                weight.to(torch.float8_e4m3fn).float())
            module.weight.copy_((codes * scale).to(module.weight.dtype))
            count += 1
    return count


def quantizer_summary(llm: torch.nn.Module) -> dict[str, int]:
    """Enabled ModelOpt quantizers by kind (weight, input, k_bmm, v_bmm): what calibration switched on."""
    counts: dict[str, int] = {}
    for name, quantizer in _quantizers(llm):
        if quantizer.is_enabled:
            parts = name.split(".")
            kind = (parts[-2] if parts[-1].isdigit() else parts[-1]).removesuffix("_quantizer")  # W4A8: int4, then fp8
            counts[kind] = counts.get(kind, 0) + 1
    return counts
