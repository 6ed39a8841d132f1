"""CLI: `build` (runs the Prefect build flow), `fetch` (one verified source download), `selftest`."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape

from vlmforge.cli.app import app, console, err_console, print_json
from vlmforge.cli.flows import load_flow, quiet_prefect, start_api
from vlmforge.cli.output import BuildProgress, quiet_third_party
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
from vlmforge.errors import VlmforgeError
from vlmforge.families import resolve
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.specs.schema import BuildSpec, Toolchain

if TYPE_CHECKING:
    from vlmforge.build.published import PublishedBuild

StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Artifact store URL (default: $VLMFORGE_STORE or a local dir).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print Prefect's run log and what third parties "
                                          "print (warnings, progress bars) instead of one progress display.")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", help="Work dir for stage outputs (default: $VLMFORGE_WORKDIR).")]


def preflight(model: str, toolchain: Toolchain, overrides: dict) -> BuildSpec:
    """Everything that can be refused before Prefect starts: the spec, the rules, the toolchain."""
    spec = load_model_or_spec(model, overrides)
    resolved = resolve(spec)
    if toolchain is Toolchain.HF:
        from vlmforge.toolchains.hf.stages import check_supported

        check_supported(resolved)
    else:
        from vlmforge.build.trtllm_pipeline import check_trtllm_buildable
        from vlmforge.system.env import require_trtllm

        check_trtllm_buildable(resolved)
        require_trtllm()
    return spec


def already_published(spec: BuildSpec, toolchain: Toolchain, store: str | None, workdir: Path | None,
                      aliases: list[str] | None) -> PublishedBuild | None:
    """The stored build this run would produce, with its aliases in place (checked before any server starts); None
    when the flow has work to do, or when the check itself could not be made (the flow then says why, with retries)."""
    from vlmforge.build.pipeline import default_workdir
    from vlmforge.build.published import find_published

    try:
        return find_published(spec, toolchain, store_url=store, workdir=workdir or default_workdir(),
                              aliases=tuple(aliases or ("latest",)))
    except VlmforgeError as exc:
        err_console.print(f"could not check whether {spec.name} is already published ({escape(str(exc))}): building",
                          highlight=False)
        return None


@app.command("build")
def build_cmd(
    model: Annotated[str, typer.Argument(help="Catalog model name or spec YAML path.")],
    toolchain: Annotated[Toolchain, typer.Option(help="hf (torch+transformers, anywhere) or trtllm (NVIDIA's container).")] = Toolchain.HF,
    store: StoreOpt = None, workdir: WorkdirOpt = None,
    dialect: DialectOpt = None, tp: TpOpt = None, pp: PpOpt = None, dtype: DtypeOpt = None, quant: QuantOpt = None,
    max_batch_size: BatchOpt = None, max_input_len: InputOpt = None, max_output_len: OutputOpt = None,
    visual_batch_size: VisualBatchOpt = None,
    alias: Annotated[Optional[list[str]], typer.Option("--alias", help="Aliases to move after validation (default: latest).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Run the build flow even when the store already holds this "
                                        "build with its aliases in place (its stages still reuse the work dir).")] = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build, validate and publish an engine through the Prefect flow (a temporary local Prefect server unless
    PREFECT_API_URL is set). A build the store already holds, from the same spec, source revision and libraries,
    with its aliases in place, is reported in seconds without starting Prefect (--force runs the flow anyway)."""
    overrides = spec_overrides(tp=tp, pp=pp, dtype=dtype, quant=quant, max_batch_size=max_batch_size,
                               max_input_len=max_input_len, max_output_len=max_output_len,
                               visual_batch_size=visual_batch_size, dialect=dialect)
    if not verbose:
        quiet_third_party()  # before torch or transformers is imported
    spec = preflight(model, toolchain, overrides)
    published = None if force else already_published(spec, toolchain, store, workdir, alias)
    if published is not None:
        summary = published.summary(toolchain)
        if as_json:
            print_json(summary)
            return
        console.print(f"[bold green]engine[/] {summary['model']}#{summary['build_id']} is already published: nothing "
                      "to build (same spec, source revision and libraries; --force runs the build flow anyway)",
                      highlight=False)
        console.print(f"stored in {summary['store']}", highlight=False)
        console.print(f"manifest {summary['manifest_url']}", highlight=False, soft_wrap=True)
        console.print("aliases: " + ", ".join(f"{a} -> {b}" for a, b in summary["aliases"].items()), highlight=False)
        _print_validation(summary["validation"])
        return
    summary = run_build_flow(spec, toolchain, verbose=verbose, model=model, store=store,
                             workdir=str(workdir) if workdir else None, overrides=overrides, aliases=alias)
    if as_json:
        print_json(summary)
        return
    validation = summary["validation"]
    console.print(f"\n[bold green]engine[/] {summary['model']}#{summary['build_id']}", highlight=False)
    console.print(f"stored in {summary['store']}" + ("" if summary["created"] else " (already there: nothing uploaded)"),
                  highlight=False)
    _print_validation(validation)


def expected_stages(spec: BuildSpec, toolchain: Toolchain) -> int:
    """How many stage outcomes the build flow logs (the progress bar's length): hf fetch, convert, [quantize], llm,
    visual, engine, validate, publish; trtllm engine, validate, publish (its plan's lines show as steps)."""
    if toolchain is Toolchain.TRTLLM:
        return 3
    return 7 + int(spec.quantization.active)


def run_build_flow(spec: BuildSpec, toolchain: Toolchain, *, verbose: bool, **parameters: Any) -> dict[str, Any]:
    """The build-engine flow on ``toolchain`` with ``parameters``, behind one progress display (``verbose``: Prefect's run log and
    everything third parties print instead). Prefect's API is reached in a thread while the stages' modules are
    imported: on a small machine the temporary server's start and the imports overlap."""
    quiet_prefect()
    display = nullcontext(None) if verbose else BuildProgress(err_console, spec.name, expected_stages(spec, toolchain))
    with display as progress:
        step = progress.step if progress is not None else (lambda text: None)
        step("reaching Prefect's API" if os.environ.get("PREFECT_API_URL") else "starting Prefect's temporary server")
        wait_for_api = start_api()
        build_engine = load_flow("build-engine")
        if toolchain is Toolchain.HF:
            from vlmforge.build.pipeline import import_stage_modules

            step("importing torch and transformers (while Prefect starts)")
            import_stage_modules()
        wait_for_api()
        step("running the build flow")
        return build_engine(toolchain=toolchain.value, **parameters)


def _print_validation(validation: dict) -> None:
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
    verbose: VerboseOpt = False,
) -> None:
    """Prove a site's container in minutes: build, validate, publish and run tiny-llava through the toolchain. With
    --backend trtllm-serve: deploy a tiny LLaVA-NeXT with trtllm-serve, ask it about an image with the openai client
    and compare with the transformers reference."""
    import tempfile

    if backend is not None:
        _selftest_backend(backend, workdir, image=image, tp=tp)
        return
    if not verbose:
        quiet_third_party()
    spec = preflight("tiny-llava", toolchain, {})
    from vlmforge.modeling.images import synthetic_images
    from vlmforge.runner.loader import load_engine
    from vlmforge.store import open_store

    with tempfile.TemporaryDirectory(prefix="vlmforge-selftest-") as tmp:
        root = Path(tmp)
        store_url = str(root / "store")
        summary = run_build_flow(spec, toolchain, verbose=verbose, model="tiny-llava", store=store_url, workdir=str(workdir or root / "work"))
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
