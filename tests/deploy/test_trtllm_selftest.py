"""``vlmforge selftest --backend trtllm-serve`` where it cannot run (no GPU, no release image): its refusal before any
work, and the parts that run anywhere: the tiny LLaVA-NeXT folder, the request the openai client sends, the
transformers reference and the comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.net import ROOT
from tests.helpers.runners import runner_env


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmforge.deploy.trtllm_selftest import make_tiny_llava_next

    return make_tiny_llava_next(tmp_path_factory.mktemp("next") / "tiny-llava-next")



def test_the_selftest_refuses_where_there_is_no_gpu_before_any_work(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vlmforge", "selftest", "--backend", "trtllm-serve", "--workdir",
                           str(tmp_path)], env=runner_env(PATH="/usr/bin:/bin"), capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 2 and "trtllm-serve needs 1 NVIDIA GPU(s)" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_the_selftest_request_and_comparison(tiny_next: Path) -> None:
    from transformers import AutoTokenizer

    from vlmforge.deploy.trtllm_selftest import chat_request, compare, golden_image, reference_tokens

    image = golden_image()
    request = chat_request("tiny-llava-next", image)
    image_part, text_part = request["messages"][0]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,") and text_part["type"] == "text"
    assert request["temperature"] == 0.0 and request["model"] == "tiny-llava-next"
    reference = reference_tokens(tiny_next, image)
    assert reference == reference_tokens(tiny_next, image) and len(reference) > 4  # greedy: the same every time
    tokenizer = AutoTokenizer.from_pretrained(tiny_next)
    exact = compare(reference, tokenizer.decode(reference, skip_special_tokens=True), tokenizer)
    assert exact.passed and exact.agreement == 1.0
    half = len(reference) // 2
    early = compare(reference, tokenizer.decode(reference[:half], skip_special_tokens=True) + "\u2603", tokenizer)
    assert not early.passed and half <= early.matched_tokens < len(reference)
    assert compare(reference, "", tokenizer).agreement == 0.0
