"""The OpenAI chat-completions format, as far as the runner serves it.

Requests are parsed and checked here (no web framework): a bad request is an :class:`ApiError` with
its HTTP status and OpenAI's error body. What the runner takes:

- one ``user`` message (single turn) with text parts and one ``image_url`` part per image, up to the engine's
  ``max_images_per_prompt`` (1 unless its spec said more; the images go to the model in their order, before the
  text, as LLaVA's chat template places them): a ``data:image/...;base64,`` URL, or a ``file://`` URL under the
  runner's ``--image-root``; each image a PNG, JPEG, WebP or GIF (its first frame), as OpenAI's vision API takes
  (:data:`IMAGE_FORMATS`);
- prompt-free models (Nougat) take the image alone;
- ``max_tokens`` / ``max_completion_tokens`` up to the engine's ``max_output_len``; ``stop`` strings;
  ``stream`` with ``stream_options.include_usage`` (``prompt_tokens`` counts the image features' positions);
- sampling (:mod:`vlmforge.runner.sampling`): ``temperature`` 0..2 (0 or unset: greedy, exactly the runner's argmax
  decode; note OpenAI's own default is 1), ``top_p`` (0, 1], ``seed`` (the same seed gives the same text, batched
  or not), ``n`` choices (up to :attr:`Limits.max_choices`; choice i is seeded ``seed + i``),
  ``presence_penalty``/``frequency_penalty`` -2..2, ``logprobs`` with ``top_logprobs`` 0..20 (log-softmax of the
  model's raw logits), and vLLM's extensions ``top_k`` (-1 or 0: off), ``min_tokens``, ``ignore_eos`` and
  ``repetition_penalty`` (> 0); penalties count the generated tokens only.

Refused with a 400 naming the parameter: ``tools``, ``logit_bias``, ``response_format`` other than ``text``
(``json_object`` and ``json_schema`` would need constrained decoding, which the runner does not do), and any
sampling parameter the engine cannot honour (the TensorRT-LLM path: see :mod:`vlmforge.runner.trtllm`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmforge.runner.sampling import MAX_LOGPROBS, SamplingParams

MiB = 1024 * 1024

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
"""The image formats the API takes (Pillow's names); Pillow is never asked to try another (EPS would start
Ghostscript, and each extra decoder is attack surface)."""
IMAGE_FORMAT_NAMES = "PNG, JPEG, WebP or GIF"


class ApiError(Exception):
    """A request the runner refuses: HTTP status and OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Limits(BaseModel):
    """What one request may ask for; beyond it, a 4xx. Each bounds the work a request costs before it is refused."""

    max_request_bytes: int = Field(default=32 * MiB, ge=1)
    max_image_bytes: int = Field(default=20 * MiB, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_image_side: int = Field(default=8192, ge=1)
    max_stop_strings: int = Field(default=4, ge=0)
    max_choices: int = Field(default=8, ge=1)
    """``n``: choices per request (each is a row of the batch)."""
    max_json_values: int = Field(default=100_000, ge=16)
    """Objects, arrays and list items a request body may hold, counted on its bytes before it is parsed (JSON parsing
    holds the interpreter: a 32 MiB body of tiny values would stall every other request for a second)."""
    max_prompt_chars_per_token: int = Field(default=8, ge=1)
    """A prompt's text may be at most this many characters per token of the engine's max_input_len, checked before
    it is tokenized (English averages about 4 characters per token)."""


# --- the request ---------------------------------------------------------------------------------


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's request that the runner reads; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=-(2 ** 63), le=2 ** 63 - 1)
    n: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None


def decode_json(body: bytes | bytearray, limits: Limits) -> Any:
    """The request body as JSON, within :attr:`Limits.max_json_values` and Python's nesting limit (400 otherwise)."""
    # Every value after a container's first follows a comma; every container opens with [ or {: so this count bounds
    # the values json.loads would make, whatever the strings hold (it may overcount, never undercount).
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > limits.max_json_values:
        raise ApiError(400, f"the request body holds over {limits.max_json_values} JSON values (commas, objects and "
                            "arrays); a chat request needs a few dozen")
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise ApiError(400, f"the request body is not JSON: {exc}") from None


def parse_request(body: Any) -> ChatRequest:
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"invalid request: {where}: {first['msg']}", param=where or None) from None
    if request.top_logprobs is not None and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if request.response_format is not None and request.response_format.get("type") != "text":
        kind = request.response_format.get("type")
        raise ApiError(400, f"response_format: {kind!r} is not supported (the runner does not constrain its "
                            "decoding to JSON); leave response_format out or send {\"type\": \"text\"}",
                       param="response_format")
    if request.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this runner", param="logit_bias")
    if request.tools:
        raise ApiError(400, "tools are not served by this runner", param="tools")
    return request


class ParsedChat(BaseModel):
    text: str | None
    image_urls: list[str]
    """The request's images, in order."""

    @property
    def image_url(self) -> str:
        """The first (for one-image requests: the) image."""
        return self.image_urls[0]


def parse_messages(messages: list[Message], *, takes_prompt: bool, model: str, max_images: int = 1) -> ParsedChat:
    """The one user turn's text and image URLs (1 to ``max_images``, the engine's max_images_per_prompt)."""
    roles = [m.role for m in messages]
    if roles != ["user"]:
        raise ApiError(400, f"messages: this runner serves one user message with one image (single turn); got roles "
                            f"{roles}", param="messages")
    content = messages[0].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
    texts, images = [], []
    for index, part in enumerate(parts):
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "image_url":
            if part.image_url is None:
                raise ApiError(400, f"messages[0].content[{index}]: an image_url part needs image_url.url",
                               param=f"messages[0].content[{index}]")
            images.append(part.image_url.url)
        else:
            raise ApiError(400, f"messages[0].content[{index}]: unsupported content type {part.type!r} (text and "
                                "image_url are)", param=f"messages[0].content[{index}]")
    if max_images == 1 and len(images) != 1:
        raise ApiError(400, f"messages[0]: {model} takes exactly one image per request (an image_url part); got "
                            f"{len(images)}", param="messages")
    if not 1 <= len(images) <= max_images:
        raise ApiError(400, f"messages[0]: {model} takes 1 to {max_images} images per request (image_url parts; its "
                            f"engine was built for max_images_per_prompt {max_images}); got {len(images)}",
                       param="messages")
    text = "\n".join(t for t in texts if t) or None
    if text is not None and not takes_prompt:
        raise ApiError(400, f"messages[0]: {model} reads the image alone (no prompt): send the image_url part without "
                            "text", param="messages")
    return ParsedChat(text=text, image_urls=images)


def check_prompt_chars(text: str | None, max_chars: int, max_input_len: int, chars_per_token: int) -> None:
    """Refuse a text too long to tokenize within the engine's input limit, before tokenizing it."""
    if text is not None and len(text) > max_chars:
        raise ApiError(400, f"messages: the text is {len(text)} characters, over this runner's limit of {max_chars} "
                            f"(max_input_len {max_input_len} tokens x {chars_per_token} characters per token); "
                            "shorten the prompt", param="messages", code="context_length_exceeded")


MAX_HEADER_CHARS = 1000
"""The longest text an engine that renders the prompt into the image (Pix2Struct VQA) takes: its header shares the
image's patches, so a longer one leaves the picture almost none (DePlot's prompt is 51 characters)."""


def check_header_chars(text: str | None, max_chars: int) -> None:
    """Refuse a header text too long to render into the image."""
    if text is not None and len(text) > max_chars:
        raise ApiError(400, f"messages: the text is {len(text)} characters, over the {max_chars} this model renders "
                            "into the image as its header (the header shares the image's patches); shorten the "
                            "question", param="messages", code="context_length_exceeded")


def stop_strings(request: ChatRequest, limits: Limits) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    stops = [s for s in stops if s]
    if len(stops) > limits.max_stop_strings:
        raise ApiError(400, f"stop: at most {limits.max_stop_strings} stop strings", param="stop")
    return stops


def choices(request: ChatRequest, limits: Limits) -> int:
    """How many choices the request asks for (``n``), within :attr:`Limits.max_choices`."""
    n = request.n or 1
    if n > limits.max_choices:
        raise ApiError(400, f"n = {n} exceeds this runner's limit of {limits.max_choices} choices per request",
                       param="n")
    return n


def sampling_params(request: ChatRequest, max_tokens: int) -> SamplingParams:
    """The request's :class:`SamplingParams` (limits already checked by the request's model); ``min_tokens`` may not
    exceed the request's token limit. A sampled request without a seed gets a random one here, so every choice and
    every rank that needs it can be told the same seed."""
    import secrets

    if request.min_tokens is not None and request.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens = {request.min_tokens} exceeds the request's token limit of {max_tokens}",
                       param="min_tokens")
    given = {name: getattr(request, name) for name in (
        "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "min_tokens", "ignore_eos")}
    fields = {name: value for name, value in given.items() if value is not None}
    if request.logprobs:
        fields["logprobs"] = request.top_logprobs or 0
    params = SamplingParams(**fields)
    if params.seed is None and not params.greedy:
        params = params.model_copy(update={"seed": secrets.randbits(63)})
    return params


def max_new_tokens(request: ChatRequest, *, max_output_len: int, default: int) -> int:
    asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if asked is None:
        return default
    if asked < 1:
        raise ApiError(400, f"{param} must be at least 1, got {asked}", param=param)
    if asked > max_output_len:
        raise ApiError(400, f"{param} = {asked} exceeds this engine's max_output_len of {max_output_len}", param=param,
                       code="context_length_exceeded")
    return asked


# --- images ----------------------------------------------------------------------------------------


def load_image(url: str, limits: Limits, image_root: Path | None) -> Any:
    """Decode a data URL (or read a file URL under ``image_root``) into an RGB PIL image, within the limits."""
    from PIL import Image, UnidentifiedImageError

    param = "messages[0].content.image_url"
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, "image_url: a data URL must be data:<mime>;base64,<data>", param=param)
        if len(payload) > (limits.max_image_bytes * 4) // 3 + 4:
            raise ApiError(413, f"image_url: the image is over {limits.max_image_bytes} bytes", param=param)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image_url: the data URL is not valid base64", param=param) from None
    elif url.startswith("file:"):
        raw = _read_file_url(url, limits, image_root, param)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise ApiError(400, f"image_url: {scheme!r} URLs are not fetched by the runner; send a data URL "
                            "(data:image/png;base64,...) or a file URL under the runner's --image-root", param=param)
    if len(raw) > limits.max_image_bytes:
        raise ApiError(413, f"image_url: the image is {len(raw)} bytes, over the limit of {limits.max_image_bytes}",
                       param=param)
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:  # Pillow's own ceiling, met before ours can be checked
        raise ApiError(413, f"image_url: the image's declared size is over the limit ({limits.max_image_pixels} "
                            "pixels)", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(400, f"image_url: the data is not an image this runner reads ({IMAGE_FORMAT_NAMES})",
                       param=param) from None
    width, height = image.size
    if width * height > limits.max_image_pixels or max(width, height) > limits.max_image_side:
        raise ApiError(413, f"image_url: {width}x{height} pixels exceed the limit ({limits.max_image_pixels} pixels, "
                            f"{limits.max_image_side} per side)", param=param)
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"image_url: the image cannot be decoded: {exc}", param=param) from None


def _read_file_url(url: str, limits: Limits, image_root: Path | None, param: str) -> bytes:
    if image_root is None:
        raise ApiError(400, "image_url: file URLs are off; start the runner with --image-root DIR to read images "
                            "from DIR", param=param)
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ApiError(400, f"image_url: a file URL names a local path (file:///...), not host {parsed.netloc!r}",
                       param=param)
    root = image_root.resolve()
    asked = urllib.parse.unquote(parsed.path)  # messages name only this: never where a symlink in it leads
    path = Path(asked).resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"image_url: {asked} is outside the runner's image root", param=param)
    if not path.is_file():
        raise ApiError(400, f"image_url: no file {asked}", param=param)
    if path.stat().st_size > limits.max_image_bytes:
        raise ApiError(413, f"image_url: {asked} is over {limits.max_image_bytes} bytes", param=param)
    return path.read_bytes()


# --- responses -------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
          usage_: dict[str, int] | None = None, choices: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish_reason}] if choices else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out




class TextStream:
    """Detokenizes a growing token list into text deltas, holding back what might still change: an
    incomplete UTF-8 sequence, or the start of a stop string."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the text that can be sent now ("" if none). Sets ``stopped`` on a stop string."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.text = text
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                self.text = text[:max(at, self.sent)]
                self.stopped = True
                return self.flush()
        ready = len(text) - self.hold
        if text.endswith("\ufffd"):  # maybe the first bytes of a character the next token completes
            ready = min(ready, len(text.rstrip("\ufffd")))
        if ready <= self.sent:
            return ""
        delta = text[self.sent:ready]
        self.sent = ready
        return delta

    def flush(self) -> str:
        """Everything not sent yet (the request is over)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta
