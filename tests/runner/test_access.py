"""Who may reach the runner: the bind-address rule and the API key, as the CLI takes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlmforge.errors import DeployError
from vlmforge.runner.access import check_exposure, is_loopback


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("10.1.2.3", False), ("192.168.0.10", False),
    ("no-such-host.invalid", False),
])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_listening_beyond_loopback_needs_a_key() -> None:
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "a-key")
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
