"""The TensorRT engine runner: TensorRT-LLM's own multimodal runner, driven like its run.py.

Runs only inside NVIDIA's TensorRT-LLM container with a GPU; elsewhere constructing it raises
:class:`ToolchainUnavailable` before anything is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from vlmforge.engine_config import EngineConfig
from vlmforge.errors import DeployError, ToolchainUnavailable
from vlmforge.families import get_family
from vlmforge.runner.engine import Generation
from vlmforge.toolchains.trtllm import require_trtllm

TRTLLM_ROOT = os.environ.get("VLMFORGE_TRTLLM_ROOT", "/app/tensorrt_llm")
MULTIMODAL_EXAMPLES = "examples/models/core/multimodal"


def _run_py_args(argv: list[str]) -> argparse.Namespace:
    """Parse run.py's own arguments with the release's own parser (examples/.../multimodal/utils.py)."""
    examples = Path(TRTLLM_ROOT) / MULTIMODAL_EXAMPLES
    if not (examples / "utils.py").is_file():
        raise ToolchainUnavailable(f"TensorRT-LLM's multimodal examples are not at {examples} (set VLMFORGE_TRTLLM_ROOT)")
    sys.path.insert(0, str(examples))
    try:
        from utils import add_common_args  # type: ignore[import-not-found]  # the release's run.py helpers
    finally:
        sys.path.remove(str(examples))
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(argv)


class TrtllmEngine:
    """A TensorRT-LLM multimodal engine (engine_dir/{llm,vision}) behind the same interface as HfEngine."""

    def __init__(self, engine_dir: Path, *, hf_model_dir: Path | None = None, device: str | None = None,
                 tp_plan: bool = False) -> None:
        version = require_trtllm()
        self.dir = Path(engine_dir)
        self.config = EngineConfig.read(self.dir)
        if self.config.tensorrt_llm_version and self.config.tensorrt_llm_version != version:
            raise DeployError(f"{self.dir} was built with TensorRT-LLM {self.config.tensorrt_llm_version}, this container "
                              f"has {version}: rebuild the engine or use the matching container")
        import torch
        from tensorrt_llm.runtime import MultimodalModelRunner  # type: ignore[import-not-found]

        major, minor = torch.cuda.get_device_capability(0)
        if self.config.compute_capability and self.config.compute_capability != f"{major}.{minor}":
            raise DeployError(f"{self.dir} was built for compute capability {self.config.compute_capability}, this GPU "
                              f"is {major}.{minor}: TensorRT engines only run on the architecture they were built for")
        hf_dir = hf_model_dir or self.dir / self.config.processor
        args = _run_py_args(["--engine_dir", str(self.dir), "--hf_model_dir", str(hf_dir),
                             "--max_new_tokens", str(self.config.max_output_len)])
        self.runner = MultimodalModelRunner(args)
        self.tokenizer = self.runner.tokenizer
        self.family = get_family(self.config.family)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_token_id = self.tokenizer.eos_token_id

    streams_tokens = False
    """TensorRT-LLM's multimodal runner returns whole generations: the server sends each when it is done."""

    def prompt_length(self, prompt: str | None) -> int:
        """The user text's tokens and the image features (TensorRT-LLM adds its model's template around them and
        enforces the engine's max_input_len itself)."""
        text = self.family.format_prompt(prompt) or ""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids) + self.config.num_visual_features

    def generate_many(self, images: list[Any], prompts: list[str | None], max_new_tokens: list[int]) -> list[Generation]:
        """Requests one after another through TensorRT-LLM's runner (every rank makes the same calls)."""
        return [self.generate(image, prompt, limit) for image, prompt, limit in zip(images, prompts, max_new_tokens)]

    def generate(self, image: Any, prompt: str | None, max_new_tokens: int) -> Generation:
        start = time.perf_counter()
        _, output = self.runner.run(prompt or "", [image], max_new_tokens)
        elapsed = (time.perf_counter() - start) * 1000
        text = output[0][0] if isinstance(output, list) else str(output)
        import torch

        tokens = self.tokenizer(text, add_special_tokens=False).input_ids
        return Generation(tokens=list(tokens), text=text, logits=torch.empty(0), vision_ms=0.0, llm_ms=elapsed)
