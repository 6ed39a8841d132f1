"""The hf engine runner: ONNX Runtime for the visual engine, transformers for the LLM.

Build validation and deployments both go through :class:`HfEngine`, so a validated engine is
exactly what is served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from vlmforge.artifacts.engine_config import EngineConfig
from vlmforge.errors import DeployError, ToolchainUnavailable
from vlmforge.families import get_family
from vlmforge.runner.protocol import EngineKind, EngineLimits, Generation

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from vlmforge.families.contract import VisualInputs
    from vlmforge.modeling.generation import LlmPrefix
    from vlmforge.runner.batching import GreedyBatch, StepSource, StepSync
    from vlmforge.runner.image_cache import ImageCache
    from vlmforge.runner.sampling import SamplingParams

log = logging.getLogger(__name__)


class HfEngine:
    """A loaded hf-toolchain engine (an :class:`~vlmforge.runner.protocol.IncrementalEngine`).

    ``tp_plan``: load the LLM with transformers' tensor-parallel plan over the initialised
    ``torch.distributed`` world (one rank per process; see :mod:`vlmforge.runner.distributed`).
    ``load_vision``: False on follower ranks, which get the features from rank 0.
    """

    kind: ClassVar[Literal[EngineKind.INCREMENTAL]] = EngineKind.INCREMENTAL

    def __init__(self, engine_dir: Path, *, device: str | None = None, tp_plan: bool = False,
                 load_vision: bool = True, decode: str = "auto", max_batch_size: int | None = None,
                 compile_mode: str = "max-autotune-no-cudagraphs", image_cache_bytes: int = 0,
                 compile: bool | None = None) -> None:
        import torch

        self.dir = Path(engine_dir)
        self.config = EngineConfig.read(self.dir)
        if self.config.toolchain != "hf":
            raise ToolchainUnavailable(
                f"{self.dir} holds a {self.config.toolchain} engine; it needs TensorRT-LLM's runner (vlmforge serve "
                "inside NVIDIA's TensorRT-LLM container)"
            )
        self.family = get_family(self.config.family)
        self.max_batch_size = max_batch_size or self.config.max_batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = self.family.load_processor(self.dir / self.config.processor)
        self.renders_prompt = self.family.image_header(self.processor, None) is not None
        """The checkpoint renders each request's text into its images (Pix2Struct VQA): images are encoded with their
        requests' prompts (:meth:`encode_images`), and the server takes text for it."""
        self.vision = None
        self.visual_extras: dict[str, torch.Tensor] = {}
        self.image_cache: ImageCache | None = None
        if load_vision:
            self._load_vision()
            if image_cache_bytes > 0:
                from vlmforge.runner.image_cache import ImageCache

                namespace = f"{self.dir.resolve()}|{self.config.family}|{self.config.visual.model_dump_json()}"
                self.image_cache = ImageCache(image_cache_bytes, namespace=namespace)
        llm_dir = self.dir / self.config.llm.path
        from vlmforge.modeling.devices import torch_dtype

        dtype = torch_dtype(self.config.llm.dtype)
        if tp_plan:
            self.tp = check_tensor_parallel(self.dir, self.config)
        else:
            self.tp = 1
        if self.config.llm.format in ("lowbit", "modelopt", "quanto"):
            self.llm = load_quantized_llm(self.config, self.family.llm_class(), llm_dir, dtype, self.device)
        else:
            kwargs: dict[str, Any] = {"dtype": dtype}
            if tp_plan:
                kwargs.update(tensor_parallel_kwargs(self.tp))
            self.llm = self.family.llm_class().from_pretrained(llm_dir, **kwargs).eval()
            if tp_plan:
                check_sharded(self.llm, self.config.name, self.tp)
            else:
                self.llm = self.llm.to(self.device)
        tokenizer = self.processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.static = self._static_decoder(decode, self.max_batch_size, compile_mode,
                                           self.device.startswith("cuda") if compile is None else compile)
        log.info("loaded %s engine %s on %s (tp %d, %s decoding)", self.config.family, self.dir, self.device, self.tp,
                 "static-cache compiled" if self.static is not None else "dynamic-cache eager")

    def _static_decoder(self, decode: str, max_batch_size: int, compile_mode: str, compile: bool) -> Any:
        """The static-cache, compiled decode path (:mod:`vlmforge.runner.static`) where it applies: ``auto`` takes it
        for a float decoder-only LLM on a GPU without tensor parallelism or sliding-window layers (Gemma3's: the static
        cache and its joins keep no window offsets, nor a bidirectional prefill mask); ``static`` insists; ``dynamic``
        never.
        ``compile``: compile its step (default: on a GPU; Inductor also compiles for the CPU, with a C++ compiler)."""
        if decode not in ("auto", "static", "dynamic"):
            raise DeployError(f"unknown decode mode {decode!r}: auto, static or dynamic")
        from vlmforge.runner.static import CROSS_REFUSAL, STATIC_REFUSAL, StaticDecoder
        from vlmforge.specs.visual import VisualPlacement

        sliding = "sliding_attention" in (getattr(self.llm.config, "layer_types", None) or ())
        fits = not self.family.encoder_decoder and self.config.llm.format in ("safetensors", "lowbit") and self.tp == 1
        fits = fits and self.family.position_id_dims == 1  # its buckets keep one position per row and column
        cross = self.family.visual_placement is VisualPlacement.CROSS_ATTENTION  # mllama: cross-attention states
        if decode == "dynamic" or decode == "auto" and not (fits and not sliding and not cross
                                                            and self.device.startswith("cuda")):
            return None
        if not fits:
            raise DeployError(f"{self.config.name}: the static decode path needs a float or low-bit decoder-only LLM "
                              "with one-axis positions (not M-RoPE) and without tensor parallelism; use --decode "
                              "dynamic")
        if sliding:
            raise DeployError(f"{self.config.name}: {STATIC_REFUSAL}")
        if cross:
            raise DeployError(f"{self.config.name}: {CROSS_REFUSAL}")

        limit = self.config.max_input_len + self.config.max_output_len
        return StaticDecoder(self.llm, max_batch_size=max_batch_size,
                             max_length=min(limit, int(getattr(self.llm.config, "max_position_embeddings", limit))),
                             compile=compile, mode=compile_mode)

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(max_batch_size=self.max_batch_size, max_input_len=self.config.max_input_len,
                            max_output_len=self.config.max_output_len,
                            max_images_per_prompt=self.config.max_images_per_prompt)

    @property
    def compiled_decoder(self) -> Any:
        return self.static if self.static is not None and self.static.compile else None

    @property
    def decode_path(self) -> str:
        return "static" if self.static is not None else "dynamic"

    def warmup(self, batch_sizes: Sequence[int], prompt_length: int, max_new_tokens: int) -> None:
        """Compile (and capture) the static decode path's buckets for these shapes; nothing on the dynamic path."""
        if self.static is not None:
            self.static.warmup(batch_sizes, prompt_length, max_new_tokens)

    def _load_vision(self) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        path = self.dir / self.config.visual.path
        self.vision = ort.InferenceSession(str(path), providers=providers)
        self.vision_input = self.vision.get_inputs()[0].name
        self.visual_extras = self.family.load_visual_extras(path.parent)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def headers(self, images: Sequence[Image.Image], prompts: Sequence[str | None] | None) -> list[str] | None:
        """The text rendered into each image (its request's prompt: ``prompts`` holds one per image), or None where
        the checkpoint renders none (:attr:`renders_prompt`)."""
        if not self.renders_prompt:
            return None
        texts = list(prompts) if prompts is not None else [None] * len(images)
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} prompts")
        return [self.family.image_header(self.processor, text) or "" for text in texts]

    def _inputs(self, images: Sequence[Image.Image], headers: Sequence[str] | None = None,
                images_in_prompt: Sequence[int] | None = None) -> VisualInputs:
        """The visual engine's inputs for the images (float32, CPU): the family's preprocessing, each image taking one
        entry or (anyres families) one per tile; ``headers``: the text each image is rendered with (:meth:`headers`);
        ``images_in_prompt[i]``: the images of image i's prompt (None: 1 each; LLaVA-OneVision preprocesses an image
        among several otherwise than one alone)."""
        if self.vision is None:
            raise DeployError("this engine was loaded without its visual engine (a follower rank)")
        inputs = (self.family.prompt_visual_inputs(self.processor, list(images), images_in_prompt) if headers is None
                  else self.family.headed_visual_inputs(self.processor, list(images), headers))
        inputs.pixels = inputs.pixels.float().cpu()
        return inputs

    def _run_vision(self, inputs: VisualInputs) -> torch.Tensor:
        """Visual-engine outputs [T, N, hidden] on the CPU, from pixels in chunks of the visual engine's batch (or the
        family's own feeds, for an engine of several inputs)."""
        import torch

        assert self.vision is not None, "_inputs refuses an engine without its visual engine first"
        chunk = self.config.visual.max_batch_size
        feeds = self.family.visual_engine_feeds(inputs, chunk, self.visual_extras)
        if feeds is not None:
            return torch.cat([torch.from_numpy(self.vision.run(None, {name: value.numpy()
                                                                      for name, value in feed.items()})[0])
                              for feed in feeds])
        return torch.cat([torch.from_numpy(self.vision.run(None, {self.vision_input: part.numpy()})[0])
                          for part in inputs.pixels.split(chunk)])

    def _encode(self, inputs: VisualInputs) -> list[torch.Tensor]:
        """Each image's visual features [1, N, hidden] (CPU): the visual engine on every input, then the family's
        packing of each image's outputs (anyres: unpadding and newline embeddings)."""
        outputs = inputs.split_outputs(self._run_vision(inputs))
        return [self.family.pack_visual_features(self.processor, part, size, self.visual_extras)
                for part, size in zip(outputs, inputs.image_sizes, strict=True)]

    def _features(self, images: Sequence[Image.Image], headers: Sequence[str] | None = None,
                  images_in_prompt: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Each image's visual features [1, N, hidden] (float32, on the LLM's device)."""
        return [features.to(self.device) for features in self._encode(self._inputs(images, headers, images_in_prompt))]

    def encode_images(self, images: Sequence[Image.Image], prompts: Sequence[str | None] | None = None, *,
                      images_in_prompt: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Each image's visual features [1, N, hidden] (float32, on the LLM's device); with an image cache, images
        seen before skip the visual engine (:mod:`vlmforge.runner.image_cache`). ``prompts``: each image's request's
        text, rendered into it where the checkpoint does (:attr:`renders_prompt`; ignored otherwise); the cache
        keys such an image on its header too (the same image with another question is another entry).
        ``images_in_prompt``: as :meth:`_inputs` (the cache keys the preprocessed pixels, so an image tiled otherwise
        is another entry)."""
        import torch

        headers = self.headers(images, prompts)
        if self.image_cache is None:
            return self._features(images, headers, images_in_prompt)
        inputs = self._inputs(images, headers, images_in_prompt)
        # the key holds the image's size beside its pixels: anyres unpadding depends on it
        keys = [torch.cat([pixels.flatten(), torch.tensor(size, dtype=pixels.dtype)])
                for pixels, size in zip(inputs.split(inputs.pixels), inputs.image_sizes, strict=True)]

        def encode(indices: list[int]) -> list[torch.Tensor]:
            return self._encode(inputs.select(indices))

        tags = None if headers is None else [b"header:" + header.encode() for header in headers]
        host = self.image_cache.encode(keys, encode, tags=tags)
        return [features.to(self.device, copy=True) for features in host]  # the cache keeps its own entries intact

    def llm_prefix(self, features: torch.Tensor | Sequence[torch.Tensor], prompt: str | None) -> LlmPrefix:
        """One request's prefix from its features: one tensor, or one per image in order."""
        moved = ([f.to(self.device) for f in features] if isinstance(features, (list, tuple))
                 else features.to(self.device))
        return self.family.llm_prefix(self.llm, self.processor, moved, prompt)

    def check_sampling(self, params: SamplingParams) -> None:
        """Every sampling parameter is honoured here (:mod:`vlmforge.runner.sampling`)."""

    def new_batch(self, prefixes: Sequence[LlmPrefix], max_new_tokens: Sequence[int], *,
                  sync: StepSync | None = None, keep_logits: bool = False,
                  sampling: Sequence[SamplingParams | None] | None = None) -> GreedyBatch:
        from vlmforge.runner.batching import GreedyBatch

        return GreedyBatch(self.llm, prefixes, max_new_tokens, keep_logits=keep_logits, sync=sync,
                           pad_token_id=self.pad_token_id,
                           factory=self.static.batch if self.static is not None else None, sampling=sampling)

    def follow_batch(self, prefixes: Sequence[LlmPrefix], source: StepSource) -> int:
        from vlmforge.runner.batching import follow_batch

        return follow_batch(self.llm, prefixes, source)

    def prompt_length(self, prompt: str | None, num_images: int = 1) -> int:
        """Prompt positions (text tokens and image features) the LLM will be fed for ``num_images`` images;
        ValueError for a bad prompt."""
        count = self.config.num_visual_features
        return self.family.prompt_length(self.processor, prompt, count if num_images == 1 else [count] * num_images)

    def generate(self, image: Image.Image | Sequence[Image.Image], prompt: str | None,
                 max_new_tokens: int) -> Generation:
        """Greedy generation for one request (its image, or its images in order) and prompt through the unbatched
        loop (``family.generate``): what build validation compares with the reference, and what batched decoding
        must equal."""
        import torch

        several = isinstance(image, (list, tuple))
        images = list(image) if several else [image]
        start = time.perf_counter()
        encoded = self._features(images, self.headers(images, [prompt] * len(images)), [len(images)] * len(images))
        features = encoded if several else encoded[0]
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        vision_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        result = self.family.generate(self.llm, self.processor, features,
                                      self.family.format_prompt(prompt, len(images)), max_new_tokens)
        llm_ms = (time.perf_counter() - start) * 1000
        text = self.processor.tokenizer.decode(result.tokens, skip_special_tokens=True)
        return Generation(tokens=list(result.tokens), text=text, logits=result.logits, vision_ms=vision_ms, llm_ms=llm_ms)

    def generate_batch(self, images: Sequence[Image.Image | Sequence[Image.Image]], prompts: Sequence[str | None],
                       max_new_tokens: int | Sequence[int], *, keep_logits: bool = False) -> list[Generation]:
        """Greedy generation for many requests at once (one LLM forward per step for all of them), through the
        runner's own sequence (:mod:`vlmforge.runner.jobs`); a request's entry in ``images`` is its image or a list of
        its images."""
        from vlmforge.runner.jobs import encode_job, lead_batch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        limits = [max_new_tokens] * len(images) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        job = encode_job(self, images, prompts, limits)
        start = time.perf_counter()
        batch = lead_batch(self, job, keep_logits=keep_logits)
        for _ in batch:
            pass
        llm_ms = (time.perf_counter() - start) * 1000
        return [Generation(tokens=r.tokens, text=self.tokenizer.decode(r.tokens, skip_special_tokens=True),
                           logits=r.logits, vision_ms=job.vision_ms, llm_ms=llm_ms) for r in batch.results()]


def load_quantized_llm(config: EngineConfig, llm_cls: type, llm_dir: Path, dtype: Any, device: str) -> Any:
    """A quantized hf engine's LLM: low-bit weights on torch's int8/int4 kernels, or ModelOpt's fake-quant LLM."""
    if config.llm.format == "lowbit":
        from vlmforge.modeling.quantized import load_quantized, lowbit_kernels

        llm = load_quantized(llm_cls, llm_dir, dtype=dtype, device=device)
        log.info("%s: low-bit LLM on %s", config.name, lowbit_kernels(llm))
        return llm
    if config.llm.format == "modelopt":
        from vlmforge.modeling.modelopt import load_fake_quant

        return load_fake_quant(llm_cls, llm_dir, dtype=dtype, device=device)
    raise DeployError(f"{config.name}: an optimum-quanto engine of an earlier vlmforge; this one serves int8/int4 on "
                      "torch's low-bit kernels instead: rebuild the engine")


def tensor_parallel_kwargs(world: int) -> dict[str, Any]:
    """``from_pretrained`` arguments for transformers' own tensor-parallel plan over ``world`` ranks:
    ``distributed_config`` where transformers has it (>= 5.17), the older ``tp_plan`` argument otherwise."""
    try:
        from transformers import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=world)}
    except (ImportError, TypeError):
        return {"tp_plan": "auto"}


def check_sharded(llm: Any, name: str, world: int) -> None:
    """Refuses an LLM that transformers' plan left whole on every rank: each rank would hold (and compute) all of it
    while the deployment claims TP ``world``."""
    if not any(hasattr(parameter, "to_local") for parameter in llm.parameters()):
        raise DeployError(f"{name}: transformers' tensor-parallel plan split none of {type(llm).__name__}'s weights "
                          f"over {world} ranks (its layers' module names do not match the plan): serve it with --tp 1")


def check_tensor_parallel(engine_dir: Path, config: EngineConfig) -> int:
    """The world size this process's LLM will be split over; refuses an LLM that cannot be split that way."""
    import json

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise DeployError("tensor parallelism needs torch.distributed initialised first (vlmforge serve under mpirun "
                          "does it)")
    world = dist.get_world_size()
    llm_config = json.loads((Path(engine_dir) / config.llm.path / "config.json").read_text())
    if config.llm.format != "safetensors":
        raise DeployError(f"{engine_dir}: a {config.llm.format} LLM cannot be split with tensor parallelism; "
                          "serve it with --tp 1")
    from transformers import AutoConfig

    auto = AutoConfig.from_pretrained(Path(engine_dir) / config.llm.path)
    plan = getattr(auto, "base_model_tp_plan", None)
    if not plan:
        raise DeployError(f"{config.llm.architecture} has no tensor-parallel plan in transformers: serve "
                          f"{config.name} with --tp 1")
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = llm_config.get(key)
        if heads is not None and heads % world:
            raise DeployError(f"{config.name}: {key} = {heads} is not divisible by the tensor-parallel size {world}")
    return world
