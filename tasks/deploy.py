"""Prefect tasks of a runner deployment: each wraps one step of :mod:`vlmforge.deploy.service`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from vlmforge_tasks.common import retry_transient

from vlmforge.deploy.records import Deployment
from vlmforge.deploy.service import DeployPlan, fetch_engine, plan_deploy, start_runner
from vlmforge.deploy.sources import BuildSource

STEP = {"cache_policy": NONE, "persist_result": False}


@task(name="choose-build", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient, **STEP)
def choose(ref: str, source: BuildSource, **kwargs: Any) -> DeployPlan:
    """Pick (or check) the build for this machine; refuses a mismatch before anything is pulled or started."""
    plan = plan_deploy(ref, source, **kwargs)
    get_run_logger().info("%s", plan.selection.explain())
    return plan


@task(name="pull-engine", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient, **STEP)
def pull(plan: DeployPlan, source: BuildSource, cache_dir: Path | None = None) -> Path:
    """Pull and verify the build into the local cache (resumes after an interruption)."""
    engine_dir = fetch_engine(plan, source, cache_dir)
    get_run_logger().info("%s is in %s", plan.build.ref, engine_dir)
    return engine_dir


@task(name="start-runner", **STEP)
def start(plan: DeployPlan, engine_dir: Path, source: BuildSource, **kwargs: Any) -> Deployment:
    """Start `mpirun -n TP ... vlmforge serve`, or its container (draining the deployment it replaces), and wait
    until healthy. The API key (``api_key``, a SecretStr) is not a recorded input: no result or cache is kept."""
    deployment = start_runner(plan, engine_dir, source=source.describe(), **kwargs)
    get_run_logger().info("serving %s at %s (TP %d)", deployment.ref, deployment.endpoint, deployment.tp)
    return deployment
