"""What every vlmforge task shares: which failures are worth a retry."""

from __future__ import annotations

from typing import Any

from vlmforge.errors import VlmforgeError

TRANSIENT = (ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """Network hiccups are retried; a user or data error (VlmforgeError) never is."""
    if isinstance(exc, VlmforgeError):
        cause = exc.__cause__ or exc.__context__
        return cause is not None and is_transient(cause)
    if isinstance(exc, TRANSIENT):
        return True
    name = type(exc).__name__
    return name in {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "HfHubHTTPError", "ProtocolError",
                    "ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError"}  # httpx's


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify whatever the task raised
        return is_transient(exc)
    return False
