#!/bin/sh
# Download the wheels bench/wheels.txt names, for the GPU machine's CPython 3.12 (x86-64 Linux), into
# bench/wheelhouse. On the GPU machine:
#   python -m pip install --no-index --find-links bench/wheelhouse -r bench/wheels.txt
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
"$python" -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$here/wheelhouse" -r "$here/wheels.txt"
du -sh "$here/wheelhouse"
