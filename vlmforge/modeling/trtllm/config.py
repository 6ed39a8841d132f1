"""What TensorRT-LLM 1.2 reads from a checkpoint's config.json, and the check every written config.json passes.

The field lists were read from TensorRT-LLM's source (``PretrainedConfig``, ``QuantConfig``, ``QuantAlgo``;
tests/contract/trtllm_checkpoint_config.json records where, and a contract test keeps the two equal). A config
that fails here would fail in ``trtllm-build``: ``QuantConfig.from_dict`` is ``cls(**config)`` (an unknown key is
a TypeError), and the defaults of a missing key are not the LLaMA ones (``gelu``, ``learned_absolute``, fp32 logits).
"""

from __future__ import annotations

from typing import Any

from vlmforge.specs.schema import KvCacheDtype, QuantMethod

PRETRAINED_REQUIRED = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads")
PRETRAINED_OPTIONAL = {
    "vocab_size": None, "hidden_act": "gelu", "logits_dtype": "float32", "norm_epsilon": 1e-05,
    "position_embedding_type": "learned_absolute", "max_position_embeddings": None, "rotary_embedding_dim": None,
    "num_key_value_heads": None, "intermediate_size": None, "mapping": None, "quantization": None,
    "use_parallel_embedding": False, "embedding_sharding_dim": 0, "head_size": None, "qk_layernorm": False,
    "runtime_defaults": None,
}
"""PretrainedConfig's keyword arguments and defaults (other keys become attributes the model class may read)."""
ALWAYS_WRITE = ("hidden_act", "logits_dtype", "position_embedding_type")
"""Keys whose TensorRT-LLM default is not what a LLaMA or OPT needs: written explicitly, always."""
QUANT_CONFIG_FIELDS = {
    "quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128, "smoothquant_val": 0.5, "clamp_val": None,
    "use_meta_recipe": False, "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None,
}
QUANT_ALGOS = (
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "INT8", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
)
KV_CACHE_QUANT_ALGOS = ("FP8", "INT8", "NVFP4")
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope_gptj", "rope_gpt_neox", "long_rope", "alibi", "alibi_with_scale",
                            "relative", "chatglm", "yarn", "mrope", "deferred")
MAPPING_KEYS = ("world_size", "tp_size", "pp_size")

QUANT_ALGO = {
    QuantMethod.NONE: None, QuantMethod.INT8_WO: "W8A16", QuantMethod.INT4_WO: "W4A16",
    QuantMethod.INT4_AWQ: "W4A16_AWQ", QuantMethod.W4A8_AWQ: "W4A8_AWQ", QuantMethod.INT8_SQ: "W8A8_SQ_PER_CHANNEL",
    QuantMethod.FP8: "FP8",
}
"""quantize.py --qformat -> config.json's quantization.quant_algo."""
KV_CACHE_QUANT_ALGO = {KvCacheDtype.AUTO: None, KvCacheDtype.INT8: "INT8", KvCacheDtype.FP8: "FP8"}


def config_problems(config: dict[str, Any], *, world_size: int | None = None) -> list[str]:
    """Everything in ``config`` that TensorRT-LLM 1.2 would refuse or misread (empty: it is fine)."""
    problems = [f"missing required key {key}" for key in PRETRAINED_REQUIRED if key not in config]
    problems += [f"missing {key} (TensorRT-LLM's default {PRETRAINED_OPTIONAL[key]!r} is wrong here)"
                 for key in ALWAYS_WRITE if key not in config]
    position = config.get("position_embedding_type")
    if position is not None and position not in POSITION_EMBEDDING_TYPES:
        problems.append(f"position_embedding_type {position!r} is none of {POSITION_EMBEDDING_TYPES}")
    quant = config.get("quantization") or {}
    if not isinstance(quant, dict):
        problems.append("quantization is not a mapping")
        quant = {}
    problems += quant_config_problems(quant)
    mapping = config.get("mapping") or {}
    extra = sorted(set(mapping) - set(MAPPING_KEYS))
    if extra:
        problems.append(f"mapping has keys vlmforge does not write: {extra}")
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    if mapping.get("world_size", tp * pp) != tp * pp:
        problems.append(f"mapping.world_size {mapping.get('world_size')} != tp_size x pp_size = {tp * pp}")
    if world_size is not None and tp * pp != world_size:
        problems.append(f"mapping says {tp * pp} ranks, the checkpoint has {world_size} rank files")
    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and heads % tp:
        problems.append(f"num_attention_heads {heads} is not divisible by tp_size {tp}")
    return problems


def quant_config_problems(quant: dict[str, Any]) -> list[str]:
    """What ``QuantConfig(**quant)`` would refuse or misread (a config.json's ``quantization``, or the unified
    checkpoint's hf_quant_config.json ``quantization``)."""
    problems = []
    unknown = sorted(set(quant) - set(QUANT_CONFIG_FIELDS))
    if unknown:
        problems.append(f"quantization has keys QuantConfig does not take (TypeError in trtllm-build): {unknown}")
    algo = quant.get("quant_algo")
    if algo is not None and (algo not in QUANT_ALGOS or algo == "INT8"):
        problems.append(f"quantization.quant_algo {algo!r} is not a weight QuantAlgo")
    kv = quant.get("kv_cache_quant_algo")
    if kv is not None and kv not in KV_CACHE_QUANT_ALGOS:
        problems.append(f"quantization.kv_cache_quant_algo {kv!r} is none of {KV_CACHE_QUANT_ALGOS}")
    return problems
