"""Benchmark the artifact store: push/pull vs awscli on one S3 server (moto by default) and vs a disk copy."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3

from vlmforge.artifacts.manifest import EngineManifest, SourceInfo
from vlmforge.store import LocalStore, PublishResult, TransferSettings
from vlmforge.store.s3 import S3Store

MiB = 1024 * 1024
BIN = Path(sys.executable).parent


def parse_size(text: str) -> int:
    """Parse '1GiB', '256MiB', '512M', '1G' or a byte count."""
    units = {"k": 1024, "m": MiB, "g": 1024 * MiB}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def make_engine(root: Path, size: int) -> Path:
    """A TensorRT-LLM-like engine directory totalling ``size`` bytes of incompressible data."""
    small = {"config.json": 4096, "tokenizer/tokenizer.json": 2 * MiB, "tokenizer/tokenizer_config.json": 8192}
    rest = size - sum(small.values())
    layout = {"rank0.engine": rest * 3 // 4, "visual/visual_encoder.engine": rest - rest * 3 // 4, **small}
    for rel, n in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            left = n
            while left:
                chunk = min(left, 64 * MiB)
                handle.write(os.urandom(chunk))
                left -= chunk
    return root


def manifest(tag: str) -> EngineManifest:
    return EngineManifest.create(
        model="bench-engine", fingerprint=hashlib.sha256(tag.encode()).hexdigest(), toolchain="trtllm",
        source=SourceInfo(uri="bench://synthetic"),
    )


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".vlmforge"):
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def timed(fn: Callable[[], object]) -> float:
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (workdir / "moto.log").open("wb")
    # Keep objects in moto's memory rather than spooled temp files, so disk noise does not dominate.
    env = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(4 * 1024 * MiB)}
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], cwd=workdir,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def aws(*args: str, endpoint: str) -> None:
    subprocess.run([str(BIN / "aws"), "s3", *args, "--endpoint-url", endpoint, "--only-show-errors"], check=True)


def noop(results: dict[str, list[float]], again: PublishResult) -> None:
    """Record a no-op re-push: total, time until every file was hashed, and the store work left after that."""
    results["vlmforge no-op re-push (total)"].append(again.seconds)
    results["  of which hashing"].append(again.hash_seconds)
    results["  of which store work"].append(again.seconds - again.hash_seconds)


def bench_s3(
    engine: Path, work: Path, endpoint: str, settings: TransferSettings, rounds: int
) -> dict[str, list[float]]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    results: dict[str, list[float]] = {k: [] for k in (
        "vlmforge push", "awscli push", "vlmforge pull", "awscli pull",
        "vlmforge no-op re-push (total)", "  of which hashing", "  of which store work",
        "vlmforge idempotent re-publish",
    )}
    expected = tree_digest(engine)
    for r in range(rounds):
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        store = S3Store(bucket, "engines", endpoint_url=endpoint, settings=settings)
        first = manifest(f"r{r}")
        order = ["vlmforge", "awscli"] if r % 2 == 0 else ["awscli", "vlmforge"]
        for who in order:
            if who == "vlmforge":
                results["vlmforge push"].append(timed(lambda: store.publish(engine, first)))
            else:
                results["awscli push"].append(timed(lambda: aws("cp", "--recursive", str(engine),
                                                                f"s3://{bucket}/awscli", endpoint=endpoint)))
        for who in order:
            dest = work / f"pull-{who}-{r}"
            if who == "vlmforge":
                results["vlmforge pull"].append(timed(lambda: store.pull(f"bench-engine#{first.build_id}", dest)))
            else:
                results["awscli pull"].append(timed(lambda: aws("cp", "--recursive", f"s3://{bucket}/awscli",
                                                                str(dest), endpoint=endpoint)))
            assert tree_digest(dest) == expected, f"{who} pull differs"
            shutil.rmtree(dest)
        os.sync()
        again = store.publish(engine, manifest(f"r{r}-again"))
        assert again.uploaded_blobs == 0
        noop(results, again)
        results["vlmforge idempotent re-publish"].append(timed(lambda: store.publish(engine, first)))
        store.close()
        boto3.resource("s3", endpoint_url=endpoint).Bucket(bucket).objects.all().delete()
        s3.delete_bucket(Bucket=bucket)
        print(f"s3 round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()), flush=True)
    return results


def bench_local(engine: Path, work: Path, settings: TransferSettings, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {k: [] for k in (
        "vlmforge push", "cp -r push", "vlmforge pull", "cp -r pull",
        "vlmforge no-op re-push (total)", "  of which hashing", "  of which store work",
    )}
    for r in range(rounds):
        store = LocalStore(work / f"store-{r}", settings=settings)
        first = manifest(f"local{r}")
        results["vlmforge push"].append(timed(lambda: store.publish(engine, first)))
        results["cp -r push"].append(timed(lambda: subprocess.run(["cp", "-r", str(engine), str(work / "cp-push")],
                                                                  check=True)))
        results["vlmforge pull"].append(timed(lambda: store.pull("bench-engine", work / "pull")))
        results["cp -r pull"].append(timed(lambda: subprocess.run(["cp", "-r", str(work / "cp-push"),
                                                                  str(work / "cp-pull")], check=True)))
        os.sync()
        again = store.publish(engine, manifest(f"local{r}-again"))
        assert again.uploaded_blobs == 0
        noop(results, again)
        for path in ("cp-push", "cp-pull", "pull", f"store-{r}"):
            shutil.rmtree(work / path)
        print(f"local round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()),
              flush=True)
    return results


def report(title: str, size: int, results: dict[str, list[float]]) -> str:
    lines = [f"### {title}", "", "| step | median s | min s | MiB/s (median) | runs |", "|---|---:|---:|---:|---:|"]
    for name, values in results.items():
        med = statistics.median(values)
        rate = "" if "no-op" in name or "of which" in name or "idempotent" in name else f"{size / MiB / med:.0f}"
        lines.append(f"| {name} | {med:.2f} | {min(values):.2f} | {rate} | {len(values)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1GiB", help="engine directory size (default 1GiB)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; the order alternates, so use an even number")
    parser.add_argument("--backend", choices=("all", "s3", "local"), default="all")
    parser.add_argument("--endpoint", help="use this S3 endpoint instead of starting moto_server")
    parser.add_argument("--workers", type=int, help=f"transfer threads (default {TransferSettings().workers})")
    parser.add_argument("--part-size", help=f"upload part size (default {TransferSettings().part_size // MiB}MiB)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir, removed after)")
    parser.add_argument("--json-out", type=Path, help="also write the raw timings as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    size = parse_size(args.size)
    overrides: dict[str, int] = {}
    if args.workers:
        overrides["workers"] = args.workers
    if args.part_size:
        overrides["part_size"] = parse_size(args.part_size)
    settings = TransferSettings(**overrides)  # library defaults unless overridden
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    work = Path(tempfile.mkdtemp(prefix="vlmforge-bench-", dir=args.workdir))
    out: dict[str, object] = {
        "size": size, "settings": settings.model_dump(), "cpus": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
    }
    try:
        engine = make_engine(work / "engine", size)
        sections = []
        if args.backend in ("all", "s3"):
            with moto_server(work) if args.endpoint is None else _given(args.endpoint) as endpoint:
                res = bench_s3(engine, work, endpoint, settings, args.rounds)
            out["s3"] = res
            sections.append(report(f"S3 ({'moto_server' if args.endpoint is None else args.endpoint})", size, res))
        if args.backend in ("all", "local"):
            res = bench_local(engine, work, settings, args.rounds)
            out["local"] = res
            sections.append(report("Local directory backend", size, res))
        print(f"\nengine: {size / MiB:.0f} MiB, {os.cpu_count()} CPUs, workers={settings.workers},"
              f" part_size={settings.part_size // MiB} MiB\n")
        print("\n\n".join(sections))
        if args.json_out:
            args.json_out.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _given(endpoint: str) -> Iterator[str]:
    yield endpoint


if __name__ == "__main__":
    main()
