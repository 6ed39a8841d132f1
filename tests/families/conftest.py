"""The hf-toolchain tests need the hf extra (torch, transformers, onnx, onnxruntime, nvidia-modelopt):
without it the test modules here are not collected."""

from __future__ import annotations

import importlib.util

HF_EXTRA = ("torch", "transformers", "onnx", "onnxruntime", "modelopt")
if any(importlib.util.find_spec(name) is None for name in HF_EXTRA):
    collect_ignore_glob = ["test_*.py"]
