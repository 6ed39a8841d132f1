"""The hf engine runner: ONNX Runtime for the visual engine, transformers for the LLM.

Build validation and deployments both go through :class:`HfEngine`, so a validated engine is
exactly what is served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmforge.engine_config import EngineConfig
from vlmforge.errors import DeployError, ToolchainUnavailable
from vlmforge.families import get_family

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One request's result with its timings."""

    tokens: list[int]
    text: str
    logits: torch.Tensor
    """Per-step logits [steps, vocab], float32 on the CPU."""
    vision_ms: float
    llm_ms: float

    @property
    def e2e_ms(self) -> float:
        return self.vision_ms + self.llm_ms


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


class HfEngine:
    """A loaded hf-toolchain engine."""

    def __init__(self, engine_dir: Path, *, device: str | None = None, tp_plan: bool = False) -> None:
        import onnxruntime as ort
        import torch

        from vlmforge.toolchains.hf.common import load_quantized

        self.dir = Path(engine_dir)
        self.config = EngineConfig.read(self.dir)
        if self.config.toolchain != "hf":
            raise ToolchainUnavailable(
                f"{self.dir} holds a {self.config.toolchain} engine; it needs TensorRT-LLM's runner (vlmforge serve "
                "inside NVIDIA's TensorRT-LLM container)"
            )
        self.family = get_family(self.config.family)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = self.family.load_processor(self.dir / self.config.processor)
        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.vision = ort.InferenceSession(str(self.dir / self.config.visual.path), providers=providers)
        self.vision_input = self.vision.get_inputs()[0].name
        llm_dir = self.dir / self.config.llm.path
        dtype = torch_dtype(self.config.llm.dtype)
        if self.config.llm.format == "quanto":
            self.llm = load_quantized(self.family.llm_class(), llm_dir, dtype=dtype, device=self.device)
        else:
            kwargs: dict[str, Any] = {"dtype": dtype}
            if tp_plan:
                kwargs["tp_plan"] = "auto"
            self.llm = self.family.llm_class().from_pretrained(llm_dir, **kwargs).eval()
            if not tp_plan:
                self.llm = self.llm.to(self.device)
        log.info("loaded %s engine %s on %s", self.config.family, self.dir, self.device)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Visual features for a batch of images (float32, on the LLM's device)."""
        import torch

        if len(images) > self.config.visual.max_batch_size:
            raise DeployError(f"{len(images)} images exceed the visual engine's batch of {self.config.visual.max_batch_size}")
        pixels = self.family.pixel_values(self.processor, images)
        features = self.vision.run(None, {self.vision_input: pixels.float().cpu().numpy()})[0]
        return torch.from_numpy(features).to(self.device)

    def generate(self, image: Image.Image, prompt: str | None, max_new_tokens: int) -> Generation:
        """Greedy generation for one image and prompt (the prompt is formatted by the family)."""
        import torch

        start = time.perf_counter()
        features = self.encode_images([image])
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        vision_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        result = self.family.generate(self.llm, self.processor, features, self.family.format_prompt(prompt), max_new_tokens)
        llm_ms = (time.perf_counter() - start) * 1000
        text = self.processor.tokenizer.decode(result.tokens, skip_special_tokens=True)
        return Generation(tokens=list(result.tokens), text=text, logits=result.logits, vision_ms=vision_ms, llm_ms=llm_ms)


def load_engine(engine_dir: Path, **kwargs: Any) -> HfEngine:
    """Load an engine directory with the runner its toolchain needs."""
    config = EngineConfig.read(Path(engine_dir))
    if config.toolchain == "trtllm":
        from vlmforge.runner.trtllm import TrtllmEngine

        return TrtllmEngine(Path(engine_dir), **kwargs)  # type: ignore[return-value]
    return HfEngine(Path(engine_dir), **kwargs)
