"""The runner tests need the serve and hf extras: without them the test modules here are not collected."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.runners import Runner

NEEDED = ("torch", "transformers", "onnxruntime", "fastapi", "uvicorn", "prometheus_client")
if any(importlib.util.find_spec(name) is None for name in NEEDED):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def guarded_runner(tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """A TP=1 runner with an API key (from VLMFORGE_API_KEY, as deployments pass it), a 1 s header timeout and a 10 s
    body timeout; the default request limits."""
    from tests.helpers.runners import GUARD_KEY, start_runner, stop_runner

    log = tmp_path_factory.mktemp("guarded") / "serve.log"
    started = start_runner(tiny_engine, log, args=("--header-timeout", "1", "--body-timeout", "10"),
                           env={"VLMFORGE_API_KEY": GUARD_KEY})
    yield started
    stop_runner(started)
