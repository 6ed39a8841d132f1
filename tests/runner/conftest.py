"""The runner tests need the serve and hf extras: without them the test modules here are not collected."""

from __future__ import annotations

import importlib.util

NEEDED = ("torch", "transformers", "onnxruntime", "fastapi", "uvicorn", "prometheus_client")
if any(importlib.util.find_spec(name) is None for name in NEEDED):
    collect_ignore_glob = ["test_*.py"]
