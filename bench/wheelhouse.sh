#!/bin/sh
# Download the wheels a list names (default: bench/wheels.txt; also bench/wheels-modelopt.txt), for the GPU
# machine's CPython 3.12 (x86-64 Linux), into bench/wheelhouse. On the GPU machine:
#   python -m pip install --no-index --find-links bench/wheelhouse -r bench/wheels.txt [-r bench/wheels-modelopt.txt]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
[ $# -gt 0 ] || set -- "$here/wheels.txt"
for list in "$@"; do
  "$python" -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$here/wheelhouse" -r "$list"
done
du -sh "$here/wheelhouse"
