"""Runners: load an engine directory and generate (the same code validates builds and serves deployments).

protocol (what an engine gives the runner), loader (the engine of a directory, by toolchain), engine (hf),
trtllm (TensorRT-LLM), jobs (encode -> prefix -> batch), batching and static (the decode loops), scheduler,
distributed (TP followers), sampling (per-request parameters, the batch's sampler), access, openai_api, answers
(a completion's choices, plain or streamed) and server (HTTP), metrics, image_cache (visual features of images seen
before), tune (warm starts from stored compile caches).
"""

from enum import Enum
from typing import Annotated

from pydantic import StringConstraints

InstanceId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
"""What a runner reports on /health as ``instance`` (``vlmforge serve --instance-id``): the launcher that starts it
gives it a fresh one, and knows the healthy answer it waits for is its own runner's."""


class CompileMode(str, Enum):
    """torch.compile modes of the static decode step (vlmforge captures the step's CUDA graph, not Inductor)."""

    MAX_AUTOTUNE = "max-autotune-no-cudagraphs"
    """Inductor tunes the matrix-vector products: the fastest decode, about a minute per batch bucket of a 7B model."""
    DEFAULT = "default"
    """About half the compile time, decode about 15% slower (bench/decode_probe.py)."""


class DecodeMode(str, Enum):
    """The runner's decode path (vlmforge.runner.static)."""

    AUTO = "auto"
    """The static path where it applies (a float decoder-only LLM on a GPU, no tensor parallelism), else dynamic."""
    STATIC = "static"
    """A static KV cache and a compiled, graph-captured decode step; refused where it does not apply."""
    DYNAMIC = "dynamic"
    """transformers' dynamic cache, eager."""
