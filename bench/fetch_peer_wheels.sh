#!/usr/bin/env bash
# Downloads the peers the benchmark measures into .whl/ of the repository root, for a GPU machine
# that cannot reach a package index:
#   - Liger-Kernel's wheel (its Triton RoPE); its only needs, torch and triton, are already where
#     the benchmark runs, so the wheel is fetched without them;
#   - flash-attn's Triton rotary, flash_attn/ops/triton/rotary.py, taken out of flash-attn's source
#     distribution as .whl/flash_attn_rotary.py (the benchmark imports that file by path: it needs
#     torch and triton only, not flash-attn's CUDA build). Its first line names the version.
#
#   here:       PYTHON=.venv/bin/python bash bench/fetch_peer_wheels.sh
#               (PYTHON: a Python with pip and torch: flash-attn's setup.py imports torch to
#               describe itself, even for a download)
#   there:      python3 -m pip install --no-index --no-deps --target peer-packages .whl/*.whl
#               PYTHONPATH=peer-packages python3 -m bench --out results
#
# With an index at hand, `pip install liger-kernel==VERSION` does the same for Liger; an installed
# flash-attn is used where .whl/flash_attn_rotary.py is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
FLASH_ATTN_VERSION="${FLASH_ATTN_VERSION:-2.8.3}"
PYTHON="${PYTHON:-python3}"

mkdir -p .whl
# A pure-Python wheel: any target Python 3 takes it, whatever this machine runs.
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel==${LIGER_VERSION}"

# flash-attn's source distribution, into a scratch folder: only one file of it is kept.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip download --no-deps --no-binary :all: \
  --no-build-isolation -d "$scratch" "flash-attn==${FLASH_ATTN_VERSION}"
sdist="$scratch/flash_attn-${FLASH_ATTN_VERSION}.tar.gz"
member="flash_attn-${FLASH_ATTN_VERSION}/flash_attn/ops/triton/rotary.py"
{
  echo "# flash-attn ${FLASH_ATTN_VERSION} (${member#*/}, from its source distribution on PyPI)"
  tar -xzf "$sdist" -O "$member"
} > "$scratch/flash_attn_rotary.py"
mv "$scratch/flash_attn_rotary.py" .whl/flash_attn_rotary.py
ls -l .whl
