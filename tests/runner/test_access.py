"""Who may reach the runner: the bind-address rule and the API key, as the CLI takes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlmforge.errors import DeployError
from vlmforge.runner.access import check_exposure, is_loopback, is_loopback_address


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("10.1.2.3", False), ("192.168.0.10", False),
    ("no-such-host.invalid", False),
])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_names_count_as_loopback_only_when_resolved_here() -> None:
    """The runner resolves a name it is told to listen on; deploy (which may start rank 0 on another host) does not."""
    assert is_loopback("localhost") and is_loopback_address("localhost")
    assert not is_loopback_address("ip6-localhost") and not is_loopback_address("no-such-host.invalid")


def test_listening_beyond_loopback_needs_a_key() -> None:
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "a-key-of-sixteen+")
    for key in (None, ""):
        with pytest.raises(DeployError) as caught:
            check_exposure("0.0.0.0", key)
        message = str(caught.value)
        assert "'0.0.0.0'" in message and "--api-key" in message and "VLMFORGE_API_KEY" in message
        assert "--host 127.0.0.1" in message


@pytest.mark.parametrize(("args", "env", "key"), [
    (["--api-key", "from-the-option"], {}, "from-the-option"),
    ([], {"VLMFORGE_API_KEY": "from-the-environment"}, "from-the-environment"),
    ([], {}, None),
    ([], {"VLMFORGE_API_KEY": ""}, None),
])
def test_the_cli_takes_the_key_from_its_option_or_the_environment(
        args: list[str], env: dict[str, str], key: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import vlmforge.cli.serve as serve_cli
    import vlmforge.runner.server as server
    from vlmforge.cli import main

    seen: list[Any] = []
    monkeypatch.setattr(server, "serve", lambda settings: seen.append(settings) or 0)
    monkeypatch.setattr(serve_cli, "_logging", lambda rank: None)
    monkeypatch.delenv("VLMFORGE_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main(["serve", str(tmp_path), "--header-timeout", "3", *args])
    (settings,) = seen
    assert (settings.api_key.get_secret_value() if settings.api_key else None) == key
    assert settings.header_timeout_s == 3
    assert "from-the" not in repr(settings), "the key never shows in logs or reprs"


@pytest.mark.parametrize(("key", "words"), [("short-key", "at least 16"), ("a key with spaces in it", "visible ASCII"),
                                            ("new\nline-in-the-key-x", "visible ASCII")])
def test_a_weak_or_unsendable_key_is_refused_on_any_address(key: str, words: str) -> None:
    """The runner takes the keys deploy takes: one no header can carry would let no client in, a short one can be
    guessed. The message never echoes the key."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(DeployError, match=words) as caught:
            check_exposure(host, key)
        assert key not in str(caught.value)
