"""The runner's engine protocol: what the scheduler, the tensor-parallel followers and the HTTP server need from a
loaded engine, declared once.

Two kinds of engines meet here:

- :class:`IncrementalEngine` (the hf toolchain) hands the runner its stages: encode images, build each request's
  LLM prefix, make a batch state that decodes one step per iteration. The runner's scheduler batches requests
  into it and streams every token as it is made; under tensor parallelism every rank runs the same prefixes and
  steps. The sequence encode -> prefix -> batch is written once, in :mod:`vlmforge.runner.jobs`.
- :class:`WholeRequestEngine` (TensorRT-LLM's multimodal runner) takes requests whole and hands tokens over as its
  own runner makes them.

An engine says which it is with :attr:`Engine.kind`; the scheduler picks its loop from it once. Nothing in the
runner probes an engine for optional attributes: what is optional here has a default behaviour in every engine
(``warmup`` does nothing where nothing is compiled).

:func:`vlmforge.runner.loader.load_engine` gives the engine an engine directory needs.

Several images per request (up to :attr:`EngineLimits.max_images_per_prompt`): a request carries a list of
images, :mod:`vlmforge.runner.jobs` encodes every image of a batch at once and hands each request its images'
features (a list of [1, N_i, hidden] tensors, of any number of rows each), which ``llm_prefix`` splices in order.
Sampling: ``new_batch`` takes each request's :class:`~vlmforge.runner.sampling.SamplingParams` (rank 0 alone samples;
the followers are fed its tokens); every engine says which parameters it honours with ``check_sampling``, so the
server refuses the others with a 400 before a request is queued. In-flight batching makes ``new_batch``'s state take rows while it runs (and the scheduler's loop feed them). The
scheduler and the followers reach incremental engines only through :mod:`vlmforge.runner.jobs`, so those change
the jobs and the engines, not the loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeAlias

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from vlmforge.artifacts.engine_config import EngineConfig
    from vlmforge.families import ModelFamily
    from vlmforge.modeling.generation import LlmPrefix
    from vlmforge.runner.batching import GreedyBatch, StepSource, StepSync
    from vlmforge.runner.image_cache import ImageCache
    from vlmforge.runner.sampling import SamplingParams


class EngineKind(str, Enum):
    """How an engine generates, which decides the scheduler's loop."""

    INCREMENTAL = "incremental"
    """The runner drives the decode step by step (batches, lockstep ranks, a token per step)."""
    WHOLE_REQUEST = "whole-request"
    """The engine's own runner takes whole requests; tokens come through a callback while one runs."""


@dataclass(frozen=True)
class Generation:
    """One request's result with its timings."""

    tokens: list[int]
    text: str
    logits: torch.Tensor
    """Per-step logits [steps, vocab], float32 on the CPU (empty where the engine gives none)."""
    vision_ms: float
    llm_ms: float

    @property
    def e2e_ms(self) -> float:
        return self.vision_ms + self.llm_ms


@dataclass(frozen=True)
class EngineLimits:
    """What a loaded engine takes per batch and per request (the server refuses requests beyond them)."""

    max_batch_size: int
    """Requests decoded together: the engine's own ceiling (TensorRT), or what it was loaded for (hf)."""
    max_input_len: int
    """Prompt positions (text tokens and image features) per request."""
    max_output_len: int
    """New tokens per request."""
    max_images_per_prompt: int = 1
    """Images per request (engine.json's max_images_per_prompt; 1 where the engine serves one)."""


class Tokenizer(Protocol):
    """The part of a transformers tokenizer the runner uses."""

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = ...) -> str: ...


TokenCallback: TypeAlias = Callable[[int, int], None]
"""``on_token(request_index, token)``: a whole-request engine hands over each token as it is made."""


class Engine(Protocol):
    """What every serving engine gives the runner."""

    kind: ClassVar[EngineKind]
    config: EngineConfig
    """engine.json of the directory it was loaded from."""
    family: ModelFamily
    image_cache: ImageCache | None
    """Visual features of images seen before (:mod:`vlmforge.runner.image_cache`), where the runner encodes images
    itself and was given a size for it; None otherwise."""
    renders_prompt: bool
    """The checkpoint renders each request's text into its images (Pix2Struct VQA: DePlot's header), not into the
    LLM's prompt: the runner encodes images with their requests' prompts and the server takes text for it."""

    @property
    def tokenizer(self) -> Tokenizer:
        """Turns generated tokens into text (the server's incremental detokenizer)."""
        ...

    @property
    def limits(self) -> EngineLimits: ...

    @property
    def decode_path(self) -> str:
        """How it decodes, as /health reports it: ``static``, ``dynamic`` or ``tensorrt-llm``."""
        ...

    @property
    def compiled_decoder(self) -> Any:
        """The compiled static decoder (:class:`~vlmforge.runner.static.StaticDecoder`) whose compile caches a tune
        artifact holds (:mod:`vlmforge.runner.tune`); None where nothing is compiled."""
        ...

    def prompt_length(self, prompt: str | None, num_images: int = 1) -> int:
        """Prompt positions (text tokens and image features) a request with ``num_images`` images takes, from the
        tokenizer alone (no forward); ValueError for a prompt the family cannot take."""
        ...

    def generate(self, image: Image.Image | Sequence[Image.Image], prompt: str | None,
                 max_new_tokens: int) -> Generation:
        """One request (its image, or its images in order) alone, to its end (build validation, selftest)."""
        ...

    def warmup(self, batch_sizes: Sequence[int], prompt_length: int, max_new_tokens: int) -> None:
        """Compile what the given batch shapes need before serving (nothing, where nothing is compiled)."""
        ...

    def check_sampling(self, params: SamplingParams) -> None:
        """Raise :class:`~vlmforge.runner.sampling.UnsupportedSampling` (naming the parameter and why) for
        parameters this engine cannot honour; the server turns it into a 400."""
        ...


class IncrementalEngine(Engine, Protocol):
    """An engine whose decode the runner drives: images -> features -> LLM prefixes -> a batch, step by step."""

    kind: ClassVar[Literal[EngineKind.INCREMENTAL]]

    def encode_images(self, images: Sequence[Image.Image],
                      prompts: Sequence[str | None] | None = None, *,
                      images_in_prompt: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Each image's visual features [1, N, hidden], in order, on the LLM's device (the leading rank only);
        ``prompts`` (one per image, its request's) only for an engine whose ``renders_prompt`` is true (a checkpoint
        that renders the prompt into the image, Pix2Struct VQA; the others are called without);
        ``images_in_prompt[i]``: how many images image i's prompt carries (None: one each; LLaVA-OneVision
        preprocesses an image among several otherwise than one alone)."""
        ...

    def llm_prefix(self, features: torch.Tensor | Sequence[torch.Tensor], prompt: str | None) -> LlmPrefix:
        """What the LLM is fed for one request: its image features (one tensor, or one per image in order; from any
        device: followers get them from rank 0) and the user's text. ValueError for a prompt the family cannot
        take."""
        ...

    def new_batch(self, prefixes: Sequence[LlmPrefix], max_new_tokens: Sequence[int], *,
                  sync: StepSync | None = None, keep_logits: bool = False,
                  sampling: Sequence[SamplingParams | None] | None = None) -> GreedyBatch:
        """The batch that decodes these prefixes together (``sync``: the leading rank tells the followers every
        step's tokens; ``sampling``: each row's parameters, None: greedy)."""
        ...

    def follow_batch(self, prefixes: Sequence[LlmPrefix], source: StepSource) -> int:
        """A following rank's side of a batch: the leader's forwards, fed the leader's tokens. Returns the steps."""
        ...


class WholeRequestEngine(Engine, Protocol):
    """An engine that takes requests whole (every rank makes the same calls)."""

    kind: ClassVar[Literal[EngineKind.WHOLE_REQUEST]]

    def generate_many(self, images: Sequence[Any], prompts: Sequence[str | None], max_new_tokens: Sequence[int],
                      on_token: TokenCallback | None = None,
                      sampling: Sequence[SamplingParams | None] | None = None) -> list[Generation]:
        """The requests to their ends, in order; ``on_token`` gets tokens as they are made (the leading rank);
        ``sampling``: each request's parameters (None: greedy), within what ``check_sampling`` accepts."""
        ...


ServingEngine: TypeAlias = "IncrementalEngine | WholeRequestEngine"
"""What :func:`vlmforge.runner.loader.load_engine` returns."""
