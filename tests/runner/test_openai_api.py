"""Request parsing, image limits and incremental detokenization, without a server."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import pytest

from tests.helpers.runners import chat_body, image_url
from vlmforge.runner.openai_api import (
    ApiError,
    Limits,
    TextStream,
    check_prompt_chars,
    decode_json,
    load_image,
    max_new_tokens,
    parse_messages,
    parse_request,
    stop_strings,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from vlmforge.families.tinykit import make_fast_tokenizer

    return make_fast_tokenizer()


def test_a_request_parses_to_one_text_and_one_image() -> None:
    request = parse_request(chat_body("What is it?", "data:x", max_tokens=5, stop="END", seed=3, user="me"))
    parsed = parse_messages(request.messages, takes_prompt=True, model="m")
    assert (parsed.text, parsed.image_url) == ("What is it?", "data:x")
    assert max_new_tokens(request, max_output_len=32, default=16) == 5
    assert stop_strings(request, Limits()) == ["END"]
    image_only = parse_request(chat_body(None, "data:y"))
    assert parse_messages(image_only.messages, takes_prompt=False, model="m").text is None
    assert max_new_tokens(image_only, max_output_len=32, default=16) == 16


@pytest.mark.parametrize(("body", "status", "words"), [
    (chat_body("hi", "u", max_tokens=0), 400, "at least 1"),
    (chat_body("hi", "u", max_completion_tokens=33), 400, "max_output_len of 32"),
    (chat_body("hi", "u", stop=["a", "b", "c", "d", "e"]), 400, "at most 4"),
    ({"messages": []}, 400, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}, {"type": "image_url"}]}]},
     400, "unsupported content type"),
])
def test_refusals_say_what_is_wrong(body: dict, status: int, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        request = parse_request(body)
        parse_messages(request.messages, takes_prompt=True, model="m")
        max_new_tokens(request, max_output_len=32, default=16)
        stop_strings(request, Limits())
    assert caught.value.status == status and words in caught.value.message
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_a_prompt_free_model_refuses_text() -> None:
    request = parse_request(chat_body("transcribe this", "data:x"))
    with pytest.raises(ApiError, match="reads the image alone"):
        parse_messages(request.messages, takes_prompt=False, model="nougat")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_images_within_and_beyond_the_limits(tmp_path: Path) -> None:

    image = load_image(image_url(0, fmt="JPEG"), Limits(), None)
    assert image.mode == "RGB" and image.size == (64, 64)
    with pytest.raises(ApiError) as caught:
        load_image(image_url(0), Limits(max_image_bytes=100), None)
    assert caught.value.status == 413
    with pytest.raises(ApiError) as caught:
        load_image(image_url(0, size=80), Limits(max_image_side=79), None)
    assert caught.value.status == 413 and "80x80" in caught.value.message
    with pytest.raises(ApiError) as caught:  # a few bytes of PNG header claiming 20000x20000: Pillow's own ceiling
        load_image("data:image/png;base64," + base64.b64encode(png_header(20000, 20000)).decode(), Limits(), None)
    assert caught.value.status == 413
    with pytest.raises(ApiError, match="not valid base64"):
        load_image("data:image/png;base64,abc$", Limits(), None)
    with pytest.raises(ApiError, match="data:<mime>;base64"):
        load_image("data:image/png,rawbytes", Limits(), None)
    truncated = base64.b64decode(image_url(0).split(",")[1])[:200]
    with pytest.raises(ApiError) as caught:
        load_image("data:image/png;base64," + base64.b64encode(truncated).decode(), Limits(), None)
    assert caught.value.status == 400


def test_file_urls_only_under_the_image_root(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (10, 12), "red").save(root / "page 1.png")
    (tmp_path / "secret.png").write_bytes((root / "page 1.png").read_bytes())
    assert load_image((root / "page 1.png").as_uri(), Limits(), root).size == (10, 12)
    with pytest.raises(ApiError) as caught:
        load_image((tmp_path / "secret.png").as_uri(), Limits(), root)
    assert caught.value.status == 403
    with pytest.raises(ApiError) as caught:
        load_image(f"file://{root}/../secret.png", Limits(), root)
    assert caught.value.status == 403
    with pytest.raises(ApiError, match="--image-root"):
        load_image((root / "page 1.png").as_uri(), Limits(), None)
    with pytest.raises(ApiError, match="no file"):
        load_image((root / "missing.png").as_uri(), Limits(), root)


def _stream(tokenizer, text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return [d for d in deltas if d], stream


def test_text_stream_sends_whole_characters_only(tokenizer) -> None:
    text = "café 日本 ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text), "multi-byte characters take several byte tokens"
    deltas, stream = _stream(tokenizer, text, [])
    assert "".join(deltas) == text == stream.text
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_stops_before_a_stop_string_split_over_tokens(tokenizer) -> None:
    deltas, stream = _stream(tokenizer, "The quick brown fox jumps over", ["brown f"])
    assert stream.stopped and "".join(deltas) == "The quick "
    deltas, stream = _stream(tokenizer, "The quick brown fox", ["zebra"])
    assert not stream.stopped and "".join(deltas) == "The quick brown fox"


def _data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def test_only_the_documented_image_formats_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """An EPS payload made Pillow start Ghostscript: only PNG, JPEG, WebP and GIF are ever opened."""
    import io

    from PIL import EpsImagePlugin, Image

    started: list[object] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise OSError("Ghostscript was asked to run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n0 0 moveto showpage\n%%EOF\n"
    with pytest.raises(ApiError) as caught:
        load_image(_data_url(eps, "image/png"), Limits(), None)
    assert caught.value.status == 400 and "PNG, JPEG, WebP or GIF" in caught.value.message
    assert started == []
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        assert load_image(image_url(0, fmt=fmt), Limits(), None).size == (64, 64), fmt
    for fmt in ("BMP", "TIFF", "ICO", "PPM"):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), "red").save(buffer, fmt)
        with pytest.raises(ApiError, match="PNG, JPEG, WebP or GIF"):
            load_image(_data_url(buffer.getvalue()), Limits(), None)


def test_json_bodies_are_bounded_before_they_are_parsed() -> None:
    body = json.dumps(chat_body("hi", "data:x")).encode()
    assert decode_json(body, Limits())["model"] == "tiny-llava"
    with pytest.raises(ApiError) as caught:  # once a RecursionError: a 500
        decode_json(b"[" * 5000 + b"]" * 5000, Limits())
    assert caught.value.status == 400 and "nested too deeply" in caught.value.message
    with pytest.raises(ApiError) as caught:  # ten thousand tiny values parse slowly, holding the interpreter
        decode_json(b"[" + b"1," * 20_000 + b"1]", Limits(max_json_values=10_000))
    assert caught.value.status == 400 and "over 10000 JSON values" in caught.value.message
    for bad in (b"{not json", b"\xff\xfe", b""):
        with pytest.raises(ApiError, match="not JSON"):
            decode_json(bad, Limits())


def test_a_prompt_over_the_character_cap_is_refused_before_tokenizing() -> None:
    check_prompt_chars(None, 80, 10, 8)
    check_prompt_chars("x" * 80, 80, 10, 8)
    with pytest.raises(ApiError) as caught:
        check_prompt_chars("x" * 81, 80, 10, 8)
    assert caught.value.status == 400 and caught.value.code == "context_length_exceeded"
    assert "81 characters" in caught.value.message and "limit of 80" in caught.value.message


def test_a_403_does_not_say_where_a_symlink_points(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    hidden = tmp_path / "private-area-7f3a"
    hidden.mkdir()
    Image.new("RGB", (4, 4)).save(hidden / "secret.png")
    (root / "innocent.png").symlink_to(hidden / "secret.png")
    (root / "gone.png").symlink_to(hidden / "missing.png")
    with pytest.raises(ApiError) as caught:
        load_image((root / "innocent.png").as_uri(), Limits(), root)
    assert caught.value.status == 403
    assert "innocent.png" in caught.value.message and "private-area-7f3a" not in caught.value.message
    with pytest.raises(ApiError) as caught:
        load_image((root / "gone.png").as_uri(), Limits(), root)
    assert "private-area-7f3a" not in caught.value.message


# --- sampling parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 9}, "n", "limit of 8 choices"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ({"min_tokens": 17}, "min_tokens", "token limit of 16"),
    ({"seed": 2 ** 64}, "seed", "less than or equal to"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", "not supported"),
    ({"logit_bias": {"50": 10}}, "logit_bias", "not supported"),
])
def test_each_sampling_refusal_names_its_parameter(fields: dict, param: str, words: str) -> None:
    from vlmforge.runner.openai_api import choices, sampling_params

    with pytest.raises(ApiError) as caught:
        request = parse_request(chat_body("hi", "u", max_tokens=16, **fields))
        choices(request, Limits())
        sampling_params(request, max_new_tokens(request, max_output_len=32, default=16))
    assert caught.value.status == 400 and caught.value.param == param
    assert param in caught.value.message and words in caught.value.message, caught.value.message


def test_sampling_fields_become_the_requests_parameters() -> None:
    from vlmforge.runner.openai_api import choices, sampling_params
    from vlmforge.runner.sampling import SamplingParams

    greedy = parse_request(chat_body("hi", "u"))
    assert sampling_params(greedy, 16) == SamplingParams() and SamplingParams().plain_greedy
    assert choices(greedy, Limits()) == 1
    assert sampling_params(parse_request(chat_body("hi", "u", temperature=0, top_p=1, response_format={"type": "text"})),
                           16).plain_greedy
    request = parse_request(chat_body("hi", "u", temperature=0.7, top_p=0.9, top_k=40, seed=5, n=3, logprobs=True,
                                      top_logprobs=2, presence_penalty=0.5, frequency_penalty=-0.5,
                                      repetition_penalty=1.2, min_tokens=3, ignore_eos=True))
    params = sampling_params(request, 16)
    assert params == SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=5, logprobs=2, presence_penalty=0.5,
                                    frequency_penalty=-0.5, repetition_penalty=1.2, min_tokens=3, ignore_eos=True)
    assert choices(request, Limits()) == 3
    assert [params.for_choice(i).seed for i in range(3)] == [5, 6, 7]
    assert sampling_params(parse_request(chat_body("hi", "u", logprobs=True)), 16).logprobs == 0
    unseeded = [sampling_params(parse_request(chat_body("hi", "u", temperature=1)), 16).seed for _ in range(2)]
    assert None not in unseeded and unseeded[0] != unseeded[1], "a sampled request without a seed gets a random one"
