"""Batch jobs: the encode -> prefix -> batch sequence of an incremental engine, written once.

The scheduler (rank 0), the tensor-parallel followers and :meth:`HfEngine.generate_batch` all go through it:

1. :func:`encode_job`: the batch's images (every image of every request, in one pass) through the visual engine
   (rank 0 only) -> a :class:`BatchJob` (each request's features, prompt and token limit), which rank 0 also sends
   the other ranks;
2. :func:`lead_batch` (rank 0) or :func:`follow_job` (the others): each request's LLM prefix from its features
   and prompt, then the batch that decodes them (rank 0 picks the tokens, the others are fed them).

A prompt the family refuses is a :class:`JobRejected` on every rank alike, so every rank skips the batch.
Whole-request engines get a :class:`WholeJob` instead (the images themselves: each rank runs its own runner).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vlmforge.modeling.generation import LlmPrefix
    from vlmforge.runner.batching import GreedyBatch, StepSource, StepSync
    from vlmforge.runner.protocol import IncrementalEngine
    from vlmforge.runner.sampling import SamplingParams


class JobRejected(ValueError):
    """The family cannot take a request of the batch (the same on every rank): the batch is skipped."""


@dataclass
class BatchJob:
    """One batch after its visual stage, in request order; what rank 0 sends the other ranks."""

    features: list[torch.Tensor | list[torch.Tensor]]
    """Each request's visual features: [1, N, hidden] for a one-image request, one such tensor per image (in order)
    for a request with several."""
    prompts: list[str | None]
    max_new_tokens: list[int]
    vision_ms: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if not len(self.features) == len(self.prompts) == len(self.max_new_tokens):
            raise ValueError(f"{len(self.features)} feature sets, {len(self.prompts)} prompts and "
                             f"{len(self.max_new_tokens)} token limits")

    def to_host(self) -> BatchJob:
        """The same job with its features on the CPU (what goes over the control channel)."""
        return replace(self, features=[[p.to("cpu") for p in f] if isinstance(f, list) else f.to("cpu")
                                       for f in self.features])


@dataclass
class WholeJob:
    """A batch for whole-request engines: the images themselves, since every rank runs the engine's own runner on
    the same inputs."""

    images: list[Any]
    prompts: list[str | None]
    max_new_tokens: list[int]
    sampling: list[SamplingParams | None] | None = None
    """Each request's sampling parameters (seeds included: every rank's runner must draw the same tokens)."""


def encode_job(engine: IncrementalEngine, images: Sequence[Any], prompts: Sequence[str | None],
               max_new_tokens: Sequence[int]) -> BatchJob:
    """Stage 1 (rank 0): every request's image through the visual engine, timed. A request's entry in ``images`` is
    its image, or a list of its images (several per prompt): all of the batch's images are encoded together and
    handed back to their requests in order, each with its prompt's image count (LLaVA-OneVision preprocesses an
    image among several otherwise than one alone). The same image object in prompts of as many images (a request's
    ``n`` choices share theirs) is encoded once; requests that share it share its features (read-only). An engine
    that renders the prompt into its images (``renders_prompt``: Pix2Struct VQA) encodes each image with its
    request's prompt: the same image with another prompt is encoded apart."""
    import time

    if not len(images) == len(prompts) == len(max_new_tokens):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(max_new_tokens)} token limits")
    started = time.perf_counter()
    groups = [list(entry) if isinstance(entry, (list, tuple)) else [entry] for entry in images]
    with_prompt = engine.renders_prompt
    # (id(image), its prompt where rendered, images of its prompt) -> its index among the images encoded (the n
    # choices of a request share their image objects: encoded once)
    distinct: dict[tuple[int, str | None, int], int] = {}
    unique: list[Any] = []
    unique_prompts: list[str | None] = []
    counts: list[int] = []
    for group, prompt in zip(groups, prompts, strict=True):
        for image in group:
            key = (id(image), prompt if with_prompt else None, len(group))
            if key not in distinct:
                distinct[key] = len(unique)
                unique.append(image)
                unique_prompts.append(prompt)
                counts.append(len(group))
    encoded = engine.encode_images(unique, unique_prompts if with_prompt else None, images_in_prompt=counts)
    features: list[Any] = []
    for entry, group, prompt in zip(images, groups, prompts, strict=True):
        own = [encoded[distinct[(id(image), prompt if with_prompt else None, len(group))]] for image in group]
        features.append(own if isinstance(entry, (list, tuple)) else own[0])
    return BatchJob(features, list(prompts), list(max_new_tokens), (time.perf_counter() - started) * 1000)


def job_prefixes(engine: IncrementalEngine, job: BatchJob) -> list[LlmPrefix]:
    """Stage 2 (every rank): each request's LLM prefix; :class:`JobRejected` for a prompt the family refuses."""
    import torch

    try:
        with torch.no_grad():
            return [engine.llm_prefix(features, prompt) for features, prompt in zip(job.features, job.prompts)]
    except ValueError as exc:
        raise JobRejected(str(exc)) from exc


def lead_batch(engine: IncrementalEngine, job: BatchJob, *, sync: StepSync | None = None,
               keep_logits: bool = False, sampling: Sequence[SamplingParams | None] | None = None,
               capacity: int | None = None, max_prefill_tokens: int | None = None,
               batched_joins: bool = True) -> GreedyBatch:
    """Stage 3 on rank 0 (or alone): the batch that decodes the job; iterate it for its tokens. ``sampling``: each
    request's parameters (rank 0 alone samples: the followers are fed its tokens, so the job does not carry them);
    ``capacity``: the most live requests once others join it (in-flight batching); ``max_prefill_tokens`` and
    ``batched_joins``: how the requests joining at one step boundary are prefilled (:class:`GreedyBatch`)."""
    batch = engine.new_batch(job_prefixes(engine, job), job.max_new_tokens, sync=sync, keep_logits=keep_logits,
                             sampling=sampling)
    batch.capacity = capacity
    batch.max_prefill_tokens = max_prefill_tokens
    batch.batched_joins = batched_joins
    return batch


def split_job(job: BatchJob) -> list[BatchJob]:
    """One job per request (requests joining a running batch are admitted, and sent to the followers, one by
    one)."""
    return [BatchJob([f], [p], [n], job.vision_ms) for f, p, n in zip(job.features, job.prompts, job.max_new_tokens)]


class _Joiners:
    """A follower's StepSource whose joiners (rank 0's one-request host BatchJobs) come out as (prefix, limit)."""

    def __init__(self, engine: IncrementalEngine, source: StepSource) -> None:
        self.engine, self.source = engine, source

    def step(self, size: int) -> Any:
        tokens, go_on, changes = self.source.step(size)
        if changes is not None and changes.joined and go_on:  # made here, as rank 0 makes them: right after this
            changes = replace(changes, joined=tuple(self._prefix(job) for job in changes.joined))
        return tokens, go_on, changes

    def _prefix(self, job: BatchJob) -> tuple[LlmPrefix, int] | None:
        try:
            return job_prefixes(self.engine, job)[0], job.max_new_tokens[0]
        except JobRejected:  # rank 0 fails the same way and drops the joiner too
            return None


def follow_job(engine: IncrementalEngine, job: BatchJob, source: StepSource) -> int:
    """Stage 3 on a following rank: the same forwards as rank 0, fed its tokens, with the same requests joining at
    the same step boundaries. Returns the steps run."""
    return engine.follow_batch(job_prefixes(engine, job), _Joiners(engine, source))
