"""The tune artifact's format: compile caches and step packages in one zip archive; an earlier vlmforge's artifact
(the bare compile caches) reads as caches without packages."""

from __future__ import annotations

from vlmforge.runner.tune import bundle, unbundle


def test_caches_and_step_packages_round_trip() -> None:
    steps = {(16, 512): b"sixteen", (1, 512): b"one", (2, 1024): b""}
    caches, back = unbundle(bundle(b"\x00caches\xff", steps))
    assert caches == b"\x00caches\xff" and back == steps


def test_bare_compile_caches_of_an_earlier_artifact_read_as_caches_alone() -> None:
    earlier = b"\x80\x04torch-cache-artifacts" * 10
    assert unbundle(earlier) == (earlier, {})
