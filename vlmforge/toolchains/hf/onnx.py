"""ONNX export of visual modules (dynamo first, TorchScript as the fallback) and their check in ONNX Runtime."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vlmforge.modeling.devices import model_device
from vlmforge.toolchains.hf.export_gate import EXPORT_GATE

logger = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]


class OnnxRunError(RuntimeError):
    """ONNX Runtime refused to run an export on an input (a shape outside its axes, a broken graph)."""


@dataclass
class OnnxExportInfo:
    """Where an ONNX export went, which exporter produced it, and why the ones before it failed."""

    path: Path
    exporter: Exporter
    errors: dict[str, str] = field(default_factory=dict)


def export_onnx(
    module: torch.nn.Module,
    path: Path,
    example: torch.Tensor,
    input_name: str = "pixel_values",
    output_name: str = "features",
    opset: int = 18,
    prefer: Sequence[Exporter] = ("dynamo", "torchscript"),
    dynamic_spatial: bool = False,
) -> OnnxExportInfo:
    """Export ``module(example) -> output`` with a dynamic batch axis, trying the exporters in order.

    ``dynamic_spatial`` (families whose visual contract says ``dynamic_spatial_axes``): the input's height and width
    [B, C, H, W] and the output's token axis stay dynamic too; trace on an example whose size differs from the
    module's native square size, or a same-size shortcut (a skipped position-embedding interpolation) is traced in.
    Only ONNX Runtime at a second size proves the axes (the hf visual stage checks two sizes).

    The dynamo exporter (torch.export) comes first; the TorchScript exporter is the fallback. The
    result is checked with ``onnx.checker``. Raises RuntimeError naming every exporter's error.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = example.to(model_device(module))
    errors: dict[str, str] = {}
    for exporter in prefer:
        try:
            with EXPORT_GATE.exclusive(), torch.no_grad():  # no other torch work while torch.export traces
                if exporter == "dynamo":
                    batch = torch.export.Dim("batch", min=1, max=64)
                    # AUTO: torch.export finds the sizes the module takes (e.g. multiples of its patch size)
                    spatial = {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO} if dynamic_spatial else {}
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        input_names=[input_name],
                        output_names=[output_name],
                        dynamic_shapes=({0: batch, **spatial},),
                        opset_version=opset,
                        dynamo=True,
                        external_data=False,
                        verbose=False,
                    )
                else:
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        input_names=[input_name],
                        output_names=[output_name],
                        dynamic_axes={input_name: {0: "batch", **({2: "height", 3: "width"} if dynamic_spatial else {})},
                                      output_name: {0: "batch", **({1: "tokens"} if dynamic_spatial else {})}},
                        opset_version=min(opset, 17),
                        dynamo=False,
                    )
            onnx.checker.check_model(str(path))
            return OnnxExportInfo(path, exporter, errors)
        except Exception as exc:  # noqa: BLE001 - record it and try the next exporter
            errors[exporter] = f"{type(exc).__name__}: {str(exc)[:300]}"
            logger.warning("ONNX export with the %s exporter failed: %s", exporter, errors[exporter])
    raise RuntimeError(f"every ONNX exporter failed: {errors}")


def run_onnx(
    path: Path, pixel_values: torch.Tensor, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> torch.Tensor:
    """Run an exported visual module in onnxruntime; float32 CPU output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))
    name = session.get_inputs()[0].name
    try:
        out = session.run(None, {name: pixel_values.detach().to("cpu", torch.float32).numpy()})[0]
    except Exception as exc:  # onnxruntime's own error classes derive from Exception alone
        raise OnnxRunError(f"ONNX Runtime cannot run {Path(path).name} on an input of shape "
                           f"{tuple(pixel_values.shape)}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def compare_onnx(path: Path, module: torch.nn.Module, pixel_values: torch.Tensor) -> dict[str, float]:
    """Run onnxruntime (CPU) and the torch module on the same batch and compare.

    Returns ``max_abs``, ``max_rel`` (elementwise, against |ref| + 1e-6), ``max_rel_to_scale`` (max
    abs error over the largest |ref|: the robust one) and ``batch``.
    """
    got = run_onnx(path, pixel_values).double().numpy()
    with torch.no_grad():
        ref = module.eval()(pixel_values.to(model_device(module))).double().cpu().numpy()
    diff = np.abs(got - ref)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float((diff / (np.abs(ref) + 1e-6)).max()),
        "max_rel_to_scale": float(diff.max() / (np.abs(ref).max() + 1e-12)),
        "batch": int(pixel_values.shape[0]),
    }


def export_onnx_feeds(
    module: torch.nn.Module,
    path: Path,
    feed: dict[str, torch.Tensor],
    axes: dict[str, dict[int, str]],
    output_name: str = "features",
    opset: int = 18,
) -> OnnxExportInfo:
    """Export a visual module of several inputs (``module(*feed.values())``), its ``axes`` (input or output name ->
    {axis: dim name}; one name = one size) dynamic, with the TorchScript exporter: Qwen2-VL's rows axis appears
    as rows, the mask's two axes and rows/4 in the output, which torch.export's symbolic shapes refuse to relate."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    try:
        with EXPORT_GATE.exclusive(), torch.no_grad():
            torch.onnx.export(module, tuple(feed.values()), str(path), input_names=list(feed),
                              output_names=[output_name], dynamic_axes=axes, opset_version=min(opset, 17),
                              dynamo=False)
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - one exporter: say why it failed
        raise RuntimeError(f"the ONNX export failed: torchscript: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return OnnxExportInfo(path, "torchscript")


def _host_input(value: torch.Tensor) -> np.ndarray:
    """A feed tensor as ONNX Runtime takes it: floating point as float32, integer inputs (Qwen2.5-VL's window order,
    mllama's aspect-ratio ids) in their own dtype."""
    value = value.detach().to("cpu")
    return (value.float() if value.is_floating_point() else value).numpy()


def run_onnx_feed(path: Path, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run an export of several inputs in onnxruntime (CPU) on one feed; float32 CPU output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        out = session.run(None, {name: _host_input(value) for name, value in feed.items()})
    except Exception as exc:  # onnxruntime's own error classes derive from Exception alone
        shapes = {name: tuple(value.shape) for name, value in feed.items()}
        raise OnnxRunError(f"ONNX Runtime cannot run {Path(path).name} on inputs of shapes {shapes}: "
                           f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    return torch.from_numpy(np.asarray(out[0], dtype=np.float32))


def compare_onnx_feed(path: Path, module: torch.nn.Module, feed: dict[str, torch.Tensor]) -> dict[str, float]:
    """:func:`compare_onnx` for a module of several inputs, on one feed (``batch``: the output's rows)."""
    got = run_onnx_feed(path, feed).double().numpy()
    with torch.no_grad():
        ref = module.eval()(*feed.values()).double().cpu().numpy()
    diff = np.abs(got - ref)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float((diff / (np.abs(ref) + 1e-6)).max()),
        "max_rel_to_scale": float(diff.max() / (np.abs(ref).max() + 1e-12)),
        "batch": int(ref.shape[0]),
    }
