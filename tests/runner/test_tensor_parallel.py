"""Tensor parallelism on the CPU for real: the TP 2 build deployed with `vlmforge.deploy.service` (`mpirun -n 2 ...
vlmforge serve`, gloo), against the TP 1 runner."""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.runners import Runner, chat_body, deploy_runner, image_url, stop_runner

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin)"),
]

CASES = [(0, "What is this?", 16), (1, "Question: which city is this? Answer:", 24), (2, None, 8),
         (3, "Describe the picture of two dogs playing in the snow near a tree, please.", 32)]


@pytest.fixture(scope="module")
def runner_tp2(tiny_engine_tp2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    started = deploy_runner(tiny_engine_tp2, tmp_path_factory.mktemp("tp2"),
                            serve_args=("--max-batch-size", "4", "--batch-wait-ms", "50"))
    assert started.proc.args[0] == "mpirun" and started.proc.args[started.proc.args.index("-n") + 1] == "2"
    yield started
    stop_runner(started)


def ask(runner: Runner, index: int, prompt: str | None, max_tokens: int, **fields: object) -> dict:
    response = httpx.post(f"{runner.url}/v1/chat/completions", timeout=120,
                          json=chat_body(prompt, image_url(index), max_tokens=max_tokens, **fields))
    assert response.status_code == 200, response.text
    return response.json()


def answer(body: dict) -> tuple[str, str, int]:
    choice = body["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], body["usage"]["completion_tokens"]


def test_tp2_gives_the_greedy_outputs_of_tp1(runner: Runner, runner_tp2: Runner) -> None:
    health = httpx.get(f"{runner_tp2.url}/health").json()
    assert health["tensor_parallel"] == 2 and health["decode"] == "dynamic"
    for case in CASES:
        assert answer(ask(runner_tp2, *case)) == answer(ask(runner, *case)), case


def test_tp2_samples_what_tp1_samples_with_the_same_seed(runner: Runner, runner_tp2: Runner) -> None:
    """Rank 0 alone samples (its seeded generator) and the followers are fed its tokens: a seeded request, alone and
    as n choices, gives TP 1's texts; so do concurrent seeded requests batched in lockstep."""
    fields = {"temperature": 1.0, "seed": 77, "n": 2}
    for case in CASES[:2]:
        want, got = ask(runner, *case, **fields), ask(runner_tp2, *case, **fields)
        texts = [c["message"]["content"] for c in want["choices"]]
        assert [c["message"]["content"] for c in got["choices"]] == texts, case
        assert texts[0] != answer(ask(runner, *case))[0] or texts[1] != texts[0], "sampling changed something"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda case: ask(runner_tp2, *case, temperature=0.9, seed=5), CASES))
    assert [answer(b) for b in batched] == [answer(ask(runner, *case, temperature=0.9, seed=5)) for case in CASES]


def test_tp2_batches_concurrent_requests_in_lockstep(runner: Runner, runner_tp2: Runner) -> None:
    """Concurrent requests of different lengths (and a stop string that ends one row early) in shared batches:
    every rank must feed the same tokens at every step, or the outputs (or the job) break."""
    cases = [CASES[i % 4] for i in range(12)]
    want = [answer(ask(runner, *case)) for case in cases[:4]] * 3
    batches = httpx.get(f"{runner_tp2.url}/health").json()["batches"]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda case: answer(ask(runner_tp2, *case)), cases))
    assert got == want
    assert httpx.get(f"{runner_tp2.url}/health").json()["batches"] - batches < 12
    full = want[1][0]
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full.find(full[i:i + 2]) == i)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        stopped, *others = pool.map(lambda kw: ask(runner_tp2, *CASES[1], **kw), [{"stop": stop}, {}, {}])
    assert answer(stopped)[0] == full[:full.find(stop)] and answer(stopped)[1] == "stop"
    assert [answer(o) for o in others] == [want[1]] * 2


LONG = {"min_tokens": 32, "ignore_eos": True}


def joining_a_long_answer(runner_tp2: Runner, sends: list[tuple[tuple, dict]]) -> tuple[str, list[dict]]:
    """A long streamed answer (CASES[3], 32 tokens); once it has begun, ``sends`` ((case, fields) each) are posted at
    once: they join its batch at a step boundary. Its text and their bodies."""
    import json

    text = ""
    body = chat_body(CASES[3][1], image_url(3), max_tokens=32, stream=True, **LONG)
    with httpx.stream("POST", f"{runner_tp2.url}/v1/chat/completions", timeout=120, json=body) as response, \
            concurrent.futures.ThreadPoolExecutor(len(sends)) as pool:
        futures: list[concurrent.futures.Future] = []
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[len("data: "):])["choices"]
            text += (choices[0]["delta"].get("content") or "") if choices else ""
            if text and not futures:  # the long answer is decoding: the others arrive now
                futures = [pool.submit(lambda send: ask(runner_tp2, *send[0], **send[1]), send) for send in sends]
        return text, [f.result() for f in futures]


def test_tp2_requests_joining_a_running_batch_answer_what_tp1_answers(runner: Runner, runner_tp2: Runner) -> None:
    """In-flight batching at TP 2: requests sent once a long streamed answer has begun join its batch at a step
    boundary (rank 0 sends the followers the joiners' features with that step; every rank joins them in the same
    order and retires the same rows); every answer is TP 1's, the long one's too."""
    want_long = answer(ask(runner, *CASES[3][:2], 32, **LONG))[0]
    want = [answer(ask(runner, *case)) for case in CASES[:3]]
    batches = httpx.get(f"{runner_tp2.url}/health").json()["batches"]
    text, got = joining_a_long_answer(runner_tp2, [(case, {}) for case in CASES[:3]])
    assert text == want_long
    assert [answer(body) for body in got] == want
    assert httpx.get(f"{runner_tp2.url}/health").json()["batches"] - batches < 4, "some joined the long one's batch"


def test_tp2_joiners_prefilled_together_answer_what_tp1_answers(runner: Runner, runner_tp2: Runner) -> None:
    """Several joiners of different prompt lengths at one boundary: a request's n = 2 choices (submitted together,
    so they join together) and another request's prompt; every rank prefills a boundary's joiners in one forward, the
    same forward (a collective). Every answer is TP 1's."""
    want_long = answer(ask(runner, *CASES[3][:2], 32, **LONG))[0]
    want_two, want_other = answer(ask(runner, *CASES[1])), answer(ask(runner, *CASES[0]))
    text, (two, other) = joining_a_long_answer(runner_tp2, [(CASES[1], {"n": 2}), (CASES[0], {})])
    assert text == want_long
    assert [(c["message"]["content"], c["finish_reason"]) for c in two["choices"]] == [want_two[:2]] * 2
    assert answer(other) == want_other


def test_tp2_image_cache_hits_answer_what_tp1_answers(runner: Runner, runner_tp2: Runner) -> None:
    """Only rank 0 encodes (and caches); the followers get the features it used, hit or miss, so a hit at TP 2 still
    answers what TP 1 answers."""
    from tests.runner.test_metrics import _noise_url
    from tests.runner.test_server import metric

    body = chat_body("What is this?", _noise_url(1604), max_tokens=12)  # an image no other test sends

    def ask_noise(target: Runner) -> tuple[str, str, int]:
        response = httpx.post(f"{target.url}/v1/chat/completions", timeout=120, json=body)
        assert response.status_code == 200, response.text
        return answer(response.json())

    want = ask_noise(runner)
    hits, misses = (metric(runner_tp2, f"vlmforge_image_cache_{kind}_total") for kind in ("hits", "misses"))
    assert ask_noise(runner_tp2) == want
    assert metric(runner_tp2, "vlmforge_image_cache_misses_total") == misses + 1
    assert ask_noise(runner_tp2) == want
    assert metric(runner_tp2, "vlmforge_image_cache_hits_total") == hits + 1


def test_vila_served_at_tp2_answers_what_tp1_answers(tiny_vila_engine: Path, tiny_vila_engine_tp2: Path,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """tiny-vila (VILA1.5 layout, vlmforge's own projector) served at TP 1 and at TP 2 under mpirun: the same greedy
    answers, one at a time and as concurrent requests batched in lockstep (exactly, but for float16 near-ties)."""
    from tests.helpers.runners import start_runner

    tp1 = start_runner(tiny_vila_engine, tmp_path_factory.mktemp("vila-tp1") / "serve.log",
                       args=("--max-batch-size", "4", "--batch-wait-ms", "20"))
    tp2 = None
    try:
        tp2 = deploy_runner(tiny_vila_engine_tp2, tmp_path_factory.mktemp("vila-tp2"),
                            serve_args=("--max-batch-size", "4", "--batch-wait-ms", "50"))
        assert httpx.get(f"{tp2.url}/health").json()["tensor_parallel"] == 2
        want = [answer(ask(tp1, *case, model="tiny-vila")) for case in CASES]
        assert [answer(ask(tp2, *case, model="tiny-vila")) for case in CASES] == want
        assert len({text for text, _, _ in want}) > 1, "different images and prompts give different answers"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda case: answer(ask(tp2, *case, model="tiny-vila")), CASES * 2))
        # concurrent requests join each other's batches (in-flight): other shapes and padding than alone, so a
        # float16 near-tie in a lone decode may flip (float32 joins are exact: tests/runner/test_inflight.py)
        from tests.runner.test_server import near_tie
        from vlmforge.runner.engine import HfEngine

        engine = HfEngine(tiny_vila_engine)
        tied = {case for case in CASES if near_tie(engine, *case)}
        assert len(tied) < len(CASES) // 2 + 1, "most requests are compared exactly"
        assert [g for g, case in zip(got, CASES * 2) if case not in tied] == \
            [w for w, case in zip(want * 2, CASES * 2) if case not in tied]
    finally:
        stop_runner(tp1)
        if tp2 is not None:
            assert stop_runner(tp2, timeout=60) == 0, tp2.log_text()[-3000:]


def test_sigterm_to_rank_0_drains_then_every_rank_exits(runner_tp2: Runner) -> None:
    """Last in this module: it stops the module's TP=2 runner. Requests in flight when rank 0 gets SIGTERM run
    to their end; later ones are refused (503, or no connection); then every rank exits 0.

    "No connection" includes a reset: a connection still in the listen backlog, or accepted but with its request
    not yet read, when uvicorn closes its sockets is reset by the kernel (seen once in a clean-clone CI run). Such a
    request never reached the engine; the check that none that did was dropped is that every request in flight at
    the signal got its 200."""
    runner = runner_tp2

    def timed(index: int) -> tuple[int, dict, float]:
        try:
            response = httpx.post(f"{runner.url}/v1/chat/completions", timeout=120,
                                  json=chat_body("What is this?", image_url(index % 4), max_tokens=32))
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            return 0, {}, time.monotonic()
        return response.status_code, response.json(), time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(timed, i) for i in range(8)]
        deadline = time.monotonic() + 30
        while httpx.get(f"{runner.url}/health").json()["in_flight"] < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        in_flight = httpx.get(f"{runner.url}/health").json()["in_flight"]
        signalled = time.monotonic()
        code = stop_runner(runner, timeout=120)  # SIGTERM to rank 0
        results = [f.result() for f in futures]
    assert in_flight >= 3
    done = [body for status, body, _ in results if status == 200]
    assert len(done) >= in_flight, f"{in_flight} in flight at the signal, {len(done)} answered: {results}"
    assert sum(1 for status, _, ended in results if status == 200 and ended > signalled) >= 1, results
    assert all(answer(body)[2] == 32 or answer(body)[1] == "stop" for body in done), "each ran to its end"
    assert all(status in (200, 503, 0) for status, _, _ in results), results
    assert code == 0, runner.log_text()[-3000:]
    log = runner.log_text()
    assert "SIGTERM: draining" in log
    assert "rank 1: shutdown (rank 0 drained its requests)" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{runner.url}/health")


def test_an_llm_the_plan_left_whole_is_refused() -> None:
    """transformers applies a tensor-parallel plan by module name; a plan that matches nothing leaves every weight
    whole on every rank: the runner refuses that rather than serve TP 2 that is not split."""
    import torch

    from vlmforge.errors import DeployError
    from vlmforge.runner.engine import check_sharded

    with pytest.raises(DeployError, match="split none of Sequential's weights over 2 ranks.*--tp 1"):
        check_sharded(torch.nn.Sequential(torch.nn.Linear(4, 4)), "tiny-x", 2)
