"""Benchmark: the Prefect build flow against the same stages run in order without Prefect.

For each tiny family, in one process and one run:
  plain      HfPipeline.run(): every stage in order, no Prefect (cold work dir)
  flow       the build-engine flow: the visual branch beside the LLM branch, Prefect tasks,
             artifacts and publishing to a local store (cold work dir and store)
  stages     the sum of the flow's stages' own times (from their records)
  no-op      the flow again on the same work dir and store (every stage skipped, nothing uploaded)
Orchestration overhead = flow - stages + (the time the two branches overlapped); the gain from
running the branches at once is plain - flow when overhead is smaller than the visual branch.

    python bench/build_flow.py [--models tiny-llava ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from vlmforge.build.pipeline import HfPipeline
from vlmforge.build.workdir import StageRecord, Workdir
from vlmforge.specs.catalog import load_model_or_spec

MODELS = ["tiny-llava", "tiny-blip2-opt", "tiny-blip2-t5", "tiny-nougat"]


def stage_seconds(work: Path, model: str) -> dict[str, float]:
    records = [StageRecord.model_validate_json(p.read_text()) for p in (work / model).glob("*/_stage.json")]
    return {r.stage: r.seconds for r in records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    from prefect import flow
    from vlmforge_flows.build import build_engine

    @flow
    def warm_up() -> None:
        """Start Prefect's server (temporary unless PREFECT_API_URL is set) before timing anything."""

    warm_up()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlmforge-bench-") as tmp:
        root = Path(tmp)
        for model in args.models:  # first-use costs (imports, exporter warm-up) are paid here, untimed
            HfPipeline(load_model_or_spec(model), Workdir(root / "warm"), on_event=lambda _: None).run()
        for model in args.models:
            start = time.perf_counter()
            HfPipeline(load_model_or_spec(model), Workdir(root / "plain" / model), on_event=lambda _: None).run()
            plain = time.perf_counter() - start

            work, store = root / "flow" / model, root / "store" / model
            start = time.perf_counter()
            build_engine(model=model, workdir=str(work), store=str(store))
            flow_s = time.perf_counter() - start
            own = stage_seconds(work, model)
            llm_branch = sum(own.get(s, 0.0) for s in ("convert", "quantize", "llm"))
            start = time.perf_counter()
            again = build_engine(model=model, workdir=str(work), store=str(store))
            noop = time.perf_counter() - start
            assert set(again["stages"].values()) == {"skipped"} and not again["created"]
            rows.append((model, plain, flow_s, sum(own.values()), own.get("visual", 0.0), llm_branch, noop))

    print(f"\n{'model':16} {'plain s':>8} {'flow s':>8} {'stages s':>9} {'visual s':>9} {'llm br s':>9} "
          f"{'overhead s':>11} {'no-op s':>8}")
    for model, plain, flow_s, stages, visual, llm_branch, noop in rows:
        critical_path = stages - min(visual, llm_branch)  # what perfect overlap of the two branches would take
        print(f"{model:16} {plain:8.2f} {flow_s:8.2f} {stages:9.2f} {visual:9.2f} {llm_branch:9.2f} "
              f"{flow_s - critical_path:11.2f} {noop:8.2f}")


if __name__ == "__main__":
    main()
