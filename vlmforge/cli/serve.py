"""CLI: `serve` (one rank of a runner for an engine directory; under mpirun, one per rank)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from vlmforge.cli.app import app
from vlmforge.runner import CompileMode, DecodeMode
from vlmforge.runner.access import API_KEY_ENV
from vlmforge.runner.image_cache import DEFAULT_IMAGE_CACHE_MIB

DEFAULT_PORT = int(os.environ.get("VLMFORGE_PORT", "8000"))


def _logging(rank: int) -> None:
    """INFO from vlmforge (unless VLMFORGE_LOG_LEVEL says otherwise), each line naming its rank."""
    level = os.environ.get("VLMFORGE_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("vlmforge")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


@app.command("serve")
def serve_cmd(
    engine_dir: Annotated[Path, typer.Argument(help="Engine directory (with engine.json).", envvar="VLMFORGE_ENGINE_DIR",
                                               show_envvar=True)],
    host: Annotated[str, typer.Option(help="Address rank 0 listens on (beyond loopback, an API key is required).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port rank 0 listens on ($VLMFORGE_PORT).")] = DEFAULT_PORT,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar=API_KEY_ENV, show_envvar=True, show_default=False,
                                                help="Clients must send 'Authorization: Bearer KEY' (all but /health). Prefer the environment variable: arguments are visible to other users of the machine.")] = None,
    header_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a connection may take to send a request's headers before it is closed.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request body may take to arrive (408 beyond).")] = 60.0,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Model id clients send (default: the engine's name).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="Requests decoded together (default: the engine's).")] = None,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits for more requests.")] = 5.0,
    inflight: Annotated[bool, typer.Option("--inflight/--no-inflight", help="In-flight batching: requests join a running batch at its step boundaries (hf engines, decoder-only LLMs); --no-inflight: they wait for the running batch to end.")] = True,
    max_prefill_tokens: Annotated[int | None, typer.Option(min=1, help="In-flight batching: the most padded prompt positions (joiners x the longest) prefilled together at one step boundary; more join at the next one (default: no bound but --max-batch-size).")] = None,
    batched_joins: Annotated[bool, typer.Option("--batched-joins/--single-joins", help="In-flight batching: a step boundary's joiners are prefilled in one forward; --single-joins: one forward each (the behaviour before, for comparison).")] = True,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests beyond this get 429.")] = 256,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="max_tokens of requests that send none (default: the engine's max_output_len).")] = None,
    image_root: Annotated[Path | None, typer.Option(help="Serve file:// image URLs from under this directory (off by default).")] = None,
    max_image_bytes: Annotated[int, typer.Option(min=1, help="Largest image file (413 beyond).")] = 20 * 1024 * 1024,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest image, width x height (413 beyond).")] = 4096 * 4096,
    max_request_bytes: Annotated[int, typer.Option(min=1, help="Largest request body (413 beyond).")] = 32 * 1024 * 1024,
    drain_timeout: Annotated[float, typer.Option(min=0, help="Seconds SIGTERM waits for running requests.")] = 120.0,
    pid_file: Annotated[Path | None, typer.Option(help="Rank 0 writes its pid here (signal it to drain).")] = None,
    instance_id: Annotated[str | None, typer.Option(help="Reported on /health as 'instance' (vlmforge deploy passes a fresh one, to know the healthy answer is from the runner it started).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: this rank's GPU, else the CPU).")] = None,
    decode: Annotated[DecodeMode, typer.Option(help="auto (a static KV cache and a compiled decode step on a GPU), static or dynamic.")] = DecodeMode.AUTO,
    warmup: Annotated[bool, typer.Option("--warmup", help="Compile the static decode path's batch sizes before reporting healthy.")] = False,
    image_cache_mib: Annotated[int, typer.Option(min=0, help="MiB of host memory (rank 0) for the visual features of images seen before: a repeated image skips the visual engine. 0: no cache. hf engines only.")] = DEFAULT_IMAGE_CACHE_MIB,
    compile_mode: Annotated[CompileMode, typer.Option(help="torch.compile mode of the static decode step: max-autotune-no-cudagraphs or default (quicker to compile, slower).")] = CompileMode.MAX_AUTOTUNE,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", show_default=False, help="Compile the static decode step (default: on a GPU; on the CPU Inductor needs a C++ compiler).")] = None,
    tune: Annotated[bool, typer.Option("--tune/--no-tune", help="Before compiling, load the build's tune artifact that matches this machine (`vlmforge tune`); any mismatch: a warning and a cold compile.")] = True,
    tune_store: Annotated[str | None, typer.Option("--tune-store", help="Store holding the build's tune artifacts (default: $VLMFORGE_STORE, else the default store). The engine directory must have been pulled from a store.")] = None,
) -> None:
    """Serve an engine with an OpenAI-compatible API (rank 0); under `mpirun -n TP`, the other ranks hold their
    share of the LLM and follow rank 0. SIGTERM to rank 0 drains and stops every rank."""
    from vlmforge.runner.distributed import RankInfo
    from vlmforge.runner.openai_api import Limits
    from vlmforge.runner.server import ServeSettings, serve

    _logging(RankInfo.from_env().rank)
    settings = ServeSettings(
        engine_dir=engine_dir, host=host, port=port, api_key=api_key or None, header_timeout_s=header_timeout,
        body_timeout_s=body_timeout, model_name=model_name, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, inflight=inflight, max_prefill_tokens=max_prefill_tokens,
        batched_joins=batched_joins, max_queue=max_queue, default_max_tokens=max_tokens, image_root=image_root,
        drain_timeout_s=drain_timeout, pid_file=pid_file, instance_id=instance_id, device=device, decode=decode, warmup=warmup, compile_mode=compile_mode,
        image_cache_mib=image_cache_mib, compile=compile, tune=tune, tune_store=tune_store,
        limits=Limits(max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                      max_request_bytes=max_request_bytes),
    )
    code = serve(settings)
    if code:
        raise typer.Exit(code)
