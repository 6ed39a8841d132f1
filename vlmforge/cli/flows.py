"""The Prefect flows the CLI runs, found through the ``vlmforge.flows`` entry points (pyproject.toml).

The core library never imports the Prefect layer: the installed distribution names its flows, and a
machine without them (``pip install vlmforge`` without the ``flows`` extra) gets a clear refusal.
"""

from __future__ import annotations

import os
import threading
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


def start_api() -> Callable[[], None]:
    """Start reaching the flows' Prefect API in a thread (Prefect's temporary server takes 10-17 s to start on 2
    cores) and return the call that waits for it, raising what reaching it raised. An installation without the
    ``prefect-api`` entry point (installed before it existed) gets a wait that does nothing: the flow run then
    reaches the API itself."""
    try:
        connect = load_flow("prefect-api")
    except ToolchainUnavailable:
        return lambda: None
    failure: list[BaseException] = []

    def reach() -> None:
        try:
            connect()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            failure.append(exc)

    thread = threading.Thread(target=reach, name="prefect-api", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait


def quiet_prefect() -> None:
    """A temporary local Prefect server needs no telemetry (it only logs failures on offline machines)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
