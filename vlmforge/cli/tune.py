"""CLI: `tune` (store a build's compile caches for this machine, so runners here start warm)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from vlmforge.cli.app import app, console, print_json
from vlmforge.runner import CompileMode, DecodeMode


@app.command("tune")
def tune_cmd(
    target: Annotated[str, typer.Argument(help="MODEL, MODEL@ALIAS, MODEL#BUILD_ID, or an engine directory pulled from the store.")],
    store: Annotated[str | None, typer.Option("--store", help="Artifact store URL (default: $VLMFORGE_STORE).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: the GPU, else the CPU).")] = None,
    decode: Annotated[DecodeMode, typer.Option(help="The decode path the runner will take (vlmforge serve --decode).")] = DecodeMode.AUTO,
    compile_mode: Annotated[CompileMode, typer.Option(help="torch.compile mode the runner will use (vlmforge serve --compile-mode).")] = CompileMode.MAX_AUTOTUNE,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", show_default=False, help="Compile the static decode step (default: on a GPU; the CPU needs --compile and --decode static).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="The runner's --max-batch-size (default: the engine's): its batch buckets are tuned.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="The runner's --max-tokens (default: the engine's max_output_len).")] = None,
    precompile: Annotated[bool, typer.Option("--precompile/--no-precompile", help="Also store each bucket's decode step compiled ahead of time: a matching runner loads it without tracing the model (torch's precompile API; see docs/serving.md).")] = False,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where a store build is pulled (default: deploy's cache, $VLMFORGE_CACHE/engines).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Warm up a build's static decode buckets here, as `serve --warmup` would, and store torch's compile caches
    beside the build (keyed by GPU, torch and Triton versions, compile mode and buckets): `serve` and `deploy` on a
    matching machine load them and start warm. The build's manifest and fingerprint are not changed."""
    from vlmforge.deploy.tune import TuneOptions, tune

    if "VLMFORGE_LOG_LEVEL" not in os.environ:  # the warm-up takes minutes on a GPU: say what it is doing
        logging.getLogger("vlmforge").setLevel(logging.INFO)
    outcome = tune(target, store_url=store, cache_dir=cache_dir, options=TuneOptions(
        device=device, decode=decode, compile_mode=compile_mode, compile=compile, max_batch_size=max_batch_size,
        max_tokens=max_tokens, precompile=precompile))
    if as_json:
        print_json(outcome.model_dump(mode="json"))
        return
    record, key = outcome.record, outcome.record.key
    console.print(f"[bold green]tuned[/] {outcome.ref} for {key.device} ({key.capability}), torch {key.torch}, triton "
                  f"{key.triton or 'none'}, {key.compile_mode}: buckets {[list(b) for b in key.buckets]}, warm-up "
                  f"{record.warmup_seconds:.1f}s, {record.size / 2**20:.1f} MiB"
                  + (f" with {record.artifacts['precompiled_step']} precompiled steps" if "precompiled_step" in
                     record.artifacts else "") + f" stored in {outcome.store}",
                  highlight=False)
