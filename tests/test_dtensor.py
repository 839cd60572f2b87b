"""DTensor arguments: the op's sharding rule gives the unsharded result over batch, heads or
sequence splits, and `import rope_kernels` registers it without importing DTensor itself.

The sharded checks run in tests/distributed/dtensor_check.py under torchrun: on the CPU with gloo
everywhere (CI), with NCCL, one process per GPU, where two GPUs exist.
"""
from __future__ import annotations

import pytest
import torch

from multi_process import run_torchrun
from rope_env import requires_two_gpus, run_fresh_python

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def test_sharded_op_on_cpu_with_gloo() -> None:
    output = run_torchrun("dtensor_check.py", "--backend", "gloo")
    assert "DTensor checks on 2 x cpu (gloo): all ok" in output


@requires_two_gpus
def test_sharded_op_on_two_gpus_with_nccl() -> None:
    output = run_torchrun("dtensor_check.py", "--backend", "nccl")
    assert "DTensor checks on 2 x cuda (nccl): all ok" in output


# A one-process DTensor program (world size 1) calling the op on a DTensor: it fails with DTensor's
# "no sharding strategy" error unless the rule is registered. IMPORTS says what comes first.
REGISTERED_WHATEVER_THE_IMPORT_ORDER = """
import sys
import warnings
warnings.simplefilter("error")  # a failed registration only warns: make it fail here
import torch
import torch.distributed as dist

IMPORTS
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
case = RopeCase(positions="bs:int64")
args = make_args(case, "cpu")
placed = [distribute_tensor(t, mesh, [Shard(0)]) for t in (args.q, args.k)]
placed += [distribute_tensor(t, mesh, [Replicate()]) for t in (args.cos, args.sin)]
placed.append(distribute_tensor(args.positions, mesh, [Shard(0)]))
for out, ref in zip(torch.ops.rope.fused_qk(*placed), reference_fused_qk(args)):
    assert out.placements == (Shard(0),), out.placements
    assert_close_to_reference(out.full_tensor(), ref, case.dtype)
dist.destroy_process_group()
print("registered: ok")
"""

IMPORT_ORDERS = {
    # The common case, and the one that keeps `import rope_kernels` fast: DTensor comes later.
    "rope_kernels_first": """
import rope_kernels
assert "torch.distributed.tensor" not in sys.modules, "import rope_kernels imported DTensor"
""",
    "dtensor_first": """
import torch.distributed.tensor
import rope_kernels
""",
    # DTensor imported in the middle of another package's import (FSDP2 builds on it).
    "rope_kernels_then_fsdp": """
import rope_kernels
from torch.distributed.fsdp import fully_shard
""",
}


@pytest.mark.parametrize("order", list(IMPORT_ORDERS))
def test_rule_is_registered_whatever_the_import_order(order: str) -> None:
    run_fresh_python(REGISTERED_WHATEVER_THE_IMPORT_ORDER.replace("IMPORTS", IMPORT_ORDERS[order]))
