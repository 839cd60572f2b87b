#!/usr/bin/env bash
# compute-sanitizer over tests/sanitizer_calls.py: every built kernel variant and every launcher
# path (ops, row sources, layouts, grid orders, table forms, empty and misaligned tensors), on
# exact-size buffers with the caching allocator off, under memcheck, racecheck, initcheck and
# synccheck; each call is also checked against the float64 reference. A short summary at the end;
# exit status 0 when every tool reported no error and every call matched.
#
#   PYTHON=/path/to/python .ci/gpu_sanitizer.sh [TOOL...]     (default: all four tools)
#
# Needs a GPU, compute-sanitizer (on PATH or in $CUDA_HOME/bin) and rope_kernels built.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# A library built in place is used from the tree; an installed one otherwise.
if compgen -G "python/rope_kernels/_ops*.so" > /dev/null; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ ! -x "$sanitizer" ]; then
  echo "error: compute-sanitizer not found on PATH or in \$CUDA_HOME/bin" >&2
  exit 2
fi
tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(memcheck racecheck initcheck synccheck)

# Every tensor its own device allocation, so that one element past any buffer is outside it.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
logs=$(mktemp -d)
summary=()
status=0
for tool in "${tools[@]}"; do
  echo "=== compute-sanitizer --tool $tool"
  start=$SECONDS
  "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 \
    "$PYTHON" tests/sanitizer_calls.py --device cuda 2>&1 | tee "$logs/$tool.log"
  rc=${PIPESTATUS[0]}
  found=$(grep -h -E "(ERROR|RACECHECK) SUMMARY" "$logs/$tool.log" | tail -1 | sed 's/^=* *//')
  result=$(grep -h -E "^[0-9]+ calls on" "$logs/$tool.log" | tail -1)
  if [ "$rc" -eq 0 ]; then
    summary+=("ok      $tool ($((SECONDS - start)) s): ${found:-no summary}; ${result:-}")
  else
    summary+=("FAILED  $tool (exit $rc, $((SECONDS - start)) s): ${found:-no summary}; ${result:-no result}")
    status=1
  fi
done

echo
echo "=== summary"
"$sanitizer" --version | tail -1
printf '%s\n' "${summary[@]}"
rm -rf "$logs"
exit $status
