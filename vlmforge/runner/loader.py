"""Load an engine directory with the runner its toolchain needs: the one place that chooses between them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmforge.artifacts.engine_config import EngineConfig
from vlmforge.errors import DeployError, ToolchainUnavailable
from vlmforge.runner import CompileMode, DecodeMode
from vlmforge.runner.protocol import ServingEngine


@dataclass(frozen=True)
class LoadOptions:
    """How this process loads its engine (``vlmforge serve`` fills it from its options and the MPI job)."""

    device: str | None = None
    """cpu or cuda[:N] (default: a GPU if there is one). hf engines only."""
    decode: DecodeMode = DecodeMode.AUTO
    """hf engines: the static decode path (a GPU), or the dynamic one (vlmforge.runner.static)."""
    compile_mode: CompileMode = CompileMode.MAX_AUTOTUNE
    compile: bool | None = None
    """hf engines, static decode path: compile its step (default: on a GPU)."""
    max_batch_size: int | None = None
    """Requests decoded together (default: the engine's max_batch_size; a TensorRT engine's is a ceiling)."""
    world_size: int = 1
    """Ranks of the job (mpirun -n): hf engines split their LLM over them; TensorRT engines must be built for it."""
    leader: bool = True
    """Rank 0, which runs the visual engine (hf followers load the LLM only)."""
    image_cache_bytes: int = 0
    """hf engines, rank 0: the image-embedding cache's size (vlmforge.runner.image_cache); 0: no cache."""
    hf_model_dir: Path | None = None
    """TensorRT engines: the Hugging Face directory its tokenizer and processor come from (default: the engine's)."""


def _load_hf(engine_dir: Path, config: EngineConfig, options: LoadOptions) -> ServingEngine:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir, device=options.device, tp_plan=options.world_size > 1, load_vision=options.leader,
                    decode=options.decode.value, max_batch_size=options.max_batch_size,
                    compile_mode=options.compile_mode.value, image_cache_bytes=options.image_cache_bytes,
                    compile=options.compile)


def _load_trtllm(engine_dir: Path, config: EngineConfig, options: LoadOptions) -> ServingEngine:
    from vlmforge.runner.trtllm import TrtllmEngine

    if options.world_size != config.world_size:
        raise DeployError(f"{engine_dir} is a TensorRT engine for {config.world_size} rank(s); it runs only with "
                          f"mpirun -n {config.world_size}, not {options.world_size}")
    if options.max_batch_size is not None and options.max_batch_size > config.max_batch_size:
        raise DeployError(f"--max-batch-size {options.max_batch_size} exceeds the TensorRT engine's max_batch_size "
                          f"{config.max_batch_size}")
    try:
        return TrtllmEngine(engine_dir, hf_model_dir=options.hf_model_dir)
    except ToolchainUnavailable as exc:
        raise ToolchainUnavailable(f"{engine_dir} is a TensorRT engine: serving it needs TensorRT-LLM and a GPU (the "
                                   "runner image on vlmforge-builder, NVIDIA's TensorRT-LLM container). "
                                   f"{exc}") from None


LOADERS: dict[str, Callable[[Path, EngineConfig, LoadOptions], ServingEngine]] = {
    "hf": _load_hf,
    "trtllm": _load_trtllm,
}


def load_engine(engine_dir: Path, options: LoadOptions | None = None) -> ServingEngine:
    """The engine of ``engine_dir`` (engine.json says its toolchain), loaded as ``options`` say."""
    engine_dir = Path(engine_dir)
    config = EngineConfig.read(engine_dir)
    loader = LOADERS.get(config.toolchain)
    if loader is None:  # engine.json's schema names the toolchains; this guards a schema that grew without a runner
        raise ToolchainUnavailable(f"{engine_dir}: no runner for toolchain {config.toolchain!r} (runners: "
                                   f"{', '.join(sorted(LOADERS))})")
    return loader(engine_dir, config, options or LoadOptions())
