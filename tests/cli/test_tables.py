"""Tables on an 80-column terminal: names, ids and endpoints whole, less important columns dropped or wrapped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from tests.helpers.deploy import record
from vlmforge.cli.tables import Col, fit_table
from vlmforge.families import family_names, get_family
from vlmforge.specs.catalog import catalog_specs


def narrow(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "vlmforge", *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
    return result.stdout


def test_models_keeps_every_name_and_source_whole() -> None:
    output = narrow("models")
    assert "…" not in output
    for spec in catalog_specs():
        assert spec.name in output and spec.source in output


def test_families_keeps_every_family_and_tiny_model_whole() -> None:
    output = narrow("families")
    assert "…" not in output
    for name in family_names():
        assert name in output and (get_family(name).tiny_source or "-") in output


def test_deployments_keeps_name_build_and_endpoint_whole(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    deployment = record(tmp_path, dead.pid, name="tiny-llava-3-production-replica",
                        model="tiny-llava-3-long-model-name", build_id="20261204T135317Z-24d40cfa",
                        endpoint="http://inference-node-17.example.internal:18080")
    output = narrow("deployments", "--state-dir", str(tmp_path))
    assert "…" not in output
    assert deployment.name in output and deployment.ref in output and deployment.endpoint in output


def test_rows_become_blocks_when_the_keep_columns_do_not_fit_side_by_side() -> None:
    columns = [Col("name", keep=True), Col("endpoint", keep=True), Col("size", drop=0), Col("note")]
    row = ("a-name-of-thirty-characters-xx", "http://an-endpoint-of-forty-characters:1", "1 GiB", "words that wrap")
    console = Console(width=60, record=True)
    console.print(fit_table(console, columns, [row, row]))
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    assert "name      a-name-of-thirty-characters-xx" in lines and "size      1 GiB" in lines
    assert "endpoint  http://an-endpoint-of-forty-characters:1" in lines and len(lines) == 9
    console = Console(width=120, record=True)  # side by side where they fit
    console.print(fit_table(console, columns, [row]))
    assert any(row[0] in line and row[1] in line for line in console.export_text().splitlines())


def test_watch_keeps_model_names_whole() -> None:
    from vlmforge.cli import watch

    rows = [{"model": "llava-onevision-qwen2-7b-ov-hf-production", "status": "updated",
             "old_revision": "0123456789abcdef0123456789abcdef01234567", "new_revision": "fedcba9876543210" * 2,
             "reason": "the source has a new revision; a rebuild was announced as vlmforge.model.updated"}]
    console = Console(width=80, record=True)
    console.print(watch._table(rows))
    text = console.export_text()
    assert "…" not in text and rows[0]["model"] in text and max(len(line) for line in text.splitlines()) <= 80
