"""Reaching the Prefect API the flows report to, ahead of the first flow run."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL


def connect() -> str:
    """Reach the Prefect API now and return where it is: PREFECT_API_URL's server, or Prefect's temporary local
    server, started here (10-17 s on a 2-core machine) and used by every flow run of this process afterwards.

    The CLI calls this in a thread while it imports what the build's stages need, so the two overlap.
    """
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
        if failure is not None:
            raise failure
        return PREFECT_API_URL.value() or str(client.api_url)
