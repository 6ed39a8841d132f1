"""Toolchains that turn a build spec into engines: ``hf`` (torch + transformers) and ``trtllm`` (TensorRT-LLM)."""
