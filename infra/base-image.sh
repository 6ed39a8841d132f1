#!/usr/bin/env bash
# Make a Debian base image locally (no registry needed): debootstrap a minbase root file system with
# Python 3 and import it into the local Docker daemon.
#
#   infra/base-image.sh [IMAGE]        # default IMAGE: vlmforge-base:bookworm
#
# The image stands in for python:3.11-slim-bookworm as BASE_IMAGE of containers/cpu/Dockerfile:
# Debian bookworm with python3 (3.11), the venv module with ensurepip, and CA certificates.
#
# Environment:
#   SUITE=bookworm                      Debian suite
#   MIRROR=http://deb.debian.org/debian Debian mirror for debootstrap and the image's apt sources
#   INCLUDE=python3,python3-venv,ca-certificates   extra packages (comma separated)
#   FORCE=1                             rebuild even if IMAGE exists
# Needs root, debootstrap and a running daemon (infra/dockerd.sh).
set -euo pipefail

image=${1:-vlmforge-base:bookworm}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
include=${INCLUDE:-python3,python3-venv,ca-certificates}

if [ -z "${FORCE:-}" ] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "base-image: $image exists (FORCE=1 to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: run: apt-get install -y debootstrap" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "base-image: debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/vlmforge-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT

start=$(date +%s)
debootstrap --variant=minbase --include="$include" "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    echo "base-image: debootstrap failed; last lines of $root.log:" >&2
    tail -n 30 "$root.log" >&2
    exit 1
}
rm -f "$root.log"

# What the official Debian images do: full apt sources, no recommends, no caches, no docs.
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
SOURCES
cat >"$root/etc/apt/apt.conf.d/90vlmforge" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
       "$root"/var/log/*.log "$root"/var/log/apt/*

tar --numeric-owner -C "$root" -c . |
    docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase --include=$include $suite" \
        - "$image" >/dev/null
echo "base-image: $image, $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'), $(( $(date +%s) - start )) s"
