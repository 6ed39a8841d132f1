"""Serving tiny-pix2struct-vqa (a DePlot-style VQA checkpoint, built and validated by the real hf pipeline with a
question as its header): each request's text is rendered above its image, so the answer is transformers' own
generate() on Pix2StructProcessor(images=image, text=question); the image cache keys an image on its question too
(another question misses, the same one hits); `vlmforge serve` takes text for it (image-only captioning checkpoints
still refuse text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vlmforge.modeling.images import synthetic_images

MAX_TOKENS = 12
NAME = "pix2struct-vqa"
QUESTIONS = ("Generate underlying data table of the figure below:", "What is the highest value?", "")
SIZES: list[tuple[int, int]] = [(64, 64), (120, 60), (50, 100)]


def image(index: int) -> Any:
    return synthetic_images()[index % 3].resize(SIZES[index % 3])


@pytest.fixture(scope="module")
def engine_dir(tiny_engine_of: Any) -> Path:
    return tiny_engine_of(NAME)


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(engine_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """The float32 checkpoint the engine was built from (tiny://pix2struct-vqa is deterministic), transformers'
    processor and the checkpoint's header font."""
    from transformers import Pix2StructForConditionalGeneration, Pix2StructProcessor

    from vlmforge.families import get_family
    from vlmforge.families.pix2struct import HEADER_FONT_FILE

    folder = tmp_path_factory.mktemp("vqa-source")
    get_family("pix2struct").make_tiny_source(f"tiny://{NAME}", folder)
    model = Pix2StructForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, Pix2StructProcessor.from_pretrained(folder), folder / HEADER_FONT_FILE


def transformers_answer(reference: tuple[Any, Any, Path], picture: Any, question: str,
                        monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """transformers' generate() on its processor's output for the image and question (the font it would fetch from
    the hub is the checkpoint's), without the decoder's start token, up to its end token."""
    import importlib

    model, processor, font = reference

    class LocalFont:
        def hf_hub_download(self, *args: object, **kwargs: object) -> str:
            return str(font)

    module = importlib.import_module(type(processor.image_processor).__module__)
    if hasattr(module, "hf_api"):  # transformers 5
        monkeypatch.setattr(module, "hf_api", lambda: LocalFont())
    else:  # transformers 4.57
        monkeypatch.setattr(module, "hf_hub_download", LocalFont().hf_hub_download)
    inputs = processor(images=[picture], text=question, max_patches=64, return_tensors="pt")
    assert "decoder_input_ids" not in inputs  # VQA: the question is the header, the decoder gets no text
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    tokens = [int(t) for t in out[0, 1:]]
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_the_engine_renders_prompts_and_answers_as_transformers(engine: Any, reference: tuple[Any, Any, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine (float16 decoder, ONNX encoder) answers each image and question with transformers' own float32
    generate() tokens, and different questions give the encoder different inputs."""
    assert engine.renders_prompt and engine.config.family == "pix2struct"
    for index, question in enumerate(QUESTIONS):
        got = engine.generate(image(index), question, MAX_TOKENS)
        assert got.tokens == transformers_answer(reference, image(index), question, monkeypatch), question
    headers = engine.headers([image(0)] * 2, list(QUESTIONS[:2]))
    assert headers == list(QUESTIONS[:2])
    first, second = (engine._inputs([image(0)], [h]).pixels for h in headers)
    assert not torch.equal(first, second)


def test_the_image_cache_keys_an_image_on_its_question(engine_dir: Path) -> None:
    """Same image, another question: a miss (other features); same image and question: a hit (the same features);
    encode_job encodes one image object asked two questions twice."""
    from vlmforge.runner.engine import HfEngine
    from vlmforge.runner.jobs import encode_job

    cached = HfEngine(engine_dir, image_cache_bytes=64 * 1024 * 1024)
    picture = image(1)
    first = cached.encode_images([picture], [QUESTIONS[0]])[0]
    stats = cached.image_cache.stats()
    assert (stats.hits, stats.misses) == (0, 1)
    other = cached.encode_images([picture], [QUESTIONS[1]])[0]
    stats = cached.image_cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (0, 2, 2)
    again = cached.encode_images([picture], [QUESTIONS[0]])[0]
    stats = cached.image_cache.stats()
    assert (stats.hits, stats.misses) == (1, 2)
    assert torch.equal(first, again) and (first.shape != other.shape or not torch.equal(first, other))
    job = encode_job(cached, [picture, picture, picture], [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]], [4, 4, 4])
    assert torch.equal(job.features[0], first) and torch.equal(job.features[1], other)
    assert torch.equal(job.features[2], first)
    stats = cached.image_cache.stats()
    assert (stats.hits, stats.misses) == (3, 2)  # two distinct (image, question) pairs, both stored


def test_batched_equals_alone_with_questions(engine: Any) -> None:
    from tests.helpers.runners import assert_batched_equals_alone

    picture = image(0)
    assert_batched_equals_alone(engine, [picture, picture, image(2)], list(QUESTIONS), MAX_TOKENS)


def test_the_server_takes_questions(engine_dir: Path, engine: Any, tmp_path: Path) -> None:
    """Through `vlmforge serve` and the openai client: each request's text is its header (the answers are the
    engine's for that image and question); a text past the header limit is refused with the reason."""
    import base64
    import concurrent.futures
    import io

    import openai

    from tests.helpers.runners import start_runner, stop_runner
    from vlmforge.runner.openai_api import MAX_HEADER_CHARS

    def url(index: int) -> str:
        buffer = io.BytesIO()
        image(index).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def content(index: int, text: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url(index)}}]
        return parts + ([{"type": "text", "text": text}] if text else [])

    asks = [(0, QUESTIONS[0]), (0, QUESTIONS[1]), (1, QUESTIONS[1]), (2, "")]
    runner = start_runner(engine_dir, tmp_path / "serve.log",
                          args=("--max-batch-size", "4", "--batch-wait-ms", "300", "--image-cache-mib", "16"))
    try:
        client = openai.OpenAI(base_url=f"{runner.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(entry: tuple[int, str]) -> Any:
            return client.chat.completions.create(
                model="tiny-pix2struct-vqa", max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": content(*entry)}])

        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(ask, asks))
        with pytest.raises(openai.BadRequestError, match="renders into the image as its header"):
            ask((0, "x" * (MAX_HEADER_CHARS + 1)))
    finally:
        stop_runner(runner)
    for (index, text), answer in zip(asks, answers, strict=True):
        assert answer.choices[0].message.content == engine.generate(image(index), text or None, MAX_TOKENS).text
