"""The remote-code families at the command line: listed as plan-only, planned, and refused by `vlmforge build` on
either toolchain before any work (no store, no work directory), naming the reason and the way out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import vlmforge

REMOTE_CODE = {"internvl": "InternVL2-1B", "phi3_vision": "Phi-3-vision-128k-instruct", "cogvlm": "cogvlm-chat-hf",
               "internlm_xcomposer2": "internlm-xcomposer2-vl-7b", "neva": "neva"}


def test_families_lists_them_as_plan_only() -> None:
    result = vlmforge("families", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for family in REMOTE_CODE:
        hf = "no (.nemo checkpoint): plan-only" if family == "neva" else "no (remote code): plan-only"
        assert rows[family]["toolchains"] == {"hf": hf,
                                              "trtllm": "plan (1.2) only; run it in NVIDIA's container"}
        assert rows[family]["tiny_source"] is None


@pytest.mark.parametrize("toolchain", ["hf", "trtllm"])
def test_build_is_refused_before_any_work(tmp_path: Path, toolchain: str) -> None:
    store, work = tmp_path / "store", tmp_path / "work"
    result = vlmforge("build", "InternVL2-1B", "--toolchain", toolchain, "--store", str(store), "--workdir", str(work))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "internvl is plan-only" in result.stderr and "transformers==4.37.2" in result.stderr
    assert "vlmforge plan MODEL" in result.stderr and "--toolchain" in result.stderr
    assert "Traceback" not in result.stderr
    assert not store.exists() and not work.exists()


def test_plan_json_of_each_family() -> None:
    for family, model in REMOTE_CODE.items():
        result = vlmforge("plan", model, "--json", "--explain")
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert plan["spec"]["family"] == family
        explained = {line["name"]: line for line in plan["explain"]}
        assert explained["max_multimodal_len"]["value"] == plan["derived"]["max_multimodal_len"]
