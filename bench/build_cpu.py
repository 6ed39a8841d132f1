"""CPU benchmark: `vlmforge build MODEL` cold against a no-op rebuild, and where the cold build's time goes.

In one run on this machine, through the real CLI as a new user runs it (a subprocess per command, no
PREFECT_API_URL: Prefect's temporary local server), each repetition with a new store and work dir:

  cold     vlmforge build MODEL: nothing stored, nothing in the work dir
  no-op    the same command again: the store holds the build, answered before Prefect starts
  flow     the same command with --force: the build flow with every stage skipped and nothing uploaded,
           which is what a no-op rebuild cost before the published-build check

then the cold build's phases, timed inside one process that does what `vlmforge build` does: the CLI's imports,
the spec checks, the published-build check (a miss), Prefect's import, the temporary server's start (beside
the stage modules' import), and the flow with its stages' own times. An untimed warm-up build first creates
the bench's Prefect database (its own PREFECT_HOME) and warms the page cache.

    python bench/build_cpu.py [--model tiny-llava] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def cli(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one `vlmforge` command and its JSON output."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vlmforge", *args, "--json"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"vlmforge {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return seconds, json.loads(done.stdout)


def phases(model: str) -> dict[str, Any]:
    """The cold build's phases in this process (`--phases`): what `vlmforge build` does, timed step by step."""
    marks: dict[str, float] = {}
    start = time.perf_counter()

    def mark(name: str) -> None:
        marks[name] = time.perf_counter() - start

    import vlmforge.cli as cli_package

    cli_package._register()
    from vlmforge.cli.build import already_published, preflight
    from vlmforge.specs.schema import Toolchain

    mark("cli imports")
    spec = preflight(model, Toolchain.HF, {})
    mark("spec checks")
    assert already_published(spec, Toolchain.HF, None, None, None) is None, "the bench needs an empty store"
    mark("published-build check (a miss)")
    from vlmforge.build.pipeline import import_stage_modules
    from vlmforge.cli.flows import load_flow, quiet_prefect, start_api

    quiet_prefect()
    wait_for_api = start_api()
    build_engine = load_flow("build-engine")
    mark("prefect and flow imports")
    import_stage_modules()
    mark("stage module imports (beside the server start)")
    wait_for_api()
    mark("temporary server up")
    summary = build_engine(model=model)
    mark("flow")
    return {"marks": marks, "stages": summary["stages"]}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)  # the child of the phase breakdown
    args = parser.parse_args()
    if args.phases:
        print(json.dumps(phases(args.model)))
        return

    with tempfile.TemporaryDirectory(prefix="vlmforge-bench-cpu-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "VLMFORGE_STORE", "VLMFORGE_WORKDIR")}
        env.update(PREFECT_HOME=str(root / "prefect"), HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")

        def command(run: str) -> list[str]:
            return ["build", args.model, "--store", str(root / run / "store"), "--workdir", str(root / run / "work")]

        print(f"warm-up build of {args.model} (untimed) ...", file=sys.stderr)
        cli(command("warm-up"), env)
        rows = []
        for repeat in range(args.repeats):
            run = f"run{repeat}"
            cold, first = cli(command(run), env)
            noop, again = cli(command(run), env)
            assert again.get("already_published") and again["build_id"] == first["build_id"], again
            flow, forced = cli(command(run) + ["--force"], env)
            assert set(forced["stages"].values()) == {"skipped"} and not forced["created"], forced
            rows.append((cold, noop, flow))
            print(f"repeat {repeat + 1}: cold {cold:.2f} s, no-op {noop:.2f} s, flow rerun {flow:.2f} s", file=sys.stderr)

        breakdowns = []
        for repeat in range(args.repeats):
            phase_env = {**env, "VLMFORGE_STORE": str(root / f"phases{repeat}" / "store"),
                         "VLMFORGE_WORKDIR": str(root / f"phases{repeat}" / "work")}
            done = subprocess.run([sys.executable, __file__, "--phases", "--model", args.model], env=phase_env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"phase breakdown failed:\n{done.stderr[-4000:]}")
            breakdowns.append(json.loads(done.stdout.strip().splitlines()[-1]))

    cold, noop, flow = (median([row[i] for row in rows]) for i in range(3))
    print(f"\n{args.model}, {args.repeats} repeats (median; os.cpu_count() = {os.cpu_count()}, "
          f"load average at the end {os.getloadavg()[0]:.1f})")
    print(f"{'':34} {'seconds':>8}")
    print(f"{'cold build':34} {cold:8.2f}")
    print(f"{'no-op rebuild':34} {noop:8.2f}   {noop / cold:.1%} of cold")
    print(f"{'flow rerun (--force, all skipped)':34} {flow:8.2f}   the no-op before the published-build check")
    print(f"targets: no-op <= 1/4 of cold ({cold / 4:.2f} s) and < 5 s: "
          f"{'met' if noop <= cold / 4 and noop < 5 else 'NOT met'}")

    print("\nwhere the cold build's time goes (one process, median of each phase's own seconds):")
    names = list(breakdowns[0]["marks"])
    for i, name in enumerate(names):
        own = [b["marks"][name] - (b["marks"][names[i - 1]] if i else 0.0) for b in breakdowns]
        print(f"  {name:48} {median(own):6.2f}")
    print(f"  {'total':48} {median([b['marks'][names[-1]] for b in breakdowns]):6.2f}")
    stages = {stage: [float(b["stages"][stage].rstrip("s")) for b in breakdowns] for stage in breakdowns[0]["stages"]}
    print("  the flow's stages (own seconds; visual runs beside convert and llm): "
          + ", ".join(f"{stage} {median(values):.2f}" for stage, values in stages.items()))


if __name__ == "__main__":
    main()
