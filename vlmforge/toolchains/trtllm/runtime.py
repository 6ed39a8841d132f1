"""What a trtllm build needs from TensorRT-LLM itself, declared once: its version, the GPU's architecture,
executing a plan, and loading the built engine.

:class:`ContainerRuntime` is the real one (NVIDIA's TensorRT-LLM container with a GPU); elsewhere its first call
refuses with :class:`~vlmforge.errors.ToolchainUnavailable`. Everything else of a trtllm build (the plan,
engine.json, the processor, validation against the hf reference, the manifest, publishing) is TensorRT-free.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from vlmforge.plans.model import Plan
from vlmforge.runner.protocol import Generation
from vlmforge.system.env import require_trtllm
from vlmforge.toolchains.trtllm.execute import StepRun, execute_plan


class GeneratingEngine(Protocol):
    """What validation asks of a built engine: one greedy request."""

    def generate(self, image: Any, prompt: str | None, max_new_tokens: int) -> Generation: ...


class TrtllmRuntime(Protocol):
    """TensorRT-LLM as a trtllm build uses it."""

    reference_device: str
    """Where the float32 hf reference runs during validation."""

    def version(self) -> str:
        """TensorRT-LLM's version; refuses where it is not installed."""
        ...

    def compute_capability(self) -> str:
        """The GPU's architecture ("9.0"): a TensorRT engine runs only there."""
        ...

    def execute(self, plan: Plan, workspace: Path, on_line: Callable[[str], None], *, inputs: str) -> list[StepRun]:
        """Run the plan's steps (resuming completed ones), passing every output line to ``on_line``."""
        ...

    def load_engine(self, engine_dir: Path, hf_model_dir: Path) -> GeneratingEngine:
        """The built engine behind the runner's interface."""
        ...


class ContainerRuntime:
    """The real runtime: TensorRT-LLM installed in this (NVIDIA) container, and a CUDA GPU."""

    reference_device = "cuda"

    def version(self) -> str:
        return require_trtllm()

    def compute_capability(self) -> str:
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        return f"{major}.{minor}"

    def execute(self, plan: Plan, workspace: Path, on_line: Callable[[str], None], *, inputs: str) -> list[StepRun]:
        return execute_plan(plan, workspace, workspace / "logs", on_line, inputs=inputs)

    def load_engine(self, engine_dir: Path, hf_model_dir: Path) -> GeneratingEngine:
        from vlmforge.runner.trtllm import TrtllmEngine

        return TrtllmEngine(engine_dir, hf_model_dir=hf_model_dir)
