"""The process group and device mesh of a DTensor check script under torchrun: one process per GPU
with NCCL (cuda:LOCAL_RANK), or CPU processes with gloo.

Importing this module changes nothing; `start` reads the script's command line and sets the
process up, `finish` tears it down.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from typing import Dict, List, NoReturn, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# NVLink multicast (NCCL NVLS, symmetric memory and NVSHMEM multicast) stays off: multi-GPU runs
# must not depend on it.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# A rank stuck in a collective after its peer failed gives up in a minute, not half an hour.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)

# The dtypes the checks run in: half and full precision on a GPU, full and double on the CPU.
DTYPES: Dict[str, Tuple[torch.dtype, ...]] = {"cuda": (torch.bfloat16, torch.float32),
                                              "cpu": (torch.float32, torch.float64)}


@dataclasses.dataclass(frozen=True)
class Group:
    backend: str  # "nccl" or "gloo"
    rank: int
    world: int
    device: str  # "cuda" or "cpu"
    mesh: DeviceMesh  # one dimension over every rank
    dtypes: Tuple[torch.dtype, ...]


def start(description: Optional[str], argv: Optional[List[str]] = None) -> Group:
    """Join the torchrun job with the backend of the command line (`--backend nccl` or `gloo`) and
    build its one-dimensional mesh. Exits with status 2 when the process was not started by torchrun."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["nccl", "gloo"], required=True,
                        help="nccl: one GPU per process (cuda:LOCAL_RANK); gloo: CPU")
    backend = parser.parse_args(argv).backend
    if "RANK" not in os.environ:
        print("run under torchrun (torchrun --nproc-per-node 2 ...)", file=sys.stderr)
        raise SystemExit(2)
    # Read when NCCL creates its first communicator, which init_process_group does with device_id.
    os.environ.update(NO_MULTICAST_ENV)
    gpu = None
    if backend == "nccl":
        gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(gpu)
    # The GPU named up front binds NCCL to it at once (collectives need not guess the device).
    dist.init_process_group(backend, device_id=gpu, timeout=COLLECTIVE_TIMEOUT)
    device = "cpu" if gpu is None else "cuda"
    world = dist.get_world_size()
    return Group(backend, dist.get_rank(), world, device, init_device_mesh(device, (world,)), DTYPES[device])


def finish() -> NoReturn:
    """Tear the process group down once every rank is done with it, and end the process."""
    # Both ranks finish every collective before the teardown: a rank that tears gloo down while
    # its peer is still using the connection can be aborted (seen once in CI).
    dist.barrier()
    dist.destroy_process_group()
    # Then the process ends without the interpreter's teardown: the objects gloo leaves behind,
    # destroyed at interpreter exit, aborted a rank once in CI ("terminate called without an
    # active exception", after every check had passed). Everything is reported by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
