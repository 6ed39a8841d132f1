#!/usr/bin/env python3
"""Write vlmforge's work pool base job templates from Prefect's defaults.

    prefect work-pool get-default-base-job-template --type docker > /tmp/docker.json
    prefect work-pool get-default-base-job-template --type kubernetes > /tmp/kubernetes.json
    python infra/pools/generate.py /tmp/docker.json /tmp/kubernetes.json

writes docker-gpu.json, docker-cpu.json and kubernetes-gpu.json next to this file, or into --out DIR
(the docker default needs prefect-docker installed, the kubernetes one prefect-kubernetes; without
the kubernetes default, only the docker templates are written). Run it again after upgrading
either and review the diff. What vlmforge changes is all below: defaults of existing variables for the
docker pools; for Kubernetes, new variables, each referenced in job_configuration (Prefect drops
variables that are not).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

HERE = Path(__file__).parent
CACHE = "/var/cache/vlmforge"  # VLMFORGE_CACHE in the images
WORK = "/var/lib/vlmforge/work"  # VLMFORGE_WORKDIR in the images
ENV = {"VLMFORGE_CACHE": CACHE, "VLMFORGE_WORKDIR": WORK}

# All GPUs of the host (count -1), as `docker run --gpus all`; docker-py takes these dicts as
# DeviceRequest(**dict). There is no `gpus` key (PrefectHQ/prefect#16144).
GPU_CONTAINER_KWARGS = {
    "device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}],
    # NCCL and TensorRT-LLM's multi-GPU runs use /dev/shm; Docker's default is 64 MB.
    "shm_size": "16g",
    # NVIDIA's recommended limits for TensorRT-LLM containers.
    "ulimits": [
        {"name": "memlock", "soft": -1, "hard": -1},
        {"name": "stack", "soft": 67108864, "hard": 67108864},
    ],
    # An init process (Docker's tini) as PID 1 forwards signals and reaps mpirun's children.
    "init": True,
}
CPU_CONTAINER_KWARGS = {"shm_size": "2g", "init": True}


def set_default(template: dict, variable: str, value) -> None:
    template["variables"]["properties"][variable]["default"] = value


def docker(default: dict, image: str, container_kwargs: dict, description: str) -> dict:
    t = copy.deepcopy(default)
    t["variables"]["description"] = description + "\n\n" + t["variables"]["description"]
    set_default(t, "image", image)
    # A tag other than `latest` with IfNotPresent: local builds run as they are; a registry image is
    # pulled once. (Without a policy, a `latest` tag would be pulled on every run.)
    set_default(t, "image_pull_policy", "IfNotPresent")
    set_default(t, "env", dict(ENV))
    # Named volumes: created on first use, shared by the runs on one host.
    set_default(t, "volumes", [f"vlmforge-cache:{CACHE}", f"vlmforge-work:{WORK}"])
    set_default(t, "container_create_kwargs", container_kwargs)
    # Logs and results live in Prefect and the store; exited containers would pile up.
    set_default(t, "auto_remove", True)
    return t


def kubernetes(default: dict) -> dict:
    t = copy.deepcopy(default)
    props = t["variables"]["properties"]
    props["env"]["default"] = dict(ENV)
    # A pod waits Pending until a node has free GPUs; past this the worker reports the run crashed.
    props["pod_watch_timeout_seconds"]["default"] = 3600
    props["gpu_count"] = {
        "title": "GPUs",
        "description": "nvidia.com/gpu limit of the job's pod: the GPUs one build gets.",
        "type": "integer",
        "minimum": 0,
        "default": 1,
    }
    props["node_selector"] = {
        "title": "Node selector",
        "description": "Labels of the nodes the pod may run on (GPU Feature Discovery sets these).",
        "type": "object",
        "additionalProperties": {"type": "string"},
        "default": {"nvidia.com/gpu.present": "true"},
    }
    props["tolerations"] = {
        "title": "Tolerations",
        "description": "Tolerations of the pod: GPU nodes are usually tainted nvidia.com/gpu.",
        "type": "array",
        "items": {"type": "object"},
        "default": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    props["shm_size"] = {
        "title": "Shared memory",
        "description": "Size of the memory-backed /dev/shm (NCCL, TensorRT-LLM multi-GPU).",
        "type": "string",
        "default": "16Gi",
    }
    props["cache_claim"] = {
        "title": "Model cache claim",
        "description": f"PersistentVolumeClaim mounted at {CACHE} (ReadWriteMany to share it across nodes).",
        "type": "string",
        "default": "vlmforge-cache",
    }
    props["workdir_size"] = {
        "title": "Work dir size",
        "description": f"Size limit of the emptyDir at {WORK} (checkpoints and engines before upload).",
        "type": "string",
        "default": "200Gi",
    }
    job = t["job_configuration"]["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["volumes"] = [
        {"name": "cache", "persistentVolumeClaim": {"claimName": "{{ cache_claim }}"}},
        {"name": "work", "emptyDir": {"sizeLimit": "{{ workdir_size }}"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}},
    ]
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["volumeMounts"] = [
        {"name": "cache", "mountPath": CACHE},
        {"name": "work", "mountPath": WORK},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return t


def write(out: Path, name: str, template: dict) -> None:
    (out / name).write_text(json.dumps(template, indent=2) + "\n")
    print(f"wrote {out / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docker_default", type=Path)
    parser.add_argument("kubernetes_default", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    d = json.loads(args.docker_default.read_text())
    write(args.out, "docker-gpu.json", docker(d, "vlmforge-builder:local", GPU_CONTAINER_KWARGS,
          "vlmforge GPU builds: all the host's GPUs, 16 GB /dev/shm, model cache and work dir volumes."))
    write(args.out, "docker-cpu.json", docker(d, "vlmforge-cpu:local", CPU_CONTAINER_KWARGS,
          "vlmforge CPU runs (CI, small models, watch and gc): model cache and work dir volumes."))
    if args.kubernetes_default:
        write(args.out, "kubernetes-gpu.json", kubernetes(json.loads(args.kubernetes_default.read_text())))


if __name__ == "__main__":
    main()
