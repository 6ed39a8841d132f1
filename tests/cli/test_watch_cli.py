"""`vlmforge watch --once --json` against the real Prefect server: one JSON row per model, exit 2 on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.checkpoints import directory_checkpoint, publish_build, spec_file, tiny_llava_spec
from tests.helpers.net import ROOT
from vlmforge.sources import open_source


def test_watch_once_json_lists_every_model_and_exits_2_when_one_cannot_be_checked(prefect_server: str,
                                                                                  tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    source = directory_checkpoint(tmp_path / "ckpt")
    good = spec_file(tmp_path / "good.yaml", "cli-good", f"file://{source}")
    publish_build(store, tiny_llava_spec("cli-good", f"file://{source}"),
                  open_source(f"file://{source}").resolve_revision(), tmp_path)
    bad = spec_file(tmp_path / "bad.yaml", "cli-bad", f"file://{tmp_path / 'no-such-dir'}")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(ROOT)}
    env.pop("VLMFORGE_WATCH", None)
    result = subprocess.run([sys.executable, "-m", "vlmforge", "watch", "--once", "--json", "--store", store,
                             "--models", f"{good},{bad}"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert rows["cli-good"]["status"] == "unchanged" and rows["cli-good"]["event_id"] is None
    assert rows["cli-bad"]["status"] == "error" and "source directory not found" in rows["cli-bad"]["error"]
    assert "could not check cli-bad" in result.stderr

    ok = subprocess.run([sys.executable, "-m", "vlmforge", "watch", "--once", "--store", store, "--models", str(good)],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "cli-good" in ok.stdout and "unchanged" in ok.stdout
