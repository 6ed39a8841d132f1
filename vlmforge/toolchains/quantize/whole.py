"""The whole VLM as ModelOpt's unified Hugging Face checkpoint: the ``hf/`` folder of a quantized hf build with
``artifacts.hf_checkpoint`` (what ``vlmforge deploy --backend trtllm-serve`` pulls).

As ModelOpt's ``examples/llm_ptq/hf_ptq.py`` does for VLMs: the language model is quantized (the hf quantize stage's
fake-quant LLM, which shares its modules with the full model) and ``export_hf_checkpoint`` is run on the *full* model:
config.json of the whole VLM with its ``quantization_config``, ``hf_quant_config.json``, safetensors with the LLM's
packed weights and scales and the vision tower and projector in float, plus the processor's files (tokenizer, image
processor, chat template). Exported in float32 and verified there by reading it back (dequantized into the
transformers model of the whole VLM by ``from_pretrained``, the LLM's inputs quantized as the engine does), then its
float tensors cast to the spec's dtype (:func:`~vlmforge.modeling.unified.cast_unified`).
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from vlmforge.errors import BuildError, SpecError, ValidationFailed
from vlmforge.toolchains.quantize.llm import LogitComparison

if TYPE_CHECKING:
    import torch

    from vlmforge.families import ResolvedSpec

READBACK_TOLERANCE = 0.01
"""Largest read-back vs exported-model logit difference, relative to the reference's logit scale (as for
``vlmforge checkpoint --kind unified``: a layout or packing error moves logits by the scale itself)."""


UNIFIED_REFUSED = {
    "vila": "VILA1.5's model is its own code, not a transformers class, and ModelOpt 0.47's export_hf_checkpoint "
            "fails on it ('VilaModel' object has no attribute 'device', in the exporter's dummy forward)",
    "blip2-opt": "ModelOpt 0.47's export_hf_checkpoint fails on Blip2ForConditionalGeneration (its dummy forward "
                 "passes input_ids where BLIP-2 takes pixel_values first), and trtllm-serve's multimodal matrix "
                 "has no BLIP-2 to load the folder",
}
"""Families whose whole-model unified export fails in ModelOpt (tried on their tiny models): refused, not faked."""


class WholeModelExport(BaseModel):
    """What the quantize stage wrote as ``hf/`` and how it read back."""

    kind: str = "unified"
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    exclude_modules: list[str]
    architecture: str | None
    dtype: str
    files: list[str]
    bytes: int
    quantized_linears: int
    """Linears stored quantized (the LLM's decoder layers)."""
    float_tensors_checked: int
    """Tensors outside the LLM (vision tower, projector) read back equal to the float model's (float32, before the
    cast)."""
    float_tensors_cast: int
    readback_vs_exported: LogitComparison
    """The read-back LLM against the fake-quant LLM as the exporter stores it (fused layers re-smoothed, int8/FP8
    weights rounded as exported, KV-cache quantizers off): the gate (``tolerance``)."""
    readback_vs_served: LogitComparison
    """Against the fake-quant LLM the hf runner serves (llm/, validated by the build): what the export's
    re-smoothing of fused layers moves."""
    readback_vs_reference: LogitComparison
    """Against the float32 reference: gated by validation.max_logit_error (next token)."""
    tolerance: float
    export_seconds: float


def check_whole_export(resolved: ResolvedSpec) -> None:
    """What a unified whole-model folder cannot be made for, refused before any work (the spec rule refuses the
    formats: :func:`vlmforge.specs.derived`)."""
    spec, family = resolved.spec, resolved.family
    if not (spec.artifacts.hf_checkpoint and spec.quantization.active):
        return
    if family.name in UNIFIED_REFUSED:
        raise SpecError(f"{family.name}: no unified checkpoint of the whole model for a quantized build: "
                        f"{UNIFIED_REFUSED[family.name]}; set artifacts.hf_checkpoint: false (or quantization.method: "
                        "none for the float folder)", path="artifacts.hf_checkpoint")
    if family.encoder_decoder:
        raise SpecError(f"{family.name}: ModelOpt's unified export of an encoder-decoder VLM is not verified here "
                        "(its read-back needs the decoder's cross-attention inputs): set artifacts.hf_checkpoint: "
                        "false", path="artifacts.hf_checkpoint")


def _llm_module_names(activations: dict[str, Any], llm: Any) -> dict[str, Any]:
    """The checkpoint's names of the quantized linears (the hub's: ``model.layers.N...`` or
    ``model.language_model.layers.N...``) as the standalone LLM's module names, matched from ``layers.`` on."""
    names = {name[name.index("layers."):]: name for name, _ in llm.named_modules() if "layers." in name}
    mapped = {}
    for name, value in activations.items():
        key = name[name.index("layers."):] if "layers." in name else name
        if key not in names:
            raise BuildError(f"the unified checkpoint's quantized linear {name} is no module of the LLM")
        mapped[names[key]] = value
    return mapped


def mark_float_modules(model: Any, llm: Any) -> list[str]:
    """Give the linears outside the LLM (vision tower, projector) disabled ModelOpt quantizers, as hf_ptq.py's
    quantization of the full model with its vision part switched off does: ModelOpt lists a module in
    ``exclude_modules`` only if it carries a quantizer (even a disabled one), and a loader (TensorRT-LLM, vLLM, SGLang)
    takes a linear not listed there as quantized. Returns the marked submodules' names."""
    import torch
    import modelopt.torch.quantization as mtq

    inside = {id(m) for m in llm.modules()}
    llm_params = {id(p) for p in llm.parameters()}
    marked: list[str] = []
    for name, module in model.named_modules():
        if id(module) in inside or any(name.startswith(done + ".") for done in marked):
            continue
        params = list(module.parameters())
        if (params and not any(id(p) in llm_params for p in params)
                and any(isinstance(m, torch.nn.Linear) for m in module.modules())):
            marked.append(name)
    listed = isinstance(mtq.FP8_DEFAULT_CFG["quant_cfg"], list)
    off = {"quant_cfg": [{"quantizer_name": "*", "enable": False}] if listed else {"*": {"enable": False}},
           "algorithm": None}
    with redirect_stdout(sys.stderr):
        for name in marked:
            mtq.quantize(model.get_submodule(name), off)
    return marked


def align_exclusions(out_dir: Path, model: Any) -> list[str]:
    """``exclude_modules`` in the names the checkpoint's tensors are saved under. ModelOpt 0.47 maps its in-memory
    module names back to the hub's only under transformers 5 (under 4.57, Gemma3's ``model.vision_tower*`` stayed
    while the tensors were saved as ``vision_tower.*``, and a loader would take the tower as quantized): an entry that
    names no saved tensor is mapped back through the model's ``_checkpoint_conversion_mapping``. Returns the list
    (hf_quant_config.json and config.json's ``quantization_config.ignore`` rewritten where it changed)."""
    import json
    import re
    from fnmatch import fnmatch

    from safetensors import safe_open

    keys: list[str] = []
    for shard in out_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys += list(f.keys())

    def names_some(pattern: str) -> bool:
        return any(fnmatch(key, pattern) or key.startswith(pattern + ".") for key in keys)

    quant_path = out_dir / "hf_quant_config.json"
    quant = json.loads(quant_path.read_text())
    excluded = list(quant["quantization"].get("exclude_modules") or [])
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    aligned = []
    for pattern in excluded:
        if not names_some(pattern):
            for saved, loaded in mapping.items():
                candidate = re.sub("^" + re.escape(loaded), saved.lstrip("^"), pattern)
                if candidate != pattern and names_some(candidate):
                    pattern = candidate
                    break
        aligned.append(pattern)
    if aligned != excluded:
        quant["quantization"]["exclude_modules"] = aligned
        quant_path.write_text(json.dumps(quant, indent=4))
        config = json.loads((out_dir / "config.json").read_text())
        if isinstance(config.get("quantization_config"), dict) and "ignore" in config["quantization_config"]:
            config["quantization_config"]["ignore"] = aligned
            (out_dir / "config.json").write_text(json.dumps(config, indent=4))
    return aligned


def read_back_whole(resolved: ResolvedSpec, folder: Path, scratch: Path,
                    device: str) -> tuple[Any, Any, dict[str, Any]]:
    """The unified folder dequantized into the family's transformers model of the whole VLM (``from_pretrained`` of
    a float copy in ``scratch``, removed after): (the whole model, its LLM with the engine's input quantization
    simulated, hf_quant_config's ``quantization``)."""
    import json

    import torch
    from safetensors.torch import save_file

    from vlmforge.modeling.trtllm.readback import Readback, simulate_activations
    from vlmforge.modeling.unified import dequantize_unified
    from vlmforge.toolchains.quantize.llm import standalone_llm

    quant, state, activations = dequantize_unified(folder)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        (scratch / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in state.items()}, str(scratch / "model.safetensors"),
                  metadata={"format": "pt"})
        whole = resolved.family.load_model(scratch, torch.float32, device=device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    llm = standalone_llm(resolved.family, whole)
    readback = Readback(model=llm, quant_algo=quant["quant_algo"], kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
                        activations=_llm_module_names(activations, llm), kv_scales=quant.get("kv_scales") or {})
    simulate_activations(readback)
    quant["quantized_linears"] = len(_quantized_names(folder))
    return whole, llm, quant


def _quantized_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= {key.removesuffix(".weight_scale") for key in f.keys() if key.endswith(".weight_scale")}
    return names


def export_whole_model(resolved: ResolvedSpec, model: Any, llm: Any, processor: Any, golden: list[Any],
                       served: list[torch.Tensor], reference: list[torch.Tensor], out_dir: Path,
                       device: str) -> WholeModelExport:
    """Export the whole ``model`` (float32; its LLM ``llm`` calibrated by ModelOpt, ``served``: that LLM's logits on
    ``golden`` as the hf runner serves it) as a unified checkpoint into ``out_dir``, read it back and check it, and
    store it in the spec's dtype with the processor's files. ``model`` is spent: the export packs the LLM's weights
    in place. A folder that fails its checks is removed."""
    from vlmforge.modeling import modelopt as mo
    from vlmforge.modeling.unified import cast_unified, export_unified, prepare_unified
    from vlmforge.toolchains.quantize.llm import batch_logits, compare_logits

    spec = resolved.spec
    out_dir = Path(out_dir)
    start = time.perf_counter()
    llm_tensors = {t.data_ptr() for t in llm.state_dict().values()}
    outside_names = [name for name, t in model.state_dict().items() if t.data_ptr() not in llm_tensors]
    prepare_unified(model)  # what the exporter does first (shared pre-quant scale and amax of fused q/k/v, gate/up)
    import torch

    stored = getattr(torch, spec.dtype.value)
    with torch.inference_mode():  # the LLM's float tensors as llm/ stores them (the quantizers keep their scales)
        for param in llm.parameters():
            if param.is_floating_point():
                param.copy_(param.to(stored).to(param.dtype))
    mo.round_weights_as_exported(llm)
    with mo.kv_cache_quantizers_off(llm):
        exported = batch_logits(llm, golden)  # the export packs the weights in place: run it first
    try:
        marked = mark_float_modules(model, llm)
        if not marked:
            raise BuildError(f"{resolved.family.name}: no module of the full model lies outside its LLM (no vision "
                             "tower or projector found to keep in float)")
        export_unified(model, out_dir)  # the full model, as hf_ptq.py exports a VLM
        align_exclusions(out_dir, model)
        seconds = time.perf_counter() - start
        current = model.state_dict()
        outside = {name: current[name] for name in outside_names}
        whole, back, quant = read_back_whole(resolved, out_dir, out_dir.parent / f".{out_dir.name}-readback", device)
        read = batch_logits(back, golden)
        loaded = whole.state_dict()
        differ = [name for name, value in outside.items()
                  if name not in loaded or not torch_equal(loaded[name], value)]
        if differ:
            raise BuildError(f"{out_dir}: the unified export's tensors outside the LLM (vision tower, projector) do "
                             f"not read back as the float model's: {differ[:5]}")
        vs_exported, vs_reference = compare_logits(read, exported, golden), compare_logits(read, reference, golden)
        tolerance = round(READBACK_TOLERANCE * max(vs_reference.scale, 1.0), 6)
        if vs_exported.max_error > tolerance:
            raise BuildError(f"the unified checkpoint in {out_dir} does not read back as the quantized model: logits "
                             f"differ by {vs_exported.max_error:.4f} (allowed {tolerance:.4f})")
        if vs_reference.next_token_error > spec.validation.max_logit_error:
            raise ValidationFailed(
                f"{spec.name} {spec.quantization.method.value}: the unified checkpoint's next-token logits differ from "
                f"the float32 reference by {vs_reference.next_token_error:.4f} (validation.max_logit_error "
                f"{spec.validation.max_logit_error}): calibrate on more or better data, pick another format, or "
                "relax the threshold")
        cast = cast_unified(out_dir, spec.dtype.value)
        processor.save_pretrained(out_dir)
    except Exception:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    architectures = getattr(model.config, "architectures", None) or [None]
    return WholeModelExport(
        quant_algo=quant.get("quant_algo"), kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
        exclude_modules=list(quant.get("exclude_modules") or []), architecture=architectures[0],
        dtype=spec.dtype.value, files=[p.relative_to(out_dir).as_posix() for p in files],
        bytes=sum(p.stat().st_size for p in files), quantized_linears=quant["quantized_linears"],
        float_tensors_checked=len(outside), float_tensors_cast=cast, readback_vs_exported=vs_exported,
        readback_vs_served=compare_logits(read, served, golden), readback_vs_reference=vs_reference,
        tolerance=tolerance, export_seconds=round(seconds, 3),
    )


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(a.shape == b.shape and torch.equal(a.detach().float().cpu(), b.detach().float().cpu()))
