"""Several images in one request: a tiny-llava engine built for two images per prompt (limits.max_images_per_prompt: 2)
validates a two-image request at build time, decodes it batched as it does alone, serves it through the openai client,
and refuses more images than it was built for with a 400 naming the limit."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers.runners import (
    Runner,
    assert_batched_equals_alone,
    assert_image_order_counts,
    assert_validates_two_images,
    build_validated,
    chat_body,
    golden_image,
    image_url,
    near_tie,
)

TWO_IMAGES = {"limits.max_images_per_prompt": 2, "visual.max_batch_size": 8}
"""tiny-llava (batch 4) for two images per prompt: its visual engine takes 4 x 2 images per call."""
MAX_TOKENS = 12
# (image indexes, prompt): one- and two-image requests mixed in one batch, none with a float16 near-tie among its
# greedy steps (the smallest top-2 margin is 0.005; batching moves these float16 logits by about 0.001)
REQUESTS = [((0, 1), "Which of the two is brighter?"), ((2,), "What is this?"), ((2, 0), "Compare them."),
            ((1, 1), None), ((1,), "Question: which city is this? Answer:")]


@pytest.fixture(scope="module")
def built(build_workdir: Path) -> tuple[Path, dict[str, Any]]:
    return build_validated("tiny-llava", build_workdir, TWO_IMAGES)


@pytest.fixture(scope="module")
def engine(built: tuple[Path, dict[str, Any]]) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(built[0])


@pytest.fixture(scope="module")
def two_image_runner(built: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.helpers.runners import start_runner, stop_runner

    log = tmp_path_factory.mktemp("two-images") / "serve.log"
    started = start_runner(built[0], log, args=("--max-batch-size", "4", "--batch-wait-ms", "300"))
    yield started
    stop_runner(started)


def request_images(indexes: tuple[int, ...]) -> Any:
    return [golden_image(i) for i in indexes] if len(indexes) > 1 else golden_image(indexes[0])


def body(indexes: tuple[int, ...], text: str | None, **fields: Any) -> dict[str, Any]:
    request = chat_body(text, image_url(indexes[0]), **fields)
    request["messages"][0]["content"] += [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in indexes[1:]]
    return request


def test_the_build_validates_a_two_image_request(built: tuple[Path, dict[str, Any]]) -> None:
    assert_validates_two_images(built, "<image>")


def test_batched_equals_unbatched_with_two_image_requests(engine: Any) -> None:
    batched = assert_batched_equals_alone(engine, [request_images(indexes) for indexes, _ in REQUESTS],
                                          [prompt for _, prompt in REQUESTS], MAX_TOKENS)
    assert_image_order_counts(engine, golden_image(0), golden_image(1), REQUESTS[0][1], MAX_TOKENS, batched[0],
                              min_difference=0.05)
    assert engine.prompt_length("Hi", 2) == engine.prompt_length("Hi") + 16 + 1  # its 16 rows and its "<image>\n"


def test_the_openai_client_sends_two_images_batched_as_alone(two_image_runner: Runner, engine: Any) -> None:
    client = openai.OpenAI(base_url=f"{two_image_runner.url}/v1", api_key="unused", max_retries=0, timeout=120)
    card = client.models.retrieve("tiny-llava")
    assert card.model_extra["max_images_per_prompt"] == 2
    before = httpx.get(f"{two_image_runner.url}/health").json()["batches"]

    def ask(request: tuple[tuple[int, ...], str | None]) -> Any:
        indexes, text = request
        return client.chat.completions.create(model="tiny-llava", max_tokens=MAX_TOKENS,
                                              messages=body(indexes, text)["messages"])

    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        answers = list(pool.map(ask, REQUESTS))
    batches = httpx.get(f"{two_image_runner.url}/health").json()["batches"] - before
    assert batches < len(REQUESTS)  # some requests shared a batch
    exact = 0
    for (indexes, text), answer in zip(REQUESTS, answers, strict=True):
        alone = engine.generate(request_images(indexes), text, MAX_TOKENS)
        if not near_tie(alone):  # a float16 near-tie may flip in another batch shape
            assert answer.choices[0].message.content == alone.text, (indexes, text)
            exact += 1
        assert answer.usage.prompt_tokens == engine.prompt_length(text, len(indexes))
    assert exact > len(REQUESTS) // 2, "most requests are compared exactly"


def test_more_images_than_the_engine_was_built_for_is_refused(two_image_runner: Runner) -> None:
    client = openai.OpenAI(base_url=f"{two_image_runner.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-llava", messages=body((0, 1, 2), "Three?")["messages"], max_tokens=4)
    message = caught.value.body["message"]
    assert "takes 1 to 2 images per request" in message and "max_images_per_prompt 2" in message and "got 3" in message
    assert caught.value.status_code == 400


def test_a_one_image_engine_refuses_two(runner: Runner) -> None:
    response = httpx.post(f"{runner.url}/v1/chat/completions", json=body((0, 1), "Two?", model="tiny-llava"),
                          timeout=60)
    assert response.status_code == 400
    assert "tiny-llava takes exactly one image per request" in response.json()["error"]["message"]
