"""bench/runner_gpu.py's own smoke run (`--tiny`, CPU, float32): every runner path gives generate()'s tokens,
and its TP check (`--save-llm`, then `mpirun -n 2 ... --tp-check`) finds TP=2 equal to TP=1, token for token and
teacher-forced. The GPU figures in docs/benchmarks.md come from the same script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "runner_gpu.py"


def test_the_runner_benchmark_runs_and_its_paths_agree_with_generate(tmp_path: Path) -> None:
    out = tmp_path / "runner.json"
    subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--repeats", "1", "--concurrent", "3", "--new-tokens", "6",
                    "--out", str(out), "--save-llm", str(tmp_path / "saved")], check=True, cwd=ROOT, timeout=300)
    result = json.loads(out.read_text())
    assert result["runner_dynamic"]["agreement_with_generate"] == 1.0
    assert result["runner_static"]["agreement_with_generate"] == 1.0
    assert result["concurrent"]["agreement_with_sequential"] == 1.0 and result["concurrent"]["tokens"] == 18
    assert set(result["summary"]["targets"]) == {"decode >= 165 tok/s", "decode >= 70% roofline",
                                                 "decode >= 3.5x generate()", "16 concurrent >= 6x sequential"}
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (apt-get install openmpi-bin): the TP half needs it")
    tp = tmp_path / "tp2.json"
    argv = ["mpirun", "-n", "2", "--bind-to", "none", "--oversubscribe", "-x", "MASTER_ADDR=127.0.0.1",
            "-x", f"MASTER_PORT={free_port()}", "-x", "PATH"]
    if os.geteuid() == 0:
        argv.insert(1, "--allow-run-as-root")
    subprocess.run(argv + [sys.executable, str(SCRIPT), "--tp-check", str(tmp_path / "saved"), "--out", str(tp)],
                   check=True, cwd=ROOT, timeout=300)
    check = json.loads(tp.read_text())
    assert check["tp"] == 2 and check["same_tokens_as_tp1"]
    assert all(r["teacher_forced_argmax_agreement"] == 1.0 and r["teacher_forced_max_abs_logit_diff"] < 1e-3
               for r in check["requests"])
