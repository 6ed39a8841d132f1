#!/usr/bin/env bash
# Start the Docker daemon in the background (as root) unless one already answers, then wait for it.
#
#   infra/dockerd.sh            # idempotent: prints the daemon version when it is ready
#
# Environment:
#   DOCKERD_LOG      where dockerd writes its log (default /var/log/dockerd.log)
#   DOCKERD_TIMEOUT  seconds to wait for the socket (default 60)
#   DOCKER_HOST      honoured by the client; this script only starts the local unix-socket daemon
#
# Machines without systemd (containers, CI runners) have no service manager to start dockerd:
# this script is that service manager. It never stops a running daemon.
set -euo pipefail

log=${DOCKERD_LOG:-/var/log/dockerd.log}
timeout=${DOCKERD_TIMEOUT:-60}
# Docker 20.10 (Debian's docker.io) ships its own client in /usr/bin; a newer client elsewhere on PATH
# also works for everything here except BuildKit builds without buildx (see infra/build-images.sh).
docker_cli=$(command -v docker || true)

ready() { [ -n "$docker_cli" ] && "$docker_cli" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if ready; then
    echo "dockerd: already running (server $("$docker_cli" version --format '{{.Server.Version}}'))"
    exit 0
fi
if ! command -v dockerd >/dev/null; then
    echo "dockerd: not installed; run: apt-get install -y docker.io" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "dockerd: must start as root (current uid $(id -u)); run: sudo $0" >&2
    exit 1
fi
if [ -z "$docker_cli" ]; then
    echo "dockerd: no docker client on PATH; run: apt-get install -y docker.io" >&2
    exit 1
fi

mkdir -p "$(dirname "$log")"
# setsid: the daemon must outlive this shell and the job that called it.
setsid nohup dockerd >>"$log" 2>&1 </dev/null &
pid=$!
echo "dockerd: started pid $pid, log $log"

for _ in $(seq "$timeout"); do
    if ready; then
        echo "dockerd: ready (server $("$docker_cli" version --format '{{.Server.Version}}'))"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "dockerd: exited during start-up; last lines of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    sleep 1
done
echo "dockerd: no answer on the socket after ${timeout}s; last lines of $log:" >&2
tail -n 20 "$log" >&2
exit 1
