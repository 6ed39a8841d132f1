"""The TensorRT engine runner: TensorRT-LLM's own multimodal runner, driven like its run.py.

Runs only inside NVIDIA's TensorRT-LLM container with a GPU; elsewhere constructing it raises
:class:`ToolchainUnavailable` before anything is loaded.

Sampling: the multimodal runner calls its LLM runner with ``top_k``, ``top_p``, ``temperature`` and
``repetition_penalty`` from run.py's arguments (greedy: ``top_k=1``); :class:`StreamingModel` replaces them per
request and adds ``random_seed``, ``presence_penalty``, ``frequency_penalty`` and ``min_tokens``: keyword arguments
``ModelRunnerCpp.generate`` turns into the executor's ``SamplingConfig`` (it keeps only the names it lists and drops
the rest silently: tests/contract records the list). TensorRT-LLM's own decoder applies them (its penalties count the
prompt's tokens too). Refused with a 400: ``logprobs`` (the runner returns no
logits here), ``ignore_eos``, and any sampling for encoder-decoder LLMs (that path does not go through the proxy).
A greedy request passes nothing: exactly run.py's greedy decode.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from vlmforge.artifacts.engine_config import EngineConfig
from vlmforge.errors import DeployError, ToolchainUnavailable
from vlmforge.families import get_family
from vlmforge.runner.protocol import EngineKind, EngineLimits, Generation, TokenCallback
from vlmforge.runner.sampling import SamplingParams, UnsupportedSampling
from vlmforge.system.env import require_trtllm

TRTLLM_ROOT = os.environ.get("VLMFORGE_TRTLLM_ROOT", "/app/tensorrt_llm")
MULTIMODAL_EXAMPLES = "examples/models/core/multimodal"


def _run_py_args(argv: list[str]) -> argparse.Namespace:
    """Parse run.py's own arguments with the release's own parser (examples/.../multimodal/utils.py)."""
    examples = Path(TRTLLM_ROOT) / MULTIMODAL_EXAMPLES
    if not (examples / "utils.py").is_file():
        raise ToolchainUnavailable(f"TensorRT-LLM's multimodal examples are not at {examples} (set VLMFORGE_TRTLLM_ROOT)")
    sys.path.insert(0, str(examples))
    try:
        from utils import add_common_args  # type: ignore[import-not-found]  # the release's run.py helpers
    finally:
        sys.path.remove(str(examples))
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(argv)


class StreamingModel:
    """Stands in for the multimodal runner's LLM runner (``ModelRunnerCpp``) during one call.

    TensorRT-LLM's ``MultimodalModelRunner.generate`` asks its LLM runner for whole outputs
    (``return_dict=False``: output ids ``[batch, beams, max_seq_len]``, the prompt first, padded with the end
    id). This asks the same runner to stream instead (``streaming=True, return_dict=True,
    output_sequence_lengths=True``: every yield holds the sequences so far), hands each new token of beam 0
    to ``on_token(row, token)`` as it arrives, and returns what the whole call would have returned, so the
    rest of TensorRT-LLM's own code (decoding, stripping) runs unchanged (``on_token`` None: tokens are only
    collected). ``sampling``: keyword arguments that replace the multimodal runner's own (:func:`trtllm_sampling`).
    """

    def __init__(self, model: Any, on_token: Callable[[int, int], None] | None,
                 sampling: dict[str, Any] | None = None) -> None:
        self._model = model
        self._on_token = on_token
        self._sampling = dict(sampling or {})
        self.tokens: dict[int, list[int]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def generate(self, batch_input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", False)
        kwargs.pop("output_sequence_lengths", None)
        kwargs.pop("streaming", None)
        kwargs.update(self._sampling)
        emitted = [len(ids) for ids in batch_input_ids]  # what TensorRT-LLM takes as each row's input length
        last = None
        for outputs in self._model.generate(batch_input_ids, *args, streaming=True, return_dict=True,
                                            output_sequence_lengths=True, **kwargs):
            ids, lengths = outputs["output_ids"], outputs["sequence_lengths"]
            for row in range(ids.shape[0]):
                end = int(lengths[row][0])
                for token in ids[row, 0, emitted[row]:end].tolist():
                    self.tokens.setdefault(row, []).append(int(token))
                    if self._on_token is not None:
                        self._on_token(row, int(token))
                emitted[row] = max(emitted[row], end)
            last = outputs
        if last is None:
            raise RuntimeError("TensorRT-LLM's runner streamed nothing")
        return last if return_dict else last["output_ids"]


def trtllm_sampling(params: SamplingParams | None) -> dict[str, Any]:
    """The LLM runner's keyword arguments for ``params`` (names ``ModelRunnerCpp.generate`` accepts); nothing for a
    plain greedy request. ``top_k=0`` is "no top-k"; ``top_p`` is always sent for a sampled request (1.0: all tokens),
    since TensorRT-LLM reads ``top_k=0`` without a ``top_p`` as greedy."""
    if params is None:
        return {}
    out: dict[str, Any] = {}
    if not params.greedy:
        out.update(temperature=params.temperature, top_k=max(params.top_k, 0), top_p=params.top_p,
                   random_seed=params.seed)
    if params.repetition_penalty != 1.0:
        out["repetition_penalty"] = params.repetition_penalty
    if params.presence_penalty:
        out["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        out["frequency_penalty"] = params.frequency_penalty
    if params.min_tokens:
        out["min_tokens"] = params.min_tokens
    return out


def check_trtllm_sampling(params: SamplingParams, *, encoder_decoder: bool) -> None:
    """What this path cannot honour: :class:`UnsupportedSampling` naming the parameter."""
    if params.logprobs is not None:
        raise UnsupportedSampling("logprobs", "the TensorRT-LLM runner path returns no logprobs")
    if params.ignore_eos:
        raise UnsupportedSampling("ignore_eos", "the TensorRT-LLM runner path always stops at the end token")
    if encoder_decoder and trtllm_sampling(params):
        names = ("temperature", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens")
        name = next(n for n in names if getattr(params, n) != SamplingParams.model_fields[n].default)
        raise UnsupportedSampling(name, "the TensorRT-LLM runner path decodes encoder-decoder LLMs greedily only "
                                        "(leave it out)")


def run_multimodal(runner: Any, text: str, image: Any, max_new_tokens: int) -> Any:
    """``MultimodalModelRunner.run`` with either release's signature: 1.x added ``input_audio`` before
    ``max_new_tokens`` (``run(input_text, input_image, input_audio, max_new_tokens)``); 0.10 has
    ``run(input_text, input_image, max_new_tokens)``. Returns its output texts."""
    if "input_audio" in inspect.signature(runner.run).parameters:
        _, output = runner.run(text, image, None, max_new_tokens)
    else:
        _, output = runner.run(text, image, max_new_tokens)
    return output


class TrtllmEngine:
    """A TensorRT-LLM multimodal engine (engine_dir/{llm,vision}): a
    :class:`~vlmforge.runner.protocol.WholeRequestEngine`. TensorRT-LLM's multimodal runner takes whole requests (no
    shared batch with the server's scheduler); tokens stream through ``on_token`` while a request runs (decoder-only
    LLMs; encoder-decoder ones send the answer whole)."""

    kind: ClassVar[Literal[EngineKind.WHOLE_REQUEST]] = EngineKind.WHOLE_REQUEST
    image_cache: ClassVar[None] = None
    """None: TensorRT-LLM's runner encodes the images of the requests it takes itself."""
    renders_prompt: ClassVar[bool] = False
    """The server takes text for this engine as its family says (a Pix2Struct VQA checkpoint's questions reach
    TensorRT-LLM's runner only on the hf toolchain's runner so far: not run here, no TensorRT-LLM)."""

    def __init__(self, engine_dir: Path, *, hf_model_dir: Path | None = None) -> None:
        version = require_trtllm()
        self.dir = Path(engine_dir)
        self.config = EngineConfig.read(self.dir)
        if self.config.tensorrt_llm_version and self.config.tensorrt_llm_version != version:
            raise DeployError(f"{self.dir} was built with TensorRT-LLM {self.config.tensorrt_llm_version}, this container "
                              f"has {version}: rebuild the engine or use the matching container")
        import torch
        from tensorrt_llm.runtime import MultimodalModelRunner  # type: ignore[import-not-found]

        major, minor = torch.cuda.get_device_capability(0)
        if self.config.compute_capability and self.config.compute_capability != f"{major}.{minor}":
            raise DeployError(f"{self.dir} was built for compute capability {self.config.compute_capability}, this GPU "
                              f"is {major}.{minor}: TensorRT engines only run on the architecture they were built for")
        hf_dir = hf_model_dir or self.dir / self.config.processor
        args = _run_py_args(["--engine_dir", str(self.dir), "--hf_model_dir", str(hf_dir),
                             "--max_new_tokens", str(self.config.max_output_len)])
        self.runner = MultimodalModelRunner(args)
        self.tokenizer = self.runner.tokenizer
        self.family = get_family(self.config.family)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def limits(self) -> EngineLimits:
        """The engine's own ceilings (TensorRT engines are built for them); one image per request, whatever the
        engine was sized for: this path hands TensorRT-LLM's runner one image (several were never run here)."""
        return EngineLimits(max_batch_size=self.config.max_batch_size, max_input_len=self.config.max_input_len,
                            max_output_len=self.config.max_output_len, max_images_per_prompt=1)

    @property
    def compiled_decoder(self) -> Any:
        return None  # a TensorRT engine was built for its shapes: nothing to compile or tune

    @property
    def decode_path(self) -> str:
        return "tensorrt-llm"

    def warmup(self, batch_sizes: Sequence[int], prompt_length: int, max_new_tokens: int) -> None:
        """Nothing to compile: a TensorRT engine was built for its shapes."""

    def check_sampling(self, params: SamplingParams) -> None:
        check_trtllm_sampling(params, encoder_decoder=bool(self.family.encoder_decoder))

    def prompt_length(self, prompt: str | None, num_images: int = 1) -> int:
        """The user text's tokens and the image features (TensorRT-LLM adds its model's template around them and
        enforces the engine's max_input_len itself); one image per request on this path."""
        if num_images != 1:
            raise ValueError(f"the TensorRT-LLM runner path serves one image per request, got {num_images}")
        text = self.family.format_prompt(prompt) or ""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids) + self.config.num_visual_features

    def generate_many(self, images: Sequence[Any], prompts: Sequence[str | None], max_new_tokens: Sequence[int],
                      on_token: TokenCallback | None = None,
                      sampling: Sequence[SamplingParams | None] | None = None) -> list[Generation]:
        """Requests one after another through TensorRT-LLM's runner (every rank makes the same calls, seeds
        included); ``on_token(request_index, token)`` gets each token as it is made (rank 0)."""
        params = list(sampling) if sampling is not None else [None] * len(images)
        return [self.generate(image, prompt, limit,
                              on_token=None if on_token is None else (lambda _row, token, i=i: on_token(i, token)),
                              sampling=params[i])
                for i, (image, prompt, limit) in enumerate(zip(images, prompts, max_new_tokens))]

    def generate(self, image: Any, prompt: str | None, max_new_tokens: int,
                 on_token: Callable[[int, int], None] | None = None,
                 sampling: SamplingParams | None = None) -> Generation:
        import torch

        start = time.perf_counter()
        if sampling is not None:
            self.check_sampling(sampling)
        overrides = trtllm_sampling(sampling)
        streaming = (on_token is not None or bool(overrides)) and not self.family.encoder_decoder
        model = self.runner.model
        proxy = StreamingModel(model, on_token, overrides) if streaming else None
        if proxy is not None:
            self.runner.model = proxy
        try:
            output = run_multimodal(self.runner, prompt or "", [image], max_new_tokens)
        finally:
            self.runner.model = model
        elapsed = (time.perf_counter() - start) * 1000
        text = output[0][0] if isinstance(output, list) else str(output)
        if proxy is not None:
            tokens = proxy.tokens.get(0, [])
        else:
            tokens = self.tokenizer(text, add_special_tokens=False).input_ids
        return Generation(tokens=list(tokens), text=text, logits=torch.empty(0), vision_ms=0.0, llm_ms=elapsed)
