"""``vlmforge serve``: an OpenAI-compatible HTTP runner for one engine directory.

Rank 0 (the only rank without tensor parallelism) serves HTTP with FastAPI and uvicorn:

- ``POST /v1/chat/completions``: OpenAI chat format, one image per request or up to the engine's
  ``max_images_per_prompt`` (see :mod:`vlmforge.runner.openai_api`), plain or streamed (server-sent events);
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus).

With an API key (required when listening beyond loopback) every path but ``/health`` needs
``Authorization: Bearer KEY`` (:mod:`vlmforge.runner.access`). A request's text is capped before it is
tokenized, and tokenizing, image decoding and JSON parsing run bounded (docs/security.md).

Requests are batched by :class:`~vlmforge.runner.scheduler.Scheduler`. Under ``mpirun -n TP`` the
other ranks load their share of the LLM and follow rank 0 (:mod:`vlmforge.runner.distributed`).

SIGTERM (or SIGINT) on rank 0 drains: no new connections or requests, the running and queued ones
finish (up to ``drain_timeout_s``), then the other ranks are released and every rank exits 0. The
other ranks ignore SIGTERM (``mpirun`` forwards it to all) and exit when rank 0 tells them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, SecretStr
from starlette.concurrency import run_in_threadpool

from vlmforge.artifacts.engine_config import EngineConfig
from vlmforge.errors import DeployError
from vlmforge.runner import CompileMode, DecodeMode, InstanceId, answers
from vlmforge.runner.access import ApiKeyMiddleware, check_exposure, header_timeout_protocol
from vlmforge.runner.image_cache import DEFAULT_IMAGE_CACHE_MIB, MIB
from vlmforge.runner.loader import LoadOptions, load_engine
from vlmforge.runner.openai_api import (
    MAX_HEADER_CHARS,
    ApiError,
    Limits,
    TextStream,
    check_header_chars,
    check_prompt_chars,
    choices,
    completion_id,
    decode_json,
    load_image,
    max_new_tokens,
    parse_messages,
    parse_request,
    sampling_params,
    stop_strings,
)
from vlmforge.runner.protocol import EngineKind, ServingEngine
from vlmforge.runner.sampling import UnsupportedSampling
from vlmforge.runner.tune import WarmStart, WarmupPlan, compile_counters, load_tune

log = logging.getLogger(__name__)


class ServeSettings(BaseModel):
    """Everything ``vlmforge serve`` takes."""

    engine_dir: Path
    host: str = "127.0.0.1"
    """Address rank 0 listens on; beyond loopback an ``api_key`` is required."""
    port: int = 8000
    api_key: SecretStr | None = None
    """Clients send it as ``Authorization: Bearer KEY`` (every path but /health); empty: none."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A connection whose request headers are not complete this long after it opened (or after its previous
    response) is closed."""
    body_timeout_s: float = Field(default=60.0, gt=0)
    """A request body that has not fully arrived this long after its headers gets 408."""
    model_name: str | None = None
    """The model id clients send (default: the engine's name)."""
    max_batch_size: int | None = Field(default=None, ge=1)
    """Requests decoded together (default: the engine's max_batch_size)."""
    batch_wait_ms: float = Field(default=5.0, ge=0)
    """How long a batch waits for more requests after its first one."""
    inflight: bool = True
    """In-flight batching: requests join a running batch at its step boundaries (hf engines with a decoder-only LLM;
    TensorRT-LLM batches in its own executor). False: they wait for the running batch to end."""
    max_prefill_tokens: int | None = Field(default=None, ge=1)
    """In-flight batching: the most padded prompt positions (joiners x the longest one's length) prefilled together at
    one step boundary, while the running rows wait; requests beyond it join at the next boundary (a boundary's first
    joiner is taken whatever its length). None: no bound but max_batch_size (every joiner of a boundary in one
    forward: the least prefill time in total and the lowest time to first token; bound it to cap the stall a burst
    of long prompts puts between two tokens of the running requests)."""
    batched_joins: bool = True
    """In-flight batching: the requests joining at one step boundary are prefilled in one forward; False: one forward
    each, one after another (the behaviour before; for comparison)."""
    max_queue: int = Field(default=256, ge=1)
    """Requests waiting beyond this are refused with 429."""
    default_max_tokens: int | None = Field(default=None, ge=1)
    """max_tokens of a request that sends none (default: the engine's max_output_len)."""
    image_root: Path | None = None
    """file:// image URLs are read only under this directory (none: file URLs are refused)."""
    drain_timeout_s: float = Field(default=120.0, ge=0)
    warmup: bool = False
    """Compile the static decode path's batch buckets before reporting healthy (GPU)."""
    pid_file: Path | None = None
    """Rank 0 writes its process id here (what ``vlmforge undeploy`` signals to drain)."""
    instance_id: InstanceId | None = None
    """Reported on /health as ``instance`` (:data:`vlmforge.runner.InstanceId`)."""
    device: str | None = None
    decode: DecodeMode = DecodeMode.AUTO
    """auto (static cache + compiled step on a GPU), static or dynamic (see vlmforge.runner.static)."""
    compile_mode: CompileMode = CompileMode.MAX_AUTOTUNE
    """torch.compile mode of the static decode step: max-autotune-no-cudagraphs tunes the matrix-vector products
    (fastest decode; about a minute per batch bucket of a 7B model, cached by Inductor for later starts);
    default compiles in about half the time, decodes about 15% slower."""
    compile: bool | None = None
    """Compile the static decode step (default: on a GPU; on the CPU Inductor needs a C++ compiler)."""
    tune: bool = True
    """Before compiling, load the build's tune artifact that matches this machine (vlmforge tune), if any."""
    tune_store: str | None = None
    """The store to look for tune artifacts in (default: $VLMFORGE_STORE, else the default store); the engine directory
    names its build (it was pulled from a store)."""
    image_cache_mib: int = Field(default=DEFAULT_IMAGE_CACHE_MIB, ge=0)
    """Visual features of images seen before, kept on rank 0's host (vlmforge.runner.image_cache); 0: no cache."""
    limits: Limits = Field(default_factory=Limits)


class Runtime:
    """What the HTTP handlers share: the engine, its scheduler, metrics and the drain flag."""

    def __init__(self, engine: ServingEngine, settings: ServeSettings, *, channel: Any = None, tp: int = 1) -> None:
        from vlmforge.runner.metrics import Metrics
        from vlmforge.runner.scheduler import Scheduler

        self.engine = engine
        self.settings = settings
        self.config: EngineConfig = engine.config
        self.limits = engine.limits
        self.model = settings.model_name or self.config.name
        self.tp = tp
        self.created = int(time.time())
        batch = min(settings.max_batch_size or self.limits.max_batch_size, self.limits.max_batch_size)
        kv = (self.limits.max_input_len + self.limits.max_output_len) * batch  # KV positions, hf (incremental) only
        self.metrics = Metrics(self.model, str(settings.engine_dir), tp,
                               kv_capacity=kv if engine.kind is EngineKind.INCREMENTAL else 0)
        if engine.image_cache is not None:
            self.metrics.watch_image_cache(engine.image_cache.stats)
        self.default_max_tokens = min(settings.default_max_tokens or self.limits.max_output_len,
                                      self.limits.max_output_len)
        self.renders_prompt = engine.renders_prompt
        """The request's text is rendered into its image (Pix2Struct VQA), not fed to the LLM."""
        self.max_prompt_chars = (MAX_HEADER_CHARS if self.renders_prompt else
                                 self.limits.max_input_len * settings.limits.max_prompt_chars_per_token)
        self.start = WarmStart()
        plan = WarmupPlan.of(self.config.num_visual_features, batch=batch, max_new_tokens=self.default_max_tokens)
        self.compiled = engine.compiled_decoder is not None
        """Whether the decode step is compiled (a tune artifact can warm it; /health reports the start)."""
        self.scheduler = Scheduler(engine, max_batch_size=batch, max_queue=settings.max_queue,
                                   batch_wait_s=settings.batch_wait_ms / 1000, channel=channel, metrics=self.metrics,
                                   warmup=(lambda: self._prepare(plan)) if settings.warmup or self.compiled else None,
                                   inflight=settings.inflight, max_prefill_tokens=settings.max_prefill_tokens,
                                   batched_joins=settings.batched_joins)
        self.draining = False
        self.decode = engine.decode_path

    def _prepare(self, plan: WarmupPlan) -> None:
        """Before the first request: load a matching tune artifact (a compiled decode step only), then warm up."""
        settings, engine = self.settings, self.engine
        if self.compiled and settings.tune:
            self.start = load_tune(engine, settings.engine_dir, plan, settings.tune_store)
        if settings.warmup:
            started = time.perf_counter()
            engine.warmup(plan.sizes, plan.prompt_length, plan.max_new_tokens)
            self.start.warmup_seconds = round(time.perf_counter() - started, 3)
            self.metrics.warmup_seconds.set(self.start.warmup_seconds)
        if self.compiled:
            self.start.compile_cache = compile_counters()
            decoder = engine.compiled_decoder
            if decoder is not None:
                self.start.precompiled = [f"{batch}x{length}" for batch, length in decoder.precompiled]
        self.metrics.warm_start.set(int(self.start.warm))

    @property
    def takes_prompt(self) -> bool:
        """Requests may carry text: the LLM reads it, or the checkpoint renders it into the image."""
        return bool(self.engine.family.takes_prompt) or self.renders_prompt

    @property
    def llm_takes_prompt(self) -> bool:
        """The text goes into the LLM's prompt (counted against max_input_len)."""
        return bool(self.engine.family.takes_prompt)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "vlmforge",
                "engine": self.config.name, "family": self.config.family, "toolchain": self.config.toolchain,
                "tensor_parallel": self.tp, "max_batch_size": self.scheduler.max_batch_size,
                "max_input_len": self.limits.max_input_len, "max_output_len": self.limits.max_output_len,
                "max_images_per_prompt": self.limits.max_images_per_prompt}


def create_app(runtime: Runtime) -> FastAPI:
    """The FastAPI app over a loaded engine (the scheduler starts and stops with the app's lifespan)."""
    settings, metrics, scheduler = runtime.settings, runtime.metrics, runtime.scheduler
    limits = settings.limits

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        log.info("serving %s on http://%s:%d (tp %d, batches up to %d)", runtime.model, settings.host, settings.port,
                 runtime.tp, scheduler.max_batch_size)
        yield
        runtime.draining = True
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="vlmforge runner", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
    if api_key:
        def refused(path: str) -> None:
            if path == "/v1/chat/completions":
                metrics.requests.labels(status="401").inc()

        app.add_middleware(ApiKeyMiddleware, api_key=api_key, on_refused=refused)

    def refuse(exc: ApiError) -> JSONResponse:
        metrics.requests.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok", "model": runtime.model, "instance": runtime.settings.instance_id,
                "tensor_parallel": runtime.tp, "decode": runtime.decode,
                "warm_start": runtime.start.warm, "warmup_seconds": runtime.start.warmup_seconds,
                "start": runtime.start.model_dump(exclude={"warm", "warmup_seconds"}), "running": scheduler.running,
                "waiting": scheduler.waiting, "in_flight": scheduler.in_flight, "batches": scheduler.batches}
        if runtime.draining:
            return JSONResponse({**body, "status": "draining"}, status_code=503)
        if not scheduler.ready.is_set() and scheduler.alive:
            return JSONResponse({**body, "status": "warming up"}, status_code=503)
        if not scheduler.alive:
            return JSONResponse({**body, "status": "failed", "error": repr(scheduler.error)}, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [runtime.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != runtime.model:
            return refuse(ApiError(404, f"model {model_id!r} is not served here (this runner serves "
                                        f"{runtime.model!r})", param="model", code="model_not_found"))
        return JSONResponse(runtime.model_card())

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        from vlmforge.runner.scheduler import Draining, GenRequest, QueueFull

        arrived = time.perf_counter()
        try:
            body = await _read_body(request, limits.max_request_bytes, settings.body_timeout_s)
            chat = parse_request(decode_json(body, limits))
            if chat.model != runtime.model:
                raise ApiError(404, f"model {chat.model!r} is not served here (this runner serves {runtime.model!r})",
                               param="model", code="model_not_found")
            if runtime.draining:
                raise ApiError(503, "the runner is shutting down")
            parsed = parse_messages(chat.messages, takes_prompt=runtime.takes_prompt, model=runtime.model,
                                    max_images=runtime.limits.max_images_per_prompt)
            count = len(parsed.image_urls)
            limit = max_new_tokens(chat, max_output_len=runtime.limits.max_output_len,
                                   default=runtime.default_max_tokens)
            stops = stop_strings(chat, limits)
            sampling, n = sampling_params(chat, limit), choices(chat, limits)
            try:
                runtime.engine.check_sampling(sampling)
            except UnsupportedSampling as exc:
                raise ApiError(400, str(exc), param=exc.param) from None
            if runtime.renders_prompt:
                check_header_chars(parsed.text, runtime.max_prompt_chars)
            else:
                check_prompt_chars(parsed.text, runtime.max_prompt_chars, runtime.limits.max_input_len,
                                   limits.max_prompt_chars_per_token)
            try:  # off the event loop: /health and other requests go on meanwhile
                prompt_tokens = await run_in_threadpool(runtime.engine.prompt_length, parsed.text, count)
            except ValueError as exc:
                raise ApiError(400, f"messages: {exc}", param="messages") from None
            if runtime.llm_takes_prompt and prompt_tokens > runtime.limits.max_input_len:
                raise ApiError(400, f"the prompt takes {prompt_tokens} positions (text and {count} image"
                                    f"{'s' if count > 1 else ''}), over this engine's "
                                    f"max_input_len of {runtime.limits.max_input_len}", param="messages",
                               code="context_length_exceeded")
            images = [await run_in_threadpool(load_image, url, limits, settings.image_root) for url in parsed.image_urls]
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Any] = asyncio.Queue()
            gens = [GenRequest(images[0] if count == 1 else images, parsed.text, limit, prompt_tokens,
                               sink=lambda event, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, event)),
                               sampling=sampling.for_choice(i)) for i in range(n)]
            try:
                for gen in gens:  # n choices: n rows; all of them or none
                    scheduler.submit(gen)
            except (QueueFull, Draining) as exc:
                for gen in gens:
                    gen.cancel("cancelled")
                if isinstance(exc, Draining):
                    raise ApiError(503, "the runner is shutting down") from None
                raise ApiError(429, f"the runner is busy: {exc}; retry later") from None
        except ApiError as exc:
            return refuse(exc)
        tokenizer = runtime.engine.tokenizer
        rows = [answers.Choice(i, gen, TextStream(tokenizer, stops), [] if sampling.logprobs is not None else None)
                for i, gen in enumerate(gens)]

        def observe(status: int, first: float | None, tokens: int) -> None:
            _observe(runtime, gens[0], status, arrived, first, tokens)

        def prompt_used() -> int:  # the real count once a choice's prefix is made (the estimate may be an upper bound)
            return next((gen.prompt_positions for gen in gens if gen.prompt_positions is not None), prompt_tokens)

        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(answers.stream(rows, events, tokenizer, observe, completion_id(), runtime.model,
                                                    prompt_used, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        status, body = await answers.complete(rows, events, tokenizer, observe, completion_id(), runtime.model,
                                              prompt_used)
        return JSONResponse(body, status_code=status)

    return app


async def _read_body(request: Any, limit: int, timeout_s: float) -> bytearray:
    """The request body, up to ``limit`` bytes (413 beyond) and within ``timeout_s`` (408 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request is {declared} bytes, over the limit of {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise ApiError(413, f"the request is over the limit of {limit} bytes")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g}s") from None
    return body


def _observe(runtime: Runtime, gen: Any, status: int, arrived: float, first: float | None, tokens: int) -> None:
    queued = None if gen.started_at is None else gen.started_at - gen.enqueued_at
    runtime.metrics.observe_request(status, arrived=arrived, first=first, done=time.perf_counter(), tokens=tokens,
                                    prompt_tokens=gen.prompt_positions or gen.prompt_tokens, queued_s=queued)


# --- the process -----------------------------------------------------------------------------------


def _uvicorn_server(config: Any, runtime: Runtime) -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's graceful shutdown, marking the runtime as draining at the first signal, and ending with
        exit code 0 (uvicorn would re-raise the signal and the process would die of it)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not runtime.draining:
                log.info("%s: draining (%d running, %d waiting)", signal.Signals(sig).name,
                         runtime.scheduler.running, runtime.scheduler.waiting)
            runtime.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return DrainingServer(config)


def bind_listener(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound before the engine loads and before the ranks join: a taken port fails in a second,
    and nothing started later (gloo's ephemeral sockets, a compile worker) can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DeployError(f"cannot listen on {host}:{port}: {exc.strerror} (pass another --port)") from None
    return sock


def serve(settings: ServeSettings) -> int:
    """Run this rank of a runner until it is told to stop; returns the exit code."""
    import torch

    from vlmforge.runner.distributed import (
        RankInfo,
        cpu_threads_per_rank,
        ignore_termination,
        init_distributed,
        run_follower,
    )

    info = RankInfo.from_env()
    check_exposure(settings.host, settings.api_key.get_secret_value() if settings.api_key is not None else None)
    config = EngineConfig.read(settings.engine_dir)  # a clear error before anything heavy
    listener = bind_listener(settings.host, settings.port) if info.leader else None
    cuda = torch.cuda.is_available() and not (settings.device or "").startswith("cpu")
    if settings.device is None:
        settings = settings.model_copy(update={"device": f"cuda:{info.local_rank}" if cuda else "cpu"})
    channel = None
    if info.world_size > 1:
        if not info.leader:
            ignore_termination(info)
        channel = init_distributed(info, settings.device or "cpu")
        if not cuda:
            torch.set_num_threads(cpu_threads_per_rank(info))
    try:
        engine = load_engine(settings.engine_dir, LoadOptions(
            device=settings.device, decode=settings.decode, compile_mode=settings.compile_mode,
            max_batch_size=settings.max_batch_size, world_size=info.world_size, leader=info.leader,
            image_cache_bytes=settings.image_cache_mib * MIB, compile=settings.compile))
        if not info.leader:
            run_follower(engine, channel)
            return 0
        runtime = Runtime(engine, settings, channel=channel, tp=info.world_size)
        assert listener is not None
        _run_http(runtime, config, listener)
        return 0
    finally:
        if listener is not None:
            listener.close()
        if channel is not None:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _run_http(runtime: Runtime, config: EngineConfig, listener: socket.socket) -> None:
    import uvicorn

    settings = runtime.settings
    app = create_app(runtime)
    server = _uvicorn_server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                            access_log=False, timeout_graceful_shutdown=int(settings.drain_timeout_s),
                                            http=header_timeout_protocol(settings.header_timeout_s),
                                            lifespan="on"), runtime)
    if settings.pid_file:
        settings.pid_file.parent.mkdir(parents=True, exist_ok=True)
        settings.pid_file.write_text(f"{os.getpid()}\n")
    try:
        server.run(sockets=[listener])
    finally:
        if settings.pid_file:
            with contextlib.suppress(OSError):
                settings.pid_file.unlink()
    if not server.started:
        raise DeployError(f"the runner could not start on {settings.host}:{settings.port} (see the log above)")
    log.info("runner for %s stopped", config.name)
