"""The Prefect flows the CLI runs, found through the ``vlmforge.flows`` entry points (pyproject.toml).

The core library never imports the Prefect layer: the installed distribution names its flows, and a
machine without them (``pip install vlmforge`` without the ``flows`` extra) gets a clear refusal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from vlmforge.errors import ToolchainUnavailable

GROUP = "vlmforge.flows"


def load_flow(name: str) -> Callable[..., Any]:
    """The flow registered as ``name`` (``build-engine``, ``watch-models``); importing it imports Prefect."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        raise ToolchainUnavailable(f"the Prefect flow {name!r} is not installed: install vlmforge with its flows "
                                   "(pip install 'vlmforge[flows]' from the repository)")
    try:
        return next(iter(found)).load()
    except ModuleNotFoundError as exc:
        raise ToolchainUnavailable(f"the Prefect flow {name!r} cannot be loaded ({exc}): install vlmforge[flows]") from exc


def quiet_prefect() -> None:
    """A temporary local Prefect server needs no telemetry (it only logs failures on offline machines)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
