"""The standing fault suite under load: bench/soak.py's mix (valid and streamed requests, clients hanging up
mid-stream, malformed, oversized and unauthorised requests) against the guarded runner, smaller than the soak whose
figures docs/benchmarks.md reports. No 5xx, every outcome one its kind allows, the runner healthy after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.net import ROOT
from tests.helpers.runners import GUARD_KEY, Runner


def test_a_mixed_load_gets_no_5xx_and_only_the_answers_each_request_deserves(guarded_runner: Runner,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    pid = int(guarded_runner.pid_file.read_text())
    argv = [sys.executable, str(ROOT / "bench" / "soak.py"), "--url", guarded_runner.url, "--api-key", GUARD_KEY,
            "--pid", str(pid), "--requests", "160", "--concurrency", "16", "--rounds", "2", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    print(done.stdout[-3000:])
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert done.returncode == 0 and result["server_5xx"] == 0 and not result["unexpected"], result["unexpected"][:5]
    assert result["health_after"] == 200
    kinds = result["kinds"]
    assert {"valid", "stream", "disconnect", "malformed", "oversized", "unauthorized"} <= set(kinds)
    statuses = result["status_counts"]
    assert {"200", "400", "401", "404", "413"} <= set(statuses)
    counted = result["server_counted_by_status"]
    assert counted.get("499", 0) >= kinds["disconnect"] * 0.8, "the runner saw the clients hang up"
    assert result["valid_latency_s"]["count"] == kinds["valid"] + kinds["stream"]
    assert result["rss_kib"]["after_load"]["VmRSS"] > 0
