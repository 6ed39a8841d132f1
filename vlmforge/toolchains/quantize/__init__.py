"""Quantization on NVIDIA ModelOpt for the LLMs of decoder-only families: calibration on the family's own
prefixes, the hf toolchain's quantize stage, and TensorRT-LLM checkpoints (``vlmforge checkpoint``)."""
