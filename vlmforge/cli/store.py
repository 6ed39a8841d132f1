"""`vlmforge store` commands: list, show, pull, promote, garbage-collect engine builds, and create a store."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import TypeAdapter
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmforge.cli.tables import Col, fit_table
from vlmforge.errors import NotFound, StoreError, VlmforgeError
from vlmforge.store import ANY, STORE_ENV, ArtifactStore, open_store
from vlmforge.store.engine_dir import human_bytes

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Engine artifact store: list, inspect, pull, promote and garbage-collect engine builds.",
    no_args_is_help=True,
)

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar=STORE_ENV,
        show_envvar=True,
        help="Store URL: s3://BUCKET[/PREFIX] or a directory [default: ~/.local/share/vlmforge/store].",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
RefArgument = Annotated[str, typer.Argument(help="MODEL (= MODEL@latest), MODEL@ALIAS or MODEL#BUILD_ID.")]


def _emit_json(value: Any, kind: Any) -> None:
    typer.echo(TypeAdapter(kind).dump_json(value, indent=2).decode())


@contextmanager
def _opened(url: str | None) -> Iterator[ArtifactStore]:
    """Open the store; turn user-facing errors into one message on stderr and exit code 2."""
    try:
        with open_store(url) as store:
            yield store
    except VlmforgeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _console() -> Console:
    """Console for tables: the terminal's width (or $COLUMNS), else wide enough not to wrap lines when piped."""
    console = Console()
    return console if console.is_terminal or os.environ.get("COLUMNS") else Console(width=160)


_size = human_bytes

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d`` or plain seconds; StoreError naming the option if malformed."""
    match = _DURATION.match(text)
    if not match:
        raise StoreError(f"{option} {text!r}: expected a duration such as 0, 90s, 30m, 1h or 2d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@app.command("ls")
def ls(
    model: Annotated[str | None, typer.Argument(help="List the builds of this model (else list models).")] = None,
    store_url: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """List models, or the builds of MODEL (newest first) with their aliases."""
    from vlmforge.store import BuildSummary, ModelSummary

    console = _console()
    with _opened(store_url) as store:
        if model is None:
            models = store.list_models()
            if as_json:
                _emit_json(models, list[ModelSummary])
                return
            columns = (Col("MODEL", keep=True), Col("BUILDS", drop=0, justify="right"),
                       Col("ALIASES", whole_words=True))
            rows = [(m.model, str(m.builds), ", ".join(f"{a}={b}" for a, b in sorted(m.aliases.items())))
                    for m in models]
            console.print(fit_table(console, columns, rows, title=store.url, title_justify="left",
                                    box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1)))
            return
        builds = store.list_builds(model)
        if not builds and model not in {m.model for m in store.list_models()}:
            raise NotFound(f"model {model!r} not found in {store.url}")
        if as_json:
            _emit_json(builds, list[BuildSummary])
            return
        # The build id starts with its creation time (UTC, to the second): CREATED goes first on a narrow terminal.
        columns = (Col("BUILD", keep=True), Col("CREATED (UTC)", drop=0), Col("TOOL", drop=3), Col("GPU", drop=2),
                   Col("WORLD", drop=1, justify="right"), Col("SIZE", drop=4, justify="right"),
                   Col("ALIASES", whole_words=True))
        rows = []
        for b in builds:
            gpu = f"{b.gpu_name or '?'} sm{b.compute_capability}" if b.compute_capability else (b.gpu_name or "cpu")
            rows.append((b.build_id, f"{b.created_at:%Y-%m-%d %H:%M}", b.toolchain, gpu, str(b.world_size),
                         _size(b.size), ", ".join(b.aliases)))
        console.print(fit_table(console, columns, rows, title=f"{model} in {store.url}", title_justify="left",
                                box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1)))


@app.command("show")
def show(ref: RefArgument, store_url: StoreOption = None, as_json: JsonOption = False) -> None:
    """Show the manifest of a build."""
    with _opened(store_url) as store:
        manifest = store.resolve(ref)
    if as_json:
        typer.echo(manifest.to_json().decode(), nl=False)
        return
    console = _console()
    hw = manifest.hardware
    rows = [
        ("build", manifest.ref),
        ("created", f"{manifest.created_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("toolchain", manifest.toolchain),
        ("fingerprint", manifest.fingerprint),
        ("source", f"{manifest.source.uri}" + (f" @ {manifest.source.revision}" if manifest.source.revision else "")),
        ("hardware", f"{hw.gpu_count} x {hw.gpu_name or '-'} (sm {hw.compute_capability or '-'}), cpu {hw.cpu or '-'}"),
        ("world size", str(manifest.world_size)),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(manifest.versions.items())) or "-"),
        ("links", ", ".join(f"{k}: {v}" for k, v in sorted(manifest.links.items())) or "-"),
        ("size", f"{_size(manifest.total_size)} in {len(manifest.files)} files"),
    ]
    summary = Table.grid(padding=(0, 2))
    for key, value in rows:
        summary.add_row(Text(key, style="bold"), Text(value))
    console.print(summary)
    files = Table("PATH", "SIZE", "SHA256", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for entry in manifest.files:
        files.add_row(Text(entry.path), _size(entry.size), entry.sha256[:16])
    console.print(files)


@app.command("pull")
def pull(
    ref: RefArgument,
    dest: Annotated[Path, typer.Argument(help="Directory to create with the engine files.")],
    store_url: StoreOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it holds something else.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-hash files DEST already holds (default: check presence and sizes).")
    ] = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="FOLDER",
                     help="Leave this top-level folder of the build out (repeatable), e.g. hf (trtllm-serve's).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Download a build into DEST, checking every downloaded file's sha256 (resumes an interrupted pull).

    If DEST already holds the build, its files are checked for presence and size (with --verify: re-hashed)
    and a damaged copy is pulled again; the output says which check was made. DEST records the folders
    --exclude left out; a later pull that needs them fetches only those.
    """
    from vlmforge.store import PullResult

    with _opened(store_url) as store:
        result = store.pull_engine(ref, dest, overwrite=force, progress=not no_progress and not as_json,
                                   verify=verify, exclude=frozenset(exclude or ()))
    if as_json:
        _emit_json(result, PullResult)
    else:
        manifest = result.manifest
        typer.echo(f"{manifest.ref} ({len(manifest.files)} files, {_size(manifest.total_size)}): {result.summary}")


@app.command("promote")
def promote(
    ref: RefArgument,
    alias: Annotated[str, typer.Argument(help="Alias to point at the build, e.g. stable.")],
    store_url: StoreOption = None,
    expect: Annotated[
        str | None,
        typer.Option("--expect", help="Only move if the alias points to this build now ('none': must not exist)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Point ALIAS of the model at the build REF resolves to (compare-and-swap)."""
    from vlmforge.store import AliasMove

    expected: str | None | Any = ANY if expect is None else (None if expect.lower() == "none" else expect)
    with _opened(store_url) as store:
        move = store.promote(ref, alias, expected=expected)
    if as_json:
        _emit_json(move, AliasMove)
    elif move.moved:
        typer.echo(f"{move.model}@{move.alias}: {move.previous or '(new)'} -> {move.build_id}")
    else:
        typer.echo(f"{move.model}@{move.alias} already points to {move.build_id}")


@app.command("gc")
def gc(
    store_url: StoreOption = None,
    keep: Annotated[int, typer.Option("--keep", min=1, help="Builds to keep per model (plus alias targets).")] = 5,
    apply: Annotated[bool, typer.Option("--apply", help="Really delete (default: dry run).")] = False,
    grace: Annotated[
        str, typer.Option("--grace", help="Never collect blobs or upload leftovers younger than this (0, 30m, 1h, 2d).")
    ] = "1h",
    ignore_unreadable: Annotated[
        bool,
        typer.Option(
            "--ignore-unreadable",
            help="Collect even though some manifests or alias records cannot be read: blobs and builds named in"
            " their raw bytes are kept, anything else they need is LOST.",
        ),
    ] = False,
    break_locks: Annotated[
        bool,
        typer.Option(
            "--break-locks",
            help="Kept for compatibility: gc always breaks the locks of provably dead holders (same host: pid and"
            " start time; other hosts: expired lease) and never a live holder's.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete builds beyond the newest --keep per model that no alias points to, and their unshared blobs.

    The dry run lists everything --apply would remove. --apply refuses while a manifest or alias record
    cannot be read (exit 2), unless --ignore-unreadable.
    """
    from vlmforge.store import GcReport

    with _opened(store_url) as store:
        report = store.gc(keep, apply=apply, break_locks=break_locks, grace=parse_duration(grace, "--grace"),
                          ignore_unreadable=ignore_unreadable)
    if as_json:
        _emit_json(report, GcReport)
        return
    _print_gc(report)


def _print_gc(report: Any) -> None:
    console = _console()
    verb = "deleted" if report.applied else "would delete"
    table = Table("BUILD", "CREATED (UTC)", "ACTION", "WHY", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.columns[0].no_wrap = True
    for b in report.kept:
        table.add_row(f"{b.model}#{b.build_id}", f"{b.created_at:%Y-%m-%d %H:%M:%S}", "keep", ", ".join(b.reasons))
    for b in report.deleted:
        table.add_row(f"{b.model}#{b.build_id}", f"{b.created_at:%Y-%m-%d %H:%M:%S}", verb, ", ".join(b.reasons))
    console.print(table)

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)  # a key or digest is never split

    for blob in report.blobs:
        say(f"{verb} blob {blob.sha256} ({_size(blob.size)}, stored {blob.modified:%Y-%m-%d %H:%M:%S})")
    for item in report.incomplete:
        say(f"{'removed' if report.applied else 'would remove'} {item.kind} {item.key}"
            f" (started {item.started:%Y-%m-%d %H:%M:%S})")
    say(f"{verb} {len(report.deleted)} builds, {report.blobs_deleted} blobs ({_size(report.bytes_deleted)}) and"
        f" {len(report.incomplete)} upload leftovers; keeping {len(report.kept)} builds, {report.blobs_kept} blobs"
        f" ({_size(report.bytes_kept)})")
    if report.blobs_young:
        say(f"kept {report.blobs_young} unreferenced blobs younger than the grace period ({report.grace_seconds:.0f} s)")
    for line in report.broken_locks:
        say(f"broke the lock of a dead holder: {line}")
    for line in report.dangling_aliases:
        say(f"warning: dangling alias {line}")
    for sha in report.missing_blobs:
        say(f"warning: blob {sha} is referenced by a kept build but missing")
    for key in report.refused_manifests + report.refused_aliases:
        say(f"warning: unreadable {key}: {report.reasons.get(key, '')}")
    if report.refusal and not report.applied:
        say("--apply will refuse while these records are unreadable (--ignore-unreadable overrides, at a risk)")
    elif report.ignored_unreadable:
        say("--ignore-unreadable: collected although records are unreadable; what they name was kept")
    if not report.applied and (report.deleted or report.blobs or report.incomplete):
        say("dry run: pass --apply to delete")


@app.command("init")
def init(
    store_url: StoreOption = None,
    adopt: Annotated[
        bool, typer.Option("--adopt", help="Add the store marker to a store made before vlmforge wrote one.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Create a store at an empty location (a first publish does this too), or adopt an existing one."""
    from vlmforge.store import StoreInfo

    with _opened(store_url) as store:
        info = store.init(adopt=adopt)
        url = store.url
    if as_json:
        _emit_json(info, StoreInfo)
    else:
        typer.echo(f"{url} is a vlmforge store (created {info.created_at:%Y-%m-%d %H:%M:%S} UTC by {info.created_by}"
                   f"{', adopted' if info.adopted else ''})")
