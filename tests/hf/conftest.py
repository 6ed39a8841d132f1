"""The hf-toolchain tests need the hf extra (torch, transformers, onnx, onnxruntime, optimum-quanto):
without it the test modules here are not collected."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.hf.tiny import TinyCache

HF_EXTRA = ("torch", "transformers", "onnx", "onnxruntime", "optimum")
if any(importlib.util.find_spec(name) is None for name in HF_EXTRA):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    """``tiny(name)``: the family's tiny float32 model and its references, built on first use."""
    from tests.hf.tiny import TinyCache

    return TinyCache(tmp_path_factory.mktemp("tiny"))
