"""Tensor parallelism for the families after the seed's (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL with M-RoPE, Gemma 3
with its bidirectional image prefill): each tiny model built for TP 2 and deployed under mpirun (gloo, the CPU)
answers what its TP 1 runner answers, alone and batched in lockstep, on images of two sizes. The runner refuses a
TP deployment whose weights transformers' plan did not split (`check_sharded`), so these runs are split for real."""

from __future__ import annotations

import concurrent.futures
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers.runners import build_tiny, chat_body, deploy_runner, image_url, start_runner, stop_runner
from tests.helpers.tiny import tiny_spec

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin)"),
]

CASES = [(0, 64, "What is this?"), (1, 96, "Describe the picture, please."), (2, 96, None)]


def ask(url: str, model: str, index: int, size: int, prompt: str | None) -> tuple[str, str]:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                          json=chat_body(prompt, image_url(index, size), model=model, max_tokens=10))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def tied_cases(engine_dir: Path, margin: float = 0.01) -> set[tuple[int, int, str | None]]:
    """The CASES whose lone decode (10 tokens, in this process) meets a near-tie: two likeliest tokens within
    ``margin`` at some step (tests.helpers.runners.near_tie)."""
    from tests.helpers.runners import golden_image, near_tie
    from vlmforge.runner.loader import load_engine

    engine = load_engine(engine_dir)
    return {(index, size, prompt) for index, size, prompt in CASES
            if near_tie(engine.generate(golden_image(index, size), prompt, 10), margin)}


@pytest.mark.parametrize("family", ["llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "gemma3", "mistral3"])
def test_tp2_answers_what_tp1_answers(family: str, tiny_engine_of: Callable[[str], Path], build_workdir: Path,
                                      tmp_path: Path) -> None:
    model = tiny_spec(family).name
    tp1_engine = tiny_engine_of(family)
    tp2_engine = build_tiny(model, build_workdir, parallel={"tp": 2})
    tp1 = start_runner(tp1_engine, tmp_path / "tp1.log", args=("--max-batch-size", "4"))
    tp2 = None
    try:
        tp2 = deploy_runner(tp2_engine, tmp_path / "tp2", serve_args=("--max-batch-size", "4", "--batch-wait-ms", "50"))
        assert tp2.proc.args[0] == "mpirun" and httpx.get(f"{tp2.url}/health").json()["tensor_parallel"] == 2
        want = [ask(tp1.url, model, *case) for case in CASES]
        assert len({text for text, _ in want}) > 1, "different images and prompts give different answers"
        # float16 tiny models: TP 2 sums each layer in two halves, so a lone decode's near-tie may round the other
        # way (one of tiny-llava-next's flipped on a new machine's CPU); such requests must only succeed
        tied = tied_cases(tp1_engine)
        exact = [case not in tied for case in CASES]
        assert any(exact), "at least one request is compared exactly"  # tiny-llava-next: 2 of the 3 have ties
        got = [ask(tp2.url, model, *case) for case in CASES]
        assert [g for g, e in zip(got, exact) if e] == [w for w, e in zip(want, exact) if e]
        with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:  # one batch, every rank in lockstep
            got = list(pool.map(lambda case: ask(tp2.url, model, *case), CASES))
        assert [g for g, e in zip(got, exact) if e] == [w for w, e in zip(want, exact) if e]
    finally:
        stop_runner(tp1)
        if tp2 is not None:
            assert stop_runner(tp2, timeout=60) == 0, tp2.log_text()[-3000:]


@pytest.mark.parametrize(("family", "llm"), [("fuyu", "PersimmonForCausalLM"), ("kosmos-2", "Kosmos2ImageTextLM"),
                                             ("mllama", "MllamaCrossAttentionLM")])
def test_an_llm_without_a_transformers_plan_is_refused_naming_the_fix(family: str, llm: str,
                                                                     tiny_engine_of: Callable[[str], Path],
                                                                     tmp_path: Path) -> None:
    """Persimmon (Fuyu), Kosmos-2's text model and Mllama's text model have no tensor-parallel plan in transformers:
    a TP load is refused before any weight is read, naming --tp 1 (TP goes where transformers supports it)."""
    import torch.distributed as dist

    from vlmforge.artifacts.engine_config import EngineConfig
    from vlmforge.errors import DeployError
    from vlmforge.runner.engine import check_tensor_parallel

    engine = tiny_engine_of(family)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(DeployError, match=f"{llm} has no tensor-parallel plan in transformers: serve .* --tp 1"):
            check_tensor_parallel(engine, EngineConfig.read(engine))
    finally:
        dist.destroy_process_group()
