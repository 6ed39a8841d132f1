#!/usr/bin/env bash
# Fill a wheelhouse for offline image builds: every wheel containers/cpu/Dockerfile installs
# (vlmforge's dependencies with EXTRAS, CPU torch, EXTRA_REQUIREMENTS, the build backend), taken
# from this machine's pip sources (its index, find-links such as /opt/wheels, its cache).
#
#   infra/wheelhouse.sh [DIR]          # default DIR: build/wheelhouse (ignored by git and docker)
#
# Environment:
#   PYTHON=python3          an interpreter of the image's Python minor version and platform (3.11,
#                           Linux x86_64, glibc >= the image's): pip picks wheels for it
#   BASE_IMAGE              the image's base; when docker has it, its exact Python version decides
#                           the environment markers (default vlmforge-base:bookworm, whose Debian
#                           3.11.2 needs more than a newer 3.11 does); IMAGE_PYTHON_FULL sets it directly
#   EXTRAS=hf,s3,serve      vlmforge extras (as in the Dockerfile)
#   TORCH_VERSION=2.13.0
#   MORE_REQUIREMENTS="prefect-docker==0.7.4 moto[server]"  what else the images install: the cpu
#                           image's EXTRA_REQUIREMENTS, the moto image of infra/compose.yaml
#   FORCE=1                 refill even when the inputs did not change
# Sources without wheels are built here (pip wheel), so the image build needs no compiler.
# DIR/.inputs records a digest of the inputs (pyproject.toml, constraints.txt, the settings above):
# when they did not change, the script leaves DIR as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:-build/wheelhouse}
python=${PYTHON:-python3}
extras=${EXTRAS:-hf,s3,serve}
torch_version=${TORCH_VERSION:-2.13.0}
more_requirements=${MORE_REQUIREMENTS-prefect-docker==0.7.4 moto[server]}
base_image=${BASE_IMAGE:-vlmforge-base:bookworm}

have=$("$python" -c 'import platform; print(platform.python_version())')
image_full=${IMAGE_PYTHON_FULL:-}
if [ -z "$image_full" ] && docker image inspect "$base_image" >/dev/null 2>&1; then
    image_full=$(docker run --rm --entrypoint python3 "$base_image" -c 'import platform; print(platform.python_version())')
fi
image_full=${image_full:-$have}
if [ "${have%.*}" != "${image_full%.*}" ]; then
    echo "wheelhouse: $python is Python $have; the image has $image_full (set PYTHON=python${image_full%.*})" >&2
    exit 1
fi
for f in pyproject.toml constraints.txt; do
    [ -f "$f" ] || { echo "wheelhouse: $f is missing in $(pwd)" >&2; exit 1; }
done

inputs=$(cat pyproject.toml constraints.txt infra/wheelhouse.sh infra/wheelhouse_markers.py - <<<"$extras $torch_version $more_requirements $image_full" | sha256sum | cut -c1-16)
if [ -z "${FORCE:-}" ] && [ "$(cat "$dir/.inputs" 2>/dev/null)" = "$inputs" ] && compgen -G "$dir/*.whl" >/dev/null; then
    echo "wheelhouse: $dir is up to date ($(ls "$dir"/*.whl | wc -l) wheels; FORCE=1 to refill)"
    exit 0
fi
mkdir -p "$dir"
rm -f "$dir/.inputs"
start=$(date +%s)
# pip wheel: wheels are copied as they are, sdists are built; vlmforge itself is built too and removed
# (the image installs it from its source).
# shellcheck disable=SC2086
"$python" -m pip wheel --quiet --wheel-dir "$dir" -c constraints.txt \
    "torch==$torch_version" ".[$extras]" $more_requirements
rm -f "$dir"/vlmforge-*.whl
rm -rf build/lib build/bdist.* ./*.egg-info
# Dependencies that only the image's Python patch release needs (markers pip evaluated for $have).
for _ in 1 2 3; do
    mapfile -t more < <("$python" infra/wheelhouse_markers.py "$dir" "$image_full")
    [ ${#more[@]} -gt 0 ] || break
    echo "wheelhouse: for Python $image_full also: ${more[*]}"
    "$python" -m pip wheel --quiet --wheel-dir "$dir" -c constraints.txt "${more[@]}"
done
# The build backend of vlmforge (pip builds the source in an isolated environment from the wheelhouse).
mapfile -t backend < <("$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml","rb"))["build-system"]["requires"]))')
"$python" -m pip download --quiet --only-binary=:all: --dest "$dir" "${backend[@]}"

echo "$inputs" >"$dir/.inputs"
echo "wheelhouse: $dir for Python $image_full: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1), $(( $(date +%s) - start )) s"
