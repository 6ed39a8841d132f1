"""bench/serve_load.py's own smoke run against the session's runner (tiny-llava), much smaller than the run whose
figures docs/benchmarks.md reports: every request answered at its drawn length, the figures present and sane, and
the schedule the same for the same seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.net import ROOT
from tests.helpers.runners import Runner


def test_the_load_benchmark_answers_every_request_at_its_drawn_length(runner: Runner, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    argv = [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--url", runner.url, "--rates", "8",
            "--requests", "6", "--baseline", "1", "--tokens", "2", "6", "--seed", "3", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    assert "TTFT p99" in done.stdout
    result = json.loads(out.read_text())
    assert result["baseline"]["ttft_s_p50"] > 0 and result["baseline"]["output_tokens_per_s"] > 0
    (row,) = result["rates"]
    assert row["ok"] == 6 and not row["errors"] and row["short_answers"] == 0, row
    assert row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] <= row["e2e_s"]["p99"]
    assert 2 * 6 / row["wall_s"] <= row["output_tokens_per_s"] <= 6 * 6 / row["wall_s"] + 0.1


def test_the_schedule_depends_on_the_seed_alone() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import random

    from serve_load import schedule

    first = schedule(4.0, 20, (8, 32), random.Random(5))
    assert first == schedule(4.0, 20, (8, 32), random.Random(5)) != schedule(4.0, 20, (8, 32), random.Random(6))
    assert first[0].at == 0.0 and all(b.at > a.at for a, b in zip(first, first[1:]))
    assert all(8 <= p.max_tokens <= 32 for p in first)


def test_answers_longer_than_the_engine_allows_are_refused_before_the_load(runner: Runner) -> None:
    argv = [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--url", runner.url, "--tokens", "2", "100000"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode != 0 and "max_output_len" in done.stderr and "--tokens" in done.stderr, done.stderr[-2000:]


def test_the_before_after_comparison_pairs_the_rates() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from serve_load import comparison

    def run(tps: float, p99: float, errors: dict) -> dict:
        return {"rates": [{"rate": 2.0, "output_tokens_per_s": tps, "ttft_s": {"p50": 0.1, "p99": p99},
                           "e2e_s": {"p99": 1.0}, "errors": errors}]}

    text = comparison(run(30.0, 2.5, {"503": 1}), run(41.0, 0.4, {}))
    assert "| 2.0 | 30.0 -> 41.0 | 0.1 -> 0.1 s | 2.5 -> 0.4 s | 1.0 -> 1.0 s | 1 / 0 |" in text
