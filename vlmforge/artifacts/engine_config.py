"""engine.json: what an engine directory holds, written by every toolchain and read by every runner."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vlmforge.errors import DeployError

ENGINE_CONFIG = "engine.json"
HF_CHECKPOINT_DIR = "hf"
"""Where an hf engine directory holds the whole model as a Hugging Face model folder (:class:`HfCheckpointInfo`)."""
HF_CHECKPOINT_EXTRA = "hf_checkpoint"
"""The manifest's ``extra`` entry repeating engine.json's ``hf_checkpoint``: what deploy --backend trtllm-serve reads
before it pulls anything."""


class VisualEngineInfo(BaseModel):
    """The visual engine: vision encoder + projector."""

    path: str
    """File (hf: ONNX) or directory (trtllm: TensorRT engine) relative to the engine directory."""
    format: Literal["onnx", "tensorrt"]
    precision: str
    max_batch_size: int
    output_shape: list[int | str]
    """[batch, num_visual_features, hidden]."""


class LlmEngineInfo(BaseModel):
    """The language model engine."""

    path: str
    format: Literal["safetensors", "lowbit", "modelopt", "quanto", "tensorrt"]
    """safetensors (float), lowbit (int8/int4 weights on torch's kernels), modelopt (ModelOpt's fake-quant LLM),
    tensorrt; quanto: optimum-quanto engines of earlier vlmforge releases, no longer served (rebuild them)."""
    dtype: str
    quantization: str
    kv_cache_dtype: str = "auto"
    architecture: str
    """The transformers class of the standalone LLM (hf), or TensorRT-LLM's architecture (trtllm)."""


class HfCheckpointInfo(BaseModel):
    """The whole multimodal model as one Hugging Face model folder (config.json, the safetensors of the vision tower,
    projector and language model, the tokenizer and processor files): what trtllm-serve's PyTorch backend loads. The
    hf toolchain's convert stage writes it (cast to the spec's dtype); the engine directory hard-links it."""

    model_config = ConfigDict(extra="forbid")

    path: str
    """The folder, relative to the engine directory (``hf``)."""
    architecture: str | None = None
    """config.json's ``architectures[0]`` (a transformers class, or VILA1.5's ``LlavaLlamaModel``)."""
    dtype: str
    """The dtype its float tensors are stored in (the spec's)."""
    kind: Literal["plain", "unified"] = Field(default="plain", exclude_if=lambda value: value == "plain")
    """plain: the convert stage's float checkpoint (unquantized specs); unified: ModelOpt's unified export of the
    whole model (quantized specs: the LLM's quantized weights and scales, ``hf_quant_config.json``, the vision tower
    and projector in float). Left out of engine.json when plain: the folders of earlier builds read as before."""
    quant_algo: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """hf_quant_config.json's quant_algo (unified only)."""
    kv_cache_quant_algo: str | None = Field(default=None, exclude_if=lambda value: value is None)


class EngineConfig(BaseModel):
    """Everything a runner needs to know before loading an engine."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    name: str
    family: str
    toolchain: Literal["hf", "trtllm"]
    world_size: int
    tp: int
    pp: int
    max_batch_size: int
    max_input_len: int
    max_output_len: int
    num_visual_features: int
    max_images_per_prompt: int = Field(default=1, ge=1, exclude_if=lambda value: value == 1)
    """Most images one request may carry (the spec's limits.max_images_per_prompt); left out of engine.json at 1, so
    the engines of earlier specs are written byte for byte as before."""
    processor: str
    """Directory (relative) with the tokenizer and image processor."""
    visual: VisualEngineInfo
    llm: LlmEngineInfo
    hf_checkpoint: HfCheckpointInfo | None = Field(default=None, exclude_if=lambda value: value is None)
    """The whole model as a Hugging Face folder (hf engines whose spec sets ``artifacts.hf_checkpoint``); None (left
    out of engine.json): no such folder."""
    tensorrt_version: str | None = None
    tensorrt_llm_version: str | None = None
    compute_capability: str | None = None
    """GPU architecture a TensorRT engine was built for (e.g. "9.0"); None for hf engines."""

    def write(self, engine_dir: Path) -> None:
        (engine_dir / ENGINE_CONFIG).write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, engine_dir: Path) -> EngineConfig:
        path = Path(engine_dir) / ENGINE_CONFIG
        if not path.is_file():
            raise DeployError(f"{engine_dir} is not a vlmforge engine: {ENGINE_CONFIG} is missing")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise DeployError(f"unreadable {path}: {exc}") from None
