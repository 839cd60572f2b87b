"""Running the scripts of tests/distributed under torchrun, one process per GPU (or CPU process).

Every launch keeps NVLink multicast off (NCCL NVLS, symmetric memory and NVSHMEM multicast):
multi-GPU runs must not depend on it.
"""
from __future__ import annotations

import os
import subprocess
import sys

from rope_env import TESTS_DIR

DISTRIBUTED_DIR = os.path.join(TESTS_DIR, "distributed")

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 600.0) -> str:
    """`torchrun --nproc-per-node nproc tests/distributed/<script> args...` on this machine; returns
    the output of all processes (stdout and stderr together) and fails the test on exit != 0."""
    env = dict(os.environ)
    env.update(NO_MULTICAST_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # small models: threads would only contend
    # --standalone: a rendezvous on a free local port, so concurrent runs do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
               "--nproc-per-node", str(nproc), os.path.join(DISTRIBUTED_DIR, script), *args]
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(command[1:])} exited with {proc.returncode}\n{proc.stdout}"
    return proc.stdout
