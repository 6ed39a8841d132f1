"""Tensor-parallel runners: one process per rank under ``mpirun``, rank 0 leads, the others follow.

Rank 0 serves HTTP, batches requests and runs the visual engine; for every batch it sends the
followers a :class:`~vlmforge.runner.jobs.BatchJob` (the visual features, prompts and token limits), then every rank runs
the same LLM forwards (transformers' tensor-parallel plan splits the weights and all-reduces), and
after every step rank 0 sends the tokens to feed next and whether to go on, and the rows retired and requests
joined at that step boundary (in-flight batching: each joiner's host BatchJob). So the ranks stay in
lockstep even when rank 0 ends a row early (a stop string, a lost client) or lets a request join mid-batch.

Control messages go through a gloo process group of their own (the LLM's collectives use NCCL on
GPUs, gloo on the CPU). Rank 0 sends a :class:`Heartbeat` when idle, so an idle follower's wait
never reaches the group's timeout, and :class:`Shutdown` when it has drained.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from vlmforge.errors import DeployError
from vlmforge.runner.jobs import BatchJob, JobRejected, WholeJob, follow_job
from vlmforge.runner.protocol import EngineKind, ServingEngine

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(minutes=30)
"""How long a rank waits in one collective (a heartbeat comes far more often)."""
HEARTBEAT_SECONDS = 30.0


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job: from Open MPI (``OMPI_COMM_WORLD_*``) or torchrun (``RANK``...)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RankInfo:
        env = dict(os.environ if env is None else env)
        if "OMPI_COMM_WORLD_RANK" in env:
            rank, size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
            return cls(rank, size, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", rank)),
                       int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", size)))
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
            return cls(rank, size, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", size)))
        return cls()

    @property
    def leader(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Heartbeat:
    """Rank 0 is idle and alive."""


@dataclass(frozen=True)
class Shutdown:
    """Rank 0 has drained: followers exit."""

    reason: str = "rank 0 stopped"


@dataclass
class ControlChannel:
    """Rank 0's messages to the other ranks over a gloo group (broadcasts from rank 0)."""

    info: RankInfo
    group: Any = None

    def _broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def send(self, message: BatchJob | WholeJob | Heartbeat | Shutdown) -> None:
        assert self.info.leader, "only rank 0 sends"
        self._broadcast(message)

    def receive(self) -> BatchJob | WholeJob | Heartbeat | Shutdown:
        assert not self.info.leader, "rank 0 does not receive"
        return self._broadcast(None)

    # StepSync (rank 0) and StepSource (followers) of vlmforge.runner.batching: per step boundary one tensor (the
    # tokens, go on, changes follow), then, where rows were retired or requests joined, the Changes object (the
    # joiners' host BatchJobs: the followers build the same prefixes and join them in the same order)
    def step(self, *args: Any) -> Any:
        import torch
        import torch.distributed as dist

        if self.info.leader:
            tokens, go_on, *rest = args
            changes = rest[0] if rest else None
            message = torch.cat([tokens.to("cpu", torch.long), torch.tensor([int(go_on), int(changes is not None)])])
            dist.broadcast(message, src=0, group=self.group)
            if changes is not None:
                self._broadcast(changes)
            return None
        (size,) = args
        message = torch.empty(size + 2, dtype=torch.long)
        dist.broadcast(message, src=0, group=self.group)
        changes = self._broadcast(None) if message[size + 1] else None
        return message[:size], bool(message[size]), changes


def init_distributed(info: RankInfo, device: str) -> ControlChannel:
    """Join the job's process group (NCCL for GPUs, gloo on the CPU) and make the gloo control group.

    Needs MASTER_ADDR and MASTER_PORT (the launcher sets them); RANK, WORLD_SIZE and LOCAL_RANK are
    set from ``info`` for transformers' tensor-parallel loading.
    """
    import torch
    import torch.distributed as dist

    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(key)]
    if missing:
        raise DeployError(f"tensor parallelism needs {' and '.join(missing)} in the environment "
                          "(vlmforge deploy sets them; by hand: mpirun -x MASTER_ADDR=HOST -x MASTER_PORT=PORT ...)")
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      LOCAL_WORLD_SIZE=str(info.local_world_size))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, timeout=CONTROL_TIMEOUT,
                            **({"device_id": torch.device("cuda", info.local_rank)} if cuda else {}))
    group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if cuda else None
    log.info("rank %d of %d joined (%s, control over gloo)", info.rank, info.world_size, backend)
    return ControlChannel(info, group)


def cpu_threads_per_rank(info: RankInfo) -> int:
    """This machine's usable cores shared among the ranks on it (at least one each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, info.local_world_size))


def ignore_termination(info: RankInfo) -> None:
    """Followers outlive SIGTERM/SIGINT (mpirun forwards them to every rank): they exit when rank 0, which
    drains its requests first, sends :class:`Shutdown`."""

    def note(signum: int, frame: Any) -> None:
        log.info("rank %d: %s received; exiting when rank 0 has drained", info.rank, signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)


def run_follower(engine: ServingEngine, channel: ControlChannel) -> int:
    """A follower rank's whole life: run every batch rank 0 sends until it says stop. Returns batches run."""
    batches = 0
    while True:
        message = channel.receive()
        if isinstance(message, Shutdown):
            log.info("rank %d: shutdown (%s) after %d batches", channel.info.rank, message.reason, batches)
            return batches
        if isinstance(message, Heartbeat):
            continue
        if isinstance(message, WholeJob):
            if engine.kind is not EngineKind.WHOLE_REQUEST:
                raise DeployError(f"rank 0 sent a whole-request job to a {engine.kind.value} engine")
            engine.generate_many(message.images, message.prompts, message.max_new_tokens, sampling=message.sampling)
        else:
            if engine.kind is not EngineKind.INCREMENTAL:
                raise DeployError(f"rank 0 sent a batch job to a {engine.kind.value} engine")
            try:
                follow_job(engine, message, channel)
            except JobRejected as exc:  # rank 0 fails the same way on the same inputs and skips the batch too
                log.warning("rank %d: batch skipped: %s", channel.info.rank, exc)
                continue
        batches += 1
