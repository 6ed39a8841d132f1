"""What this machine is: library versions and hardware, recorded in every manifest."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil

from pydantic import BaseModel

from vlmforge.errors import ToolchainUnavailable

TRACKED_PACKAGES = ("vlmforge", "torch", "transformers", "nvidia-modelopt", "onnx", "onnxruntime", "tensorrt",
                    "tensorrt_llm", "safetensors")


class Hardware(BaseModel):
    """The build or run machine."""

    cpu: str
    cpu_count: int
    gpu_name: str | None = None
    gpu_count: int = 0
    compute_capability: str | None = None
    """e.g. "9.0" for H100; None without a GPU."""


def versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape an engine (absent ones are left out)."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def hardware() -> Hardware:
    """This machine's CPU and GPUs (torch is asked only if it is already installed)."""
    info = Hardware(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count() or 1)
    try:
        import torch
    except ImportError:
        return info
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info.gpu_name = torch.cuda.get_device_name(0)
        info.gpu_count = torch.cuda.device_count()
        info.compute_capability = f"{major}.{minor}"
    return info


def require_trtllm() -> str:
    """TensorRT-LLM's version, or a clear refusal where it is not installed."""
    if importlib.util.find_spec("tensorrt_llm") is None or shutil.which("trtllm-build") is None:
        raise ToolchainUnavailable(
            "TensorRT-LLM is not installed here: --toolchain trtllm runs inside NVIDIA's TensorRT-LLM container "
            "(containers/builder, on a GPU machine). Use --toolchain hf anywhere else, or `vlmforge plan` to see the commands."
        )
    return importlib.metadata.version("tensorrt_llm")
