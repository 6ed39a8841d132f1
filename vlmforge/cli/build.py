"""CLI: `build` (runs the Prefect build flow), `fetch` (one verified source download), `selftest`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlmforge.cli.app import app, console, print_json
from vlmforge.cli.flows import load_flow, quiet_prefect
from vlmforge.cli.specs import (
    BatchOpt,
    DialectOpt,
    DtypeOpt,
    InputOpt,
    JsonOpt,
    OutputOpt,
    PpOpt,
    QuantOpt,
    TpOpt,
    VisualBatchOpt,
    spec_overrides,
)
from vlmforge.families import resolve
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.specs.schema import Toolchain

StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Artifact store URL (default: $VLMFORGE_STORE or a local dir).")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", help="Work dir for stage outputs (default: $VLMFORGE_WORKDIR).")]


def preflight(model: str, toolchain: Toolchain, overrides: dict) -> None:
    """Everything that can be refused before Prefect starts: the spec, the rules, the toolchain."""
    resolved = resolve(load_model_or_spec(model, overrides))
    if toolchain is Toolchain.HF:
        from vlmforge.toolchains.hf.stages import check_supported

        check_supported(resolved)
    else:
        from vlmforge.build.trtllm_pipeline import check_trtllm_buildable
        from vlmforge.system.env import require_trtllm

        check_trtllm_buildable(resolved)
        require_trtllm()


@app.command("build")
def build_cmd(
    model: Annotated[str, typer.Argument(help="Catalog model name or spec YAML path.")],
    toolchain: Annotated[Toolchain, typer.Option(help="hf (torch+transformers, anywhere) or trtllm (NVIDIA's container).")] = Toolchain.HF,
    store: StoreOpt = None, workdir: WorkdirOpt = None,
    dialect: DialectOpt = None, tp: TpOpt = None, pp: PpOpt = None, dtype: DtypeOpt = None, quant: QuantOpt = None,
    max_batch_size: BatchOpt = None, max_input_len: InputOpt = None, max_output_len: OutputOpt = None,
    visual_batch_size: VisualBatchOpt = None,
    alias: Annotated[Optional[list[str]], typer.Option("--alias", help="Aliases to move after validation (default: latest).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build, validate and publish an engine through the Prefect flow (a temporary local Prefect server unless
    PREFECT_API_URL is set)."""
    overrides = spec_overrides(tp=tp, pp=pp, dtype=dtype, quant=quant, max_batch_size=max_batch_size,
                               max_input_len=max_input_len, max_output_len=max_output_len,
                               visual_batch_size=visual_batch_size, dialect=dialect)
    preflight(model, toolchain, overrides)
    quiet_prefect()
    build_engine = load_flow("build-engine")

    summary = build_engine(model=model, toolchain=toolchain.value, store=store,
                           workdir=str(workdir) if workdir else None, overrides=overrides, aliases=alias)
    if as_json:
        print_json(summary)
        return
    validation = summary["validation"]
    console.print(f"\n[bold green]engine[/] {summary['model']}#{summary['build_id']}", highlight=False)
    console.print(f"stored in {summary['store']}" + ("" if summary["created"] else " (already there: nothing uploaded)"),
                  highlight=False)
    console.print(f"validation: token agreement {validation['token_agreement']}, max logit error "
                  f"{_figure(validation['max_logit_error'])}, vision {_figure(validation['vision_ms'], ' ms')}, LLM "
                  f"{_figure(validation['llm_ms'], ' ms')}, end-to-end {_figure(validation['e2e_ms'], ' ms')}",
                  highlight=False)


def _figure(value: float | None, unit: str = "") -> str:
    """A validation figure, or what a toolchain could not measure (TensorRT-LLM's runner: logits, stage times)."""
    return "not measured" if value is None else f"{value}{unit}"


@app.command("fetch")
def fetch_cmd(
    source: Annotated[str, typer.Argument(help="hf://org/repo@rev, s3://bucket/prefix, file:///path or tiny://FAMILY")],
    dest: Annotated[Path, typer.Argument(help="Empty or new directory to download into.")],
    as_json: JsonOpt = False,
) -> None:
    """Download a checkpoint, verify it, and print its exact revision (the trtllm plan's first step)."""
    from vlmforge.errors import SourceError
    from vlmforge.sources import open_source

    if dest.exists() and any(dest.iterdir()):
        raise SourceError(f"{dest} is not empty: fetch writes into a new or empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    fetched = open_source(source).fetch(dest)
    if as_json:
        print_json(fetched.model_dump(mode="json"))
    else:
        console.print(f"{source} at {fetched.revision}: {len(fetched.files)} files verified in {dest}", highlight=False)


@app.command("selftest")
def selftest_cmd(
    toolchain: Annotated[Toolchain, typer.Option(help="The toolchain to prove (trtllm: inside NVIDIA's container).")] = Toolchain.TRTLLM,
    workdir: WorkdirOpt = None,
    backend: Annotated[Optional[str], typer.Option(help="trtllm-serve: prove the trtllm-serve deploy backend instead (NVIDIA's release container on this host's GPUs).")] = None,
    image: Annotated[Optional[str], typer.Option(help="--backend trtllm-serve: the TensorRT-LLM image (default: the pinned release).")] = None,
    tp: Annotated[int, typer.Option(min=1, help="--backend trtllm-serve: tensor-parallel ranks (GPUs).")] = 1,
) -> None:
    """Prove a site's container in minutes: build, validate, publish and run tiny-llava through the toolchain. With
    --backend trtllm-serve: deploy a tiny LLaVA-NeXT with trtllm-serve, ask it about an image with the openai client
    and compare with the transformers reference."""
    import tempfile

    if backend is not None:
        _selftest_backend(backend, workdir, image=image, tp=tp)
        return
    preflight("tiny-llava", toolchain, {})
    quiet_prefect()
    build_engine = load_flow("build-engine")
    from vlmforge.modeling.images import synthetic_images
    from vlmforge.runner.loader import load_engine
    from vlmforge.store import open_store

    with tempfile.TemporaryDirectory(prefix="vlmforge-selftest-") as tmp:
        root = Path(tmp)
        store_url = str(root / "store")
        summary = build_engine(model="tiny-llava", toolchain=toolchain.value, store=store_url,
                               workdir=str(workdir or root / "work"))
        with open_store(store_url) as store:
            store.pull("tiny-llava@latest", root / "engine")
        engine = load_engine(root / "engine")
        output = engine.generate(synthetic_images(64)[0], "Question: which city is this? Answer:", 8)
    console.print(f"[bold green]selftest passed[/] ({toolchain.value}): built {summary['build_id']}, validation "
                  f"{summary['validation']['token_agreement']}, served {len(output.tokens)} tokens in "
                  f"{output.e2e_ms:.0f} ms", highlight=False)


def _selftest_backend(backend: str, workdir: Path | None, *, image: str | None, tp: int) -> None:
    import tempfile

    from vlmforge.deploy.records import ServeBackend
    from vlmforge.errors import DeployError

    if backend != ServeBackend.TRTLLM_SERVE.value:
        raise DeployError(f"--backend {backend}: the selftest proves trtllm-serve (--backend trtllm-serve); vlmforge's "
                          "runner is proven with --toolchain")
    from vlmforge.deploy.trtllm_selftest import run_selftest

    with tempfile.TemporaryDirectory(prefix="vlmforge-selftest-", dir=workdir) as tmp:
        result = run_selftest(Path(tmp), image=image, tp=tp)
    console.print(f"[bold green]selftest passed[/] (trtllm-serve, {result.image}): {result.comparison.matched_tokens} "
                  f"reference tokens reproduced, agreement {result.comparison.agreement}", highlight=False)
