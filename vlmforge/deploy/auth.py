"""The runner's API key, deploy side: when one is required, how it is checked, and what is kept of it.

The runner (``vlmforge serve``) reads its key from ``VLMFORGE_API_KEY`` and asks clients for it as an OpenAI
client sends it (``Authorization: Bearer KEY``); it requires one whenever it listens on an address that is not
loopback. Deploy therefore refuses such a deployment without a key before anything starts, hands the key to rank 0
through its environment only (never on a command line, which ``ps`` shows), and records only that a key is
required and a short fingerprint of it (:func:`fingerprint`), never the key.
"""

from __future__ import annotations

import hashlib
from enum import Enum

from pydantic import SecretStr

from vlmforge.errors import DeployError
from vlmforge.runner.access import API_KEY_ENV, MIN_KEY_LENGTH, is_loopback_address
from vlmforge.runner.access import GENERATE_KEY as GENERATE
from vlmforge.runner.access import check_key as check_key_value

__all__ = ["API_KEY_ENV", "MIN_KEY_LENGTH", "AuthMode", "auth_headers", "check_key", "fingerprint", "is_loopback",
           "require_key"]


class AuthMode(str, Enum):
    """What a runner asks of its clients."""

    NONE = "none"
    """Nothing: the runner listens on loopback only."""
    BEARER = "bearer"
    """``Authorization: Bearer KEY`` on every request but ``/health``."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address as written (127.0.0.0/8, ::1, ``localhost``); all interfaces
    (``0.0.0.0``, ``::``, empty) and names other than ``localhost`` are not (they are not resolved here: with a
    hostfile rank 0 runs elsewhere)."""
    return is_loopback_address(host)


def check_key(key: SecretStr) -> SecretStr:
    """``key`` if it can be a runner's API key (the runner's own rules); else a DeployError saying why (without
    echoing it)."""
    check_key_value(key.get_secret_value())
    return key


def fingerprint(key: SecretStr) -> str:
    """A short, stable name of ``key`` for records and labels (``sha256:`` and 16 hex digits): enough to tell
    which key a runner was given, not enough to use it."""
    return "sha256:" + hashlib.sha256(key.get_secret_value().encode()).hexdigest()[:16]


def require_key(host: str, key: SecretStr | None, *, container: bool = False) -> AuthMode:
    """The auth mode of a runner listening on ``host``; a DeployError naming the fix when it needs a key and has
    none. A runner container listens on all of its interfaces (its network reaches it, whatever ``host`` the port is
    published on), so it always needs one."""
    if key is not None:
        check_key(key)
        return AuthMode.BEARER
    if container:
        raise DeployError("a runner container listens on its network's address (other containers reach it), so it "
                          f"needs an API key: pass --api-key or set {API_KEY_ENV} (make one with {GENERATE}); "
                          "clients then send `Authorization: Bearer KEY`")
    if not is_loopback(host):
        raise DeployError(f"--host {host} lets other machines reach the runner, so it needs an API key: pass "
                          f"--api-key or set {API_KEY_ENV} (make one with {GENERATE}), or listen on 127.0.0.1; "
                          "clients then send `Authorization: Bearer KEY`")
    return AuthMode.NONE


def auth_headers(key: SecretStr | None) -> dict[str, str]:
    """The header a client sends with ``key`` (none without one)."""
    return {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
