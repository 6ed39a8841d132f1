"""TensorRT-LLM's own server as a deployment backend (``vlmforge deploy --backend trtllm-serve``): the pinned
release, what a model folder must hold for it, the LLM-API options file written from a build's limits, and the
command run in NVIDIA's release container.

Everything here is pure (no Docker, no processes): the launcher (:mod:`vlmforge.deploy.launchers.trtllm`) runs what
is computed here, and ``--dry-run`` prints it. Each TensorRT-LLM fact used here (option names and types, LLM-API
fields, endpoints, how ``trtllm-llmapi-launch`` runs its command, the multimodal support matrix) is recorded with
where it was read in ``tests/contract/trtllm_serve.json``, and the contract tests check this module against it.

- **The model** is a Hugging Face model folder of the *whole* multimodal model (``config.json`` whose
  ``architectures[0]`` is a class of the release's multimodal support matrix, the weights of the vision tower,
  projector and language model, the tokenizer and processor files with a chat template: the server answers the
  chat API only). A ModelOpt unified export of the whole model (the same folder plus ``hf_quant_config.json``) is
  the quantized form (an hf build of a spec quantized with int4_awq, w4a8_awq, int8_sq or fp8 writes one). In a
  store build (the hf toolchain's) it is the ``hf/`` folder (:data:`HF_DIR`).
- **Each value is set in one place**: every engine setting goes in the options file (``--config``), the command
  line carries only server settings (host, port, served name, log level, telemetry). trtllm-serve lets typed
  flags override the file and rebuilds a whole ``kv_cache_config`` from a KV flag, so mixing the two loses values.
- **The command** is ``mpirun -n RANKS --allow-run-as-root trtllm-llmapi-launch trtllm-serve serve MODEL ...``.
  ``trtllm-llmapi-launch`` runs its command as ``$task_with_command`` (unquoted: split at white space, globbed), so
  every word after it must be one plain word (:func:`check_launch_words`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmforge.artifacts.engine_config import HF_CHECKPOINT_DIR
from vlmforge.errors import DeployError

RELEASE = "1.4.0rc1"
"""The TensorRT-LLM release deployed by default: the newest public release (PyPI, 2026-12-04) when this was written.
Its container tag is the version without a ``v`` (NVIDIA's containers page: ``release:x.y.z``)."""
IMAGE_REPOSITORY = "nvcr.io/nvidia/tensorrt-llm/release"
IMAGE_ENV = "VLMFORGE_TRTLLM_SERVE_IMAGE"
"""Overrides the image (a newer release, a site mirror); ``--image`` overrides both."""
HF_DIR = HF_CHECKPOINT_DIR
"""Where a store build holds the Hugging Face model folder trtllm-serve loads (the hf toolchain's engine directory,
engine.json's ``hf_checkpoint``)."""
MODELS_DIR = PurePosixPath("/models")
"""Where the model folder is mounted in the container (read-only)."""
OPTIONS_PATH = PurePosixPath("/etc/vlmforge/llm_api_options.yaml")
"""Where the options file is mounted in the container (read-only)."""
HEALTH_PATH = "/health"
"""200 with an empty body once the model is loaded (uvicorn listens only then), 503 when unhealthy."""
METRICS_PATHS = ("/metrics", "/prometheus/metrics")
"""Iteration stats as JSON (``enable_iter_perf_stats``); Prometheus text (mounted with ``return_perf_metrics``)."""
DEFAULT_MAX_NUM_TOKENS = 8192
"""TorchLlmArgs.max_num_tokens's default: a prompt longer than this needs a larger value (no chunked prefill)."""
DEFAULT_KV_CACHE_FRACTION = 0.9
"""KvCacheConfig.free_gpu_memory_fraction's default."""

MULTIMODAL_ARCHITECTURES = frozenset({
    "Exaone4_5_ForConditionalGeneration", "Gemma3ForConditionalGeneration", "Gemma4ForConditionalGeneration",
    "Gemma4UnifiedForConditionalGeneration", "HCXVisionForCausalLM", "InklingForConditionalGeneration",
    "LlavaLlamaModel", "LlavaNextForConditionalGeneration", "Llama4ForConditionalGeneration",
    "MiniCPMV4_6ForConditionalGeneration", "Mistral3ForConditionalGeneration", "NemotronH_Nano_VL_V2",
    "Phi4MMForCausalLM", "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration", "Step3p7ForConditionalGeneration",
    "MiniMaxM3SparseForConditionalGeneration", "Cosmos3ForConditionalGeneration", "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
})
"""The "Multimodal Feature Support Matrix (PyTorch Backend)" of docs/source/models/supported-models.md (VILA is its
``LlavaLlamaModel`` row: the VILA1.5 layout; LLaVA-1.5, BLIP-2 and Nougat are not there)."""
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_WORD_RE = re.compile(r"[^\s*?\[\]{}'\"\\$`]+")
"""A word that ``$task_with_command`` keeps as it is: no white space, glob, quote or expansion characters."""


def default_image(env: Mapping[str, str] = os.environ) -> str:
    """The release image: ``$VLMFORGE_TRTLLM_SERVE_IMAGE``, else ``nvcr.io/nvidia/tensorrt-llm/release:RELEASE``."""
    return env.get(IMAGE_ENV) or f"{IMAGE_REPOSITORY}:{RELEASE}"


# --- the options file ------------------------------------------------------------------------------------


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KvCacheOptions(_Options):
    """``kv_cache_config`` (TensorRT-LLM's KvCacheConfig)."""

    free_gpu_memory_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = DEFAULT_KV_CACHE_FRACTION
    """Of the GPU memory free after the weights and buffers, the share the KV cache takes."""
    enable_block_reuse: bool = False
    """KV reuse across requests: off, as the release's multimodal serving example has it (its support matrix says
    No for several multimodal models, VILA among them)."""


class LlmApiOptions(_Options):
    """The LLM-API options file (``trtllm-serve --config``): TorchLlmArgs fields, which forbid unknown keys."""

    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    pipeline_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    max_batch_size: Annotated[int, Field(ge=1, le=2048)]
    max_seq_len: Annotated[int, Field(ge=2)]
    max_num_tokens: Annotated[int, Field(ge=1)]
    """Tokens per engine step: at least the default, and at least max_seq_len (a whole prompt fits in one step)."""
    kv_cache_config: KvCacheOptions = Field(default_factory=KvCacheOptions)
    enable_iter_perf_stats: bool = True
    """Fills ``/metrics`` (iteration stats)."""
    return_perf_metrics: bool = True
    """Mounts ``/prometheus/metrics``."""

    def to_yaml(self) -> str:
        return "# trtllm-serve --config, written by vlmforge deploy\n" + yaml.safe_dump(
            self.model_dump(mode="json"), sort_keys=True, default_flow_style=False)


class ServeLimits(BaseModel):
    """What a deployment is sized for: the build's limits and parallelism, and the KV cache's share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: Annotated[int, Field(ge=1, le=2048)]
    max_seq_len: Annotated[int, Field(ge=2)]
    tp: Annotated[int, Field(ge=1, le=64)] = 1
    pp: Annotated[int, Field(ge=1, le=64)] = 1
    kv_cache_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = DEFAULT_KV_CACHE_FRACTION

    @property
    def ranks(self) -> int:
        return self.tp * self.pp

    @classmethod
    def from_manifest(cls, spec: Mapping[str, Any], derived: Mapping[str, Any], **overrides: Any) -> ServeLimits:
        """From a build's recorded spec and derived values (``overrides``: what the deployer asked instead)."""
        limits, parallel = spec.get("limits") or {}, spec.get("parallel") or {}
        try:
            values = {"max_batch_size": limits["max_batch_size"], "max_seq_len": derived["max_seq_len"],
                      "tp": parallel.get("tp", 1), "pp": parallel.get("pp", 1)}
        except KeyError as missing:
            raise DeployError(f"the build's manifest records no {missing.args[0]}: pass --max-batch-size and "
                              "--max-seq-len") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = {"tp": "--tp", "kv_cache_fraction": "--kv-cache-fraction"}.get(
                str(error["loc"][0]), f"--{str(error['loc'][0]).replace('_', '-')}")
            raise DeployError(f"{field} {error.get('input')!r}: {error['msg']}") from None


def llm_api_options(limits: ServeLimits) -> LlmApiOptions:
    """The options file for ``limits``."""
    return LlmApiOptions(tensor_parallel_size=limits.tp, pipeline_parallel_size=limits.pp,
                         max_batch_size=limits.max_batch_size, max_seq_len=limits.max_seq_len,
                         max_num_tokens=max(DEFAULT_MAX_NUM_TOKENS, limits.max_seq_len),
                         kv_cache_config=KvCacheOptions(free_gpu_memory_fraction=limits.kv_cache_fraction))


# --- the command -------------------------------------------------------------------------------------------


def check_launch_words(words: list[str]) -> list[str]:
    """``words`` if ``trtllm-llmapi-launch`` passes each on unchanged (it expands its command unquoted)."""
    for word in words:
        if not _WORD_RE.fullmatch(word):
            raise DeployError(f"{word!r} cannot be passed through trtllm-llmapi-launch, which splits its command at "
                              "white space and expands wildcards: use names of letters, digits, '.', '_', '-' and '/'")
    return words


def serve_argv(*, model_name: str, ranks: int, host: str, port: int, log_level: str = "info") -> list[str]:
    """The container's command: ``mpirun -n RANKS ... trtllm-llmapi-launch trtllm-serve serve MODEL ...``.

    ``model_name``: the folder's name under :data:`MODELS_DIR` and the name clients send (``--served_model_name``).
    """
    serve = ["trtllm-serve", "serve", str(MODELS_DIR / model_name), "--host", host, "--port", str(port),
             "--served_model_name", model_name, "--config", str(OPTIONS_PATH), "--log_level", log_level,
             "--no-telemetry"]
    # root in NVIDIA's image; GPUs, not cores, are what ranks need (no binding to cores)
    return ["mpirun", "-n", str(ranks), "--allow-run-as-root", "--bind-to", "none", "trtllm-llmapi-launch",
            *check_launch_words(serve)]


# --- the model folder --------------------------------------------------------------------------------------


class CheckpointFacts(BaseModel):
    """What deploy reads of a model folder before anything starts."""

    architecture: str
    num_attention_heads: int | None
    num_hidden_layers: int | None
    quantization: str | None
    """hf_quant_config.json's quant_algo (a ModelOpt unified export), else None."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeployError(f"unreadable {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DeployError(f"{path} is not a JSON object")
    return data


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    for key in ("text_config", "llm_config", "llm_cfg"):  # VILA1.5 keeps its LLaMA's config in llm_cfg
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def _places(model_dir: Path) -> list[Path]:
    """The folder and its sub-folders (VILA1.5 keeps its tokenizer in llm/, its processor in vision_tower/)."""
    return [model_dir, *sorted(p for p in model_dir.iterdir() if p.is_dir())]


def _find(model_dir: Path, names: tuple[str, ...]) -> Path | None:
    return next((place / name for place in _places(model_dir) for name in names if (place / name).is_file()), None)


def has_chat_template(model_dir: Path) -> bool:
    if _find(model_dir, CHAT_TEMPLATE_FILES) is not None:
        return True
    return any(path.is_file() and _read_json(path).get("chat_template")
               for place in _places(model_dir) for path in (place / "tokenizer_config.json", place / "processor_config.json"))


def check_architecture(architecture: str | None, where: str) -> str:
    """``architecture`` if the release's multimodal support matrix lists it, else a DeployError naming ``where``."""
    if architecture not in MULTIMODAL_ARCHITECTURES:
        raise DeployError(
            f"{where} names architecture {architecture!r}, which TensorRT-LLM {RELEASE}'s multimodal support matrix "
            f"does not list (it serves {', '.join(sorted(MULTIMODAL_ARCHITECTURES))}); a language model alone (a "
            "vlmforge build's llm/) would be served as text-only: deploy it with the vlmforge runner (--backend "
            "vlmforge)")
    return architecture


def check_checkpoint(model_dir: Path, limits: ServeLimits) -> CheckpointFacts:
    """The facts of ``model_dir``; a DeployError naming what trtllm-serve would refuse or serve wrongly: a folder that
    is no whole multimodal model of the support matrix, no weights, no tokenizer, processor or chat template, or a
    TP that does not divide the attention heads."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else None
    if config is None:
        raise DeployError(f"{model_dir} holds no config.json: trtllm-serve loads a Hugging Face model folder")
    architectures = config.get("architectures") or []
    architecture = check_architecture(architectures[0] if architectures else None, f"{model_dir}/config.json")
    if not any(any(place.glob("*.safetensors")) for place in _places(model_dir)):
        raise DeployError(f"{model_dir} holds no *.safetensors weights")
    if _find(model_dir, ("tokenizer.json", "tokenizer_config.json")) is None:
        raise DeployError(f"{model_dir} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
    if _find(model_dir, PROCESSOR_FILES) is None:
        raise DeployError(f"{model_dir} holds no image processor config ({' or '.join(PROCESSOR_FILES)})")
    if not has_chat_template(model_dir):
        raise DeployError(f"{model_dir} has no chat template ({', '.join(CHAT_TEMPLATE_FILES)} or tokenizer_config.json"
                          "'s chat_template): trtllm-serve takes images through the chat API only")
    text = _text_config(config)
    heads, layers = text.get("num_attention_heads"), text.get("num_hidden_layers")
    if isinstance(heads, int) and heads % limits.tp:
        raise DeployError(f"TP {limits.tp} does not divide the language model's {heads} attention heads: pass --tp "
                          f"with a divisor of {heads}")
    if isinstance(layers, int) and limits.pp > layers:
        raise DeployError(f"PP {limits.pp} exceeds the language model's {layers} layers")
    quant = None
    if (model_dir / "hf_quant_config.json").is_file():
        quant = (_read_json(model_dir / "hf_quant_config.json").get("quantization") or {}).get("quant_algo")
    return CheckpointFacts(architecture=architecture, num_attention_heads=heads if isinstance(heads, int) else None,
                           num_hidden_layers=layers if isinstance(layers, int) else None, quantization=quant)
