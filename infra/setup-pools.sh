#!/usr/bin/env bash
# Set up a Prefect server for vlmforge: work pools from infra/pools/, the `gpu` global concurrency
# limit, the Prefect variables that prefect.yaml reads, then the deployments.
#
#   infra/setup-pools.sh                       # everything, then prefect --no-prompt deploy --all
#   infra/setup-pools.sh build-engine-cpu ...  # ... then deploy only these deployments
#   DEPLOY=0 infra/setup-pools.sh              # no deploy
#
# Idempotent: pools are overwritten, the limit and the variables updated.
#
# Environment:
#   PREFECT_API_URL   the server (required: the docker worker refuses Prefect's temporary server)
#   GPU_POOL_TEMPLATE infra/pools/docker-gpu.json; CPU_POOL_TEMPLATE infra/pools/docker-cpu.json
#   KUBERNETES=1      also create the kubernetes pool `vlmforge-k8s-gpu` (infra/pools/kubernetes-gpu.json;
#                     docs/scaling.md), which needs prefect-kubernetes where workers run
#   GPU_SLOTS         size of the `gpu` global concurrency limit: the GPUs that builds may hold at
#                     once, fleet-wide (default: this host's GPUs from nvidia-smi, else 1)
#   VLMFORGE_STORE    store URL, saved as the Prefect variable vlmforge_store (prefect.yaml puts it
#                     into the runs' VLMFORGE_STORE); unset keeps the variable as it is
#   AWS_ENDPOINT_URL AWS_DEFAULT_REGION AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN
#                     those set are copied into the pools' env. The values are readable by anyone
#                     who can read the pool: for production prefer instance roles or a mounted
#                     credentials file, and leave the keys unset here
#   POOL_NETWORK      docker network for flow-run containers (infra/compose.yaml: vlmforge)
set -euo pipefail
cd "$(dirname "$0")/.."

prefect=${PREFECT:-prefect}
python=${PYTHON:-python3}
gpu_template=${GPU_POOL_TEMPLATE:-infra/pools/docker-gpu.json}
cpu_template=${CPU_POOL_TEMPLATE:-infra/pools/docker-cpu.json}

api=$("$python" -c 'from prefect.settings import get_current_settings as s; print(s().api.url or "")')
if [ -z "$api" ]; then
    echo "setup-pools: PREFECT_API_URL is not set; start a server (prefect server start) and export" >&2
    echo "  PREFECT_API_URL=http://127.0.0.1:4200/api: docker workers refuse the temporary server" >&2
    exit 1
fi
echo "setup-pools: server $api"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A pool template with this site's env (AWS_*) and network added to the variables' defaults.
site_template() {
    "$python" - "$1" "$2" <<'PY'
import json, os, sys
src, dst = sys.argv[1:]
t = json.load(open(src))
props = t["variables"]["properties"]
env = props["env"].setdefault("default", {})
for key in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    if os.environ.get(key):
        env[key] = os.environ[key]
if os.environ.get("POOL_NETWORK") and "networks" in props:
    props["networks"]["default"] = [os.environ["POOL_NETWORK"]]
json.dump(t, open(dst, "w"), indent=2)
print("  env: " + (", ".join(sorted(env)) or "none") +
      (f"; network {os.environ['POOL_NETWORK']}" if os.environ.get("POOL_NETWORK") else ""))
PY
}

pool() {  # NAME TYPE TEMPLATE
    echo "setup-pools: pool $1 ($2, $3)"
    site_template "$3" "$tmp/$1.json"
    "$prefect" --no-prompt work-pool create "$1" --type "$2" --base-job-template "$tmp/$1.json" --overwrite >/dev/null
}
pool vlmforge-gpu docker "$gpu_template"
pool vlmforge-cpu docker "$cpu_template"
if [ "${KUBERNETES:-0}" = 1 ]; then
    pool vlmforge-k8s-gpu kubernetes infra/pools/kubernetes-gpu.json
fi

if [ -z "${GPU_SLOTS:-}" ]; then
    GPU_SLOTS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [ "$GPU_SLOTS" -gt 0 ] || GPU_SLOTS=1
fi
if "$prefect" --no-prompt global-concurrency-limit inspect gpu >/dev/null 2>&1; then
    "$prefect" --no-prompt global-concurrency-limit update gpu --limit "$GPU_SLOTS" >/dev/null
else
    "$prefect" --no-prompt global-concurrency-limit create gpu --limit "$GPU_SLOTS" >/dev/null
fi
echo "setup-pools: global concurrency limit gpu = $GPU_SLOTS slots"

if [ -n "${VLMFORGE_STORE:-}" ]; then
    "$prefect" --no-prompt variable set vlmforge_store "$VLMFORGE_STORE" --overwrite >/dev/null
    echo "setup-pools: variable vlmforge_store = $VLMFORGE_STORE"
fi

if [ "${DEPLOY:-1}" = 1 ]; then
    if [ $# -gt 0 ]; then
        args=()
        for name in "$@"; do args+=(--name "$name"); done
        "$prefect" --no-prompt deploy "${args[@]}"
    else
        "$prefect" --no-prompt deploy --all
    fi
fi
