"""CLI: `watch` runs the watch-models flow once (--once) or every --interval seconds."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from vlmforge.build.watch import WATCH_ENV, WatchFailed
from vlmforge.cli.app import app, console, err_console, print_json
from vlmforge.cli.specs import JsonOpt
from vlmforge.cli.tables import Col, fit_table
from vlmforge.store import STORE_ENV


def _models(values: list[str] | None) -> list[str] | None:
    """--models a --models b, or --models a,b."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _table(rows: list[dict[str, Any]]) -> Table:
    """Model names and statuses whole on a narrow terminal; the old revision goes first, the reason wraps."""
    columns = (Col("model", keep=True), Col("status", keep=True), Col("old revision", drop=0),
               Col("new revision", drop=1), Col("reason"))
    cells = [(row["model"], row["status"], (row.get("old_revision") or "-")[:24],
              (row.get("new_revision") or "-")[:24], row.get("error") or row["reason"]) for row in rows]
    return fit_table(console, columns, cells)


def _run_once(models: list[str] | None, store: str | None, reannounce_after: float) -> tuple[list[dict[str, Any]], str | None]:
    """(rows, error): the flow's rows, and the error when some models could not be checked."""
    from vlmforge.cli.flows import load_flow

    watch_models = load_flow("watch-models")

    try:
        return watch_models(models=models, store=store, reannounce_after_hours=reannounce_after), None
    except WatchFailed as exc:
        return exc.rows, str(exc)


@app.command("watch")
def watch_cmd(
    once: Annotated[bool, typer.Option("--once", help="Check once and exit (else every --interval seconds).")] = False,
    models: Annotated[list[str] | None, typer.Option(
        "--models", help=f"Model names or spec files to watch (repeat, or comma-separate); default: ${WATCH_ENV}'s "
        "list, else every model in the store.")] = None,
    store: Annotated[str | None, typer.Option("--store", envvar=STORE_ENV, help="Store URL (default: $VLMFORGE_STORE).")] = None,
    interval: Annotated[float, typer.Option("--interval", min=1, help="Seconds between checks without --once.")] = 1800,
    reannounce_after: Annotated[float, typer.Option(
        "--reannounce-after", min=0,
        help="Hours before a revision announced already (its build running or failed) is announced again; 0: always.")] = 24,
    as_json: JsonOpt = False,
) -> None:
    """Announce models whose source has a new revision (Prefect event vlmforge.model.updated): the
    build-engine deployment's trigger builds them. Needs PREFECT_API_URL: the server the deployments are on."""
    if not os.environ.get("PREFECT_API_URL"):
        err_console.print("note: PREFECT_API_URL is not set: the events go to a temporary Prefect server, where no "
                          "deployment reacts to them", highlight=False)
    wanted = _models(models)
    while True:
        rows, error = _run_once(wanted, store, reannounce_after)
        if as_json:
            if once:
                print_json(rows)
            else:
                sys.stdout.write(json.dumps({"at": time.time(), "rows": rows, "error": error}, default=str) + "\n")
                sys.stdout.flush()
        else:
            console.print(_table(rows))
        if error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False)
        if once:
            if error:
                raise typer.Exit(2)
            return
        time.sleep(interval)
