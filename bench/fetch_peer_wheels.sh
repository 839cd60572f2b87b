#!/usr/bin/env bash
# Downloads the wheel of the peer the benchmark measures (Liger-Kernel's Triton RoPE) into .whl/
# of the repository root, for a GPU machine that cannot reach a package index. Its only needs,
# torch and triton, are already where the benchmark runs, so the wheel is fetched without them.
#
#   here:       bash bench/fetch_peer_wheels.sh            (PYTHON=... to pick the pip)
#   there:      python3 -m pip install --no-index --no-deps --target peer-packages .whl/*.whl
#               PYTHONPATH=peer-packages python3 -m bench --out results
#
# With an index at hand, `pip install liger-kernel==VERSION` does the same.
set -euo pipefail
cd "$(dirname "$0")/.."

LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
PYTHON="${PYTHON:-python3}"

mkdir -p .whl
# A pure-Python wheel: any target Python 3 takes it, whatever this machine runs.
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel==${LIGER_VERSION}"
ls -l .whl
