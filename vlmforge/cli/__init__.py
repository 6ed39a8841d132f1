"""The ``vlmforge`` command line: one typer app, sub-apps per concept, user errors exit 2 without a traceback."""

from __future__ import annotations

import logging
import os
import sys

import click
import typer
from rich.markup import escape

from vlmforge.cli.app import app, err_console
from vlmforge.errors import VlmforgeError


def _register() -> None:
    # Sub-command modules register themselves on `app` (or add a sub-app) when imported.
    import importlib

    for name in ("specs", "build", "checkpoint", "store", "serve", "deploy", "tune", "watch"):
        try:
            module = importlib.import_module(f"vlmforge.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vlmforge.cli.{name}":
                raise
            continue
        sub_app = getattr(module, "app", None)
        if isinstance(sub_app, typer.Typer) and sub_app is not app:
            app.add_typer(sub_app, name=name)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(level=os.environ.get("VLMFORGE_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    _register()
    try:
        result = app(args=argv, standalone_mode=False)
    except VlmforgeError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        sys.exit(2)
    except (click.exceptions.Abort, typer.Abort):
        err_console.print("aborted")
        sys.exit(130)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.ClickException, typer.TyperException) as exc:  # typer >= 0.2x vendors its own click
        if not hasattr(exc, "show"):
            raise
        exc.show()
        sys.exit(exc.exit_code)
    if isinstance(result, int) and result:
        sys.exit(result)
