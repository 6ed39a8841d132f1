"""The runner tests need the serve and hf extras: without them the test modules here are not collected."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
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


@pytest.fixture(scope="session")
def tiny_engine_of(build_workdir: Path) -> Callable[[str], Path]:
    """The engine directory of a tiny model (``llava``, ``vila1.0``: ``tiny://NAME``'s catalog entry), built by the
    real hf pipeline once per session in the shared work dir (tiny-llava's and tiny-vila's builds are reused)."""
    from tests.helpers.runners import build_tiny
    from tests.helpers.tiny import tiny_spec

    made: dict[str, Path] = {}

    def engine_of(name: str) -> Path:
        if name not in made:
            made[name] = build_tiny(tiny_spec(name).name, build_workdir)
        return made[name]

    return engine_of
