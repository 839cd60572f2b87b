#!/usr/bin/env bash
# Checks on a machine with two (or more) GPUs: the multi-GPU pytest files, then, under torchrun
# with NCCL (one process per GPU), the DDP loss-curve comparison and the DTensor checks with
# their full output; a short summary at the end. Exit status 0 when everything passed.
#
#   PYTHON=/path/to/python .ci/gpu_multi.sh      (default: python3; rope_kernels built)
#
# NVLink multicast is kept off for every process started here.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# A library built in place (setup.py build_ext --inplace) is used from the tree; an installed
# one otherwise (the tree's python/ without the library would shadow it).
if compgen -G "python/rope_kernels/_ops*.so" > /dev/null; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())") || exit 2
if [ "$gpus" -lt 2 ]; then
  echo "error: these checks need two GPUs; torch sees $gpus" >&2
  exit 2
fi
nvidia-smi topo -m 2>/dev/null || true  # how the GPUs are linked (peer-to-peer copies)

logs=$(mktemp -d)
summary=()
status=0
step() {  # step NAME LOG COMMAND...: runs COMMAND, shows and keeps its output, records the result
  local name=$1 log=$2
  shift 2
  echo "=== $name"
  if "$@" 2>&1 | tee "$logs/$log"; then
    summary+=("ok      $name")
  else
    summary+=("FAILED  $name")
    status=1
  fi
}
torchrun=("$PYTHON" -m torch.distributed.run --standalone --local-addr 127.0.0.1 --nproc-per-node 2)

# The NCCL torchrun tests of test_ddp.py/test_dtensor.py are the two steps after this one (run
# there directly, to show their output), so pytest leaves them out.
step "pytest: two GPUs in one process, DDP and DTensor on CPU, CUDA runtime" pytest.log \
  "$PYTHON" -m pytest -q -rs -k "not nccl" \
  tests/test_multi_gpu.py tests/test_cuda_runtime.py tests/test_ddp.py tests/test_dtensor.py
step "torchrun: DDP on 2 GPUs vs one GPU, 20 steps (NCCL)" ddp.log \
  "${torchrun[@]}" tests/distributed/ddp_train.py --backend nccl --steps 20
step "torchrun: DTensor sharding rule and tensor parallelism on 2 GPUs (NCCL)" dtensor.log \
  "${torchrun[@]}" tests/distributed/dtensor_check.py --backend nccl

echo
echo "=== summary"
grep -h -E "^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)" "$logs/pytest.log" | tail -1 || true
grep -h "^DDP (" "$logs/ddp.log" || true
grep -h "^DTensor checks on" "$logs/dtensor.log" || true
printf '%s\n' "${summary[@]}"
rm -rf "$logs"
exit $status
