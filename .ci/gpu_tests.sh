#!/usr/bin/env bash
# The whole test suite on a machine with a GPU, spread over pytest-xdist workers: every test's
# outcome is written to a log as it finishes (so a run cut short still says what passed), and a
# summary follows: the counts, the failures, the slowest tests. Exit status: pytest's.
#
#   PYTHON=/path/to/python .ci/gpu_tests.sh [PYTEST ARGS...]    (default: tests; rope_kernels built)
#   WORKERS=16 LOG=gpu-tests.log .ci/gpu_tests.sh -k cuda tests/test_transformers_families.py
#
# Needs pytest-xdist beside pytest. Each worker's torch takes its share of the cores
# (tests/conftest.py), and tests go to workers one by one (--dist load), not file by file: the
# family tests are one large file.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORKERS=${WORKERS:-$(nproc)}
LOG=${LOG:-gpu-tests.log}
# A library built in place is used from the tree; an installed one otherwise.
if compgen -G "python/rope_kernels/_ops*.so" > /dev/null; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "error: torch sees no GPU here; the CUDA tests would all skip" >&2
  exit 2
}
"$PYTHON" -c "import xdist" 2> /dev/null || {
  echo "error: pytest-xdist is not installed for $PYTHON" >&2
  exit 2
}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests)

"$PYTHON" -m pytest -n "$WORKERS" --dist load -p no:cacheprovider -v -rfE --durations=15 "${args[@]}" > "$LOG" 2>&1
status=$?
echo "pytest exit status $status; every outcome in $LOG"
grep -E "^(FAILED|ERROR) " "$LOG" | head -50
sed -n '/slowest .*durations/,/^=/p' "$LOG" | sed '$d' | head -16
tail -1 "$LOG"
exit $status
