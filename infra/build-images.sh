#!/usr/bin/env bash
# Build vlmforge's images with BuildKit from the repository root.
#
#   infra/build-images.sh [cpu] [builder] [runner] [runner-cpu] [moto]     # default: cpu
#
# Images (tag $TAG, default "local"; never "latest", which the docker worker would try to pull):
#   cpu      vlmforge-cpu:$TAG      containers/cpu/Dockerfile on $CPU_BASE_IMAGE
#   builder  vlmforge-builder:$TAG  containers/builder/Dockerfile on $BUILDER_BASE_IMAGE (TensorRT-LLM 1.2)
#   runner   vlmforge-runner:$TAG   containers/runner/Dockerfile on $RUNNER_BASE_IMAGE (default: the
#                                   builder image, so engines and runtime share one TensorRT)
#   runner-cpu vlmforge-runner-cpu:$TAG  containers/runner/Dockerfile on vlmforge-cpu:$TAG
#   moto     vlmforge-moto:$TAG     containers/moto/Dockerfile: an S3 server for infra/compose.yaml
#
# Environment:
#   WHEELHOUSE=build/wheelhouse  wheels from infra/wheelhouse.sh; when it holds wheels, pip installs
#                                offline from it (a named build context with buildx, else an image
#                                vlmforge-wheelhouse:$TAG made from the directory)
#   CPU_BASE_IMAGE               default vlmforge-base:bookworm when that image exists (infra/base-image.sh),
#                                else python:3.11-slim-bookworm
#   BUILDER_BASE_IMAGE           default nvcr.io/nvidia/tensorrt-llm/release:1.2.0
#   RUNNER_BASE_IMAGE            default vlmforge-builder:$TAG
#   SSL_CERT_FILE                passed as the BuildKit secret `ca` when set (TLS-intercepting proxies)
#   BUILD_ARGS                   more `docker build` arguments (e.g. "--no-cache --progress=plain")
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${TAG:-local}
wheelhouse=${WHEELHOUSE:-build/wheelhouse}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu)

# A client that builds with BuildKit: docker buildx (Docker >= 23 needs it), or a pre-23 client with
# DOCKER_BUILDKIT=1 (Debian's docker.io 20.10 in /usr/bin). The BuildKit "docker" driver sees the
# daemon's local images, which FROM and the wheelhouse image need.
build=()
while read -r cli; do
    if "$cli" buildx version >/dev/null 2>&1; then
        build=("$cli" buildx build --builder default --load)
        buildx=1
        break
    fi
    version=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$version" ] && [ "${version%%.*}" -lt 23 ]; then
        build=(env DOCKER_BUILDKIT=1 "$cli" build)
        buildx=0
        break
    fi
done < <(which -a docker | awk '!seen[$0]++')
if [ ${#build[@]} -eq 0 ]; then
    echo "build-images: no docker client with BuildKit: install docker-buildx, or Debian's docker.io" >&2
    exit 1
fi

common=()
if [ -n "${SSL_CERT_FILE:-}" ] && [ -s "$SSL_CERT_FILE" ]; then
    common+=(--secret "id=ca,src=$SSL_CERT_FILE")
fi
if compgen -G "$wheelhouse/*.whl" >/dev/null; then
    if [ "$buildx" = 1 ]; then
        common+=(--build-context "wheelhouse=$wheelhouse")
    else
        t0=$(date +%s)
        "${build[@]}" --quiet -f containers/wheelhouse.Dockerfile -t "vlmforge-wheelhouse:$tag" "$wheelhouse" >/dev/null
        echo "build-images: vlmforge-wheelhouse:$tag from $wheelhouse ($(( $(date +%s) - t0 )) s)"
        common+=(--build-arg "WHEELHOUSE_IMAGE=vlmforge-wheelhouse:$tag")
    fi
else
    echo "build-images: no wheels in $wheelhouse: pip installs from the network (infra/wheelhouse.sh makes it offline)"
fi
# shellcheck disable=SC2206
common+=(${BUILD_ARGS:-})

if [ -z "${CPU_BASE_IMAGE:-}" ]; then
    if docker image inspect vlmforge-base:bookworm >/dev/null 2>&1; then
        CPU_BASE_IMAGE=vlmforge-base:bookworm
    else
        CPU_BASE_IMAGE=python:3.11-slim-bookworm
    fi
fi

for target in "${targets[@]}"; do
    dockerfile=containers/$target/Dockerfile
    case $target in
        cpu)        base=$CPU_BASE_IMAGE ;;
        builder)    base=${BUILDER_BASE_IMAGE:-nvcr.io/nvidia/tensorrt-llm/release:1.2.0} ;;
        runner)     base=${RUNNER_BASE_IMAGE:-vlmforge-builder:$tag} ;;
        runner-cpu) base=vlmforge-cpu:$tag; dockerfile=containers/runner/Dockerfile ;;
        moto)       base=$CPU_BASE_IMAGE ;;
        *) echo "build-images: unknown image $target (cpu, builder, runner, runner-cpu, moto)" >&2; exit 1 ;;
    esac
    t0=$(date +%s)
    "${build[@]}" "${common[@]}" --build-arg "BASE_IMAGE=$base" \
        -f "$dockerfile" -t "vlmforge-$target:$tag" .
    size=$(docker image inspect -f '{{.Size}}' "vlmforge-$target:$tag" | awk '{printf "%.0f MB", $1/1e6}')
    echo "build-images: vlmforge-$target:$tag on $base: $size, $(( $(date +%s) - t0 )) s"
done
