"""DTensor arguments: the op's sharding rule gives the unsharded result over batch, heads or
sequence splits, with every layout and option, and `import rope_kernels` registers it without
importing DTensor itself.

The sharded checks run under torchrun: on the CPU with gloo everywhere (CI), with NCCL, one process
per GPU, where two GPUs exist. Those of the layouts and options run in
tests/distributed/dtensor_options_check.py, once per backend for all cases; each case is then one test.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import pytest
import torch

from multi_process import DISTRIBUTED_DIR, run_torchrun
from rope_env import requires_two_gpus, run_fresh_python

# The option cases are defined once, in the script that runs them; the tests take their names.
if DISTRIBUTED_DIR not in sys.path:
    sys.path.append(DISTRIBUTED_DIR)
from dtensor_options_check import ALL_CASE_NAMES, HEAD_DIM, TABLE_ROWS  # noqa: E402

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


# ----------------------------------------------------------------------------------------------
# Layouts and options, sharded over two processes


def _option_results(backend: str) -> Dict[str, str]:
    """Each case's outcome under torchrun on two processes: "ok", or what failed."""
    output = run_torchrun("dtensor_options_check.py", "--backend", backend, timeout=300.0)
    results: Dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("case "):
            name, _, outcome = line[len("case "):].partition(": ")
            results[name] = outcome
    return results


@pytest.fixture(scope="module")
def gloo_results() -> Dict[str, str]:
    return _option_results("gloo")


@pytest.fixture(scope="module")
def nccl_results() -> Dict[str, str]:
    return _option_results("nccl")


@pytest.mark.parametrize("name", ALL_CASE_NAMES)
def test_options_sharded_on_cpu_with_gloo(gloo_results: Dict[str, str], name: str) -> None:
    assert gloo_results.get(name) == "ok", gloo_results.get(name, "not run")


@requires_two_gpus
@pytest.mark.parametrize("name", ALL_CASE_NAMES)
def test_options_sharded_on_two_gpus_with_nccl(nccl_results: Dict[str, str], name: str) -> None:
    assert nccl_results.get(name) == "ok", nccl_results.get(name, "not run")


def _spec(*shape: int) -> SimpleNamespace:
    """What the rule reads of a DTensor's spec: its shape and number of dimensions."""
    return SimpleNamespace(shape=torch.Size(shape), ndim=len(shape))


def _q_placements(rows: List[Any]) -> List[Tuple[Any, Any]]:
    return [(inputs[0], inputs[1]) for _, inputs in rows]


def test_rule_rows_follow_the_layout() -> None:
    """The rows themselves: which dims of q/k may be split, and where cu_seqlens and seqlen_offsets go."""
    from torch.distributed.tensor import Replicate, Shard

    from rope_kernels._dtensor_sharding import rope_shardings

    table = _spec(TABLE_ROWS, HEAD_DIM // 2)
    r = Replicate()
    bshd = rope_shardings(_spec(2, 7, 4, 32), _spec(2, 7, 2, 32), table, table, _spec(2, 7), layout="bshd",
                          interleaved=True, interleaved_out=False, rotary_dim=16)
    assert _q_placements(bshd) == [(r, r), (r, Shard(2)), (Shard(2), r), (Shard(2), Shard(2)),
                                   (Shard(0), Shard(0)), (Shard(1), Shard(1))]
    assert bshd[-1][1][4] == Shard(1)  # (B, S) positions split along the sequence
    thd_q, thd_k = _spec(13, 4, 32), _spec(13, 2, 32)
    with_positions = rope_shardings(thd_q, thd_k, table, table, _spec(13), layout="thd")
    assert (Shard(0), Shard(0)) in _q_placements(with_positions)
    assert with_positions[-1][1][4] == Shard(0)
    for packed in ({"cu_seqlens": _spec(4)}, {"cu_seqlens": _spec(4), "seqlen_offsets": _spec(3)}):
        rows = rope_shardings(thd_q, thd_k, table, table, None, layout="thd", **packed)
        assert _q_placements(rows) == [(r, r), (r, Shard(1)), (Shard(1), r), (Shard(1), Shard(1))]
        for outputs, inputs in rows:  # q_out, k_out; q, k, cos, sin, positions, then cu_seqlens (and offsets)
            offsets = r if "seqlen_offsets" in packed else None
            assert inputs[2:] == [r, r, None, r, offsets] and outputs == inputs[:2]
    no_positions = rope_shardings(thd_q, thd_k, table, table, None, layout="thd")
    assert all(Shard(0) not in pair for pair in _q_placements(no_positions))

