"""The launch plan (plan_launch in csrc/cuda/launch_plan.cpp, read through rope::_launch_plan).

On the CPU, anywhere: the plan's choices for inputs of every grid order, grid class, alignment
and head size (the plan reads tensor metadata only, so CPU tensors stand in for CUDA ones), and
its heads per program and warps against the launch table the build compiled (kernels/aot_specs).

On a GPU: one call is one kernel launch and nothing else (no copy of a transposed view, no fill
of the outputs), forward and backward, with exactly the grid and block the plan names.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest
import torch

from rope_env import HAS_SOURCE_TREE, requires_cuda

import rope_kernels  # noqa: F401  (loads the op library)
from rope_kernels.launch_plan import LaunchPlan, launch_plan

CUDA_KERNELS = json.loads(torch.ops.rope.build_info())["cuda_kernels"]
requires_cuda_build = pytest.mark.skipif(CUDA_KERNELS is None, reason="a build without the CUDA path")
# The kernel's name in the profiler (aot_specs.KERNEL_NAME).
KERNEL_NAME = "rope_qk_kernel"
QK_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
GRID_FLAT, GRID_HEADS_FASTEST, GRID_SEQUENCE_FASTEST = 0, 1, 2

Launch = Tuple[str, Tuple[int, int, int], Tuple[int, int, int]]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    batch: int
    seq: int
    heads_q: int
    heads_k: int
    head_dim: int
    layout: str  # "bshd": transposed views of (B, S, H, D) projections; "bhsd": contiguous
    positions: bool = False
    table_dtype: Optional[torch.dtype] = None  # None: q's dtype

    def inputs(self, device: str = "cuda") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   Optional[torch.Tensor]]:

        def heads_tensor(heads: int) -> torch.Tensor:
            if self.layout == "bshd":
                x = torch.randn(self.batch, self.seq, heads, self.head_dim, dtype=self.dtype, device=device)
                return x.transpose(1, 2)
            return torch.randn(self.batch, heads, self.seq, self.head_dim, dtype=self.dtype, device=device)

        q, k = heads_tensor(self.heads_q), heads_tensor(self.heads_k)
        rows = self.seq + 16
        angles = torch.rand(rows, self.head_dim // 2, device=device, dtype=torch.float64) * 6.0
        table_dtype = self.table_dtype or self.dtype
        cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
        positions = None
        if self.positions:
            positions = torch.randint(0, rows, (self.batch, self.seq), device=device, dtype=torch.int64)
        return q, k, cos, sin, positions

    def plan(self, device: str, arch: int) -> LaunchPlan:
        q, k, cos, sin, positions = self.inputs(device)
        return launch_plan(q, k, cos, sin, positions, capability=arch)


CASES = [
    # Wide grid, heads fastest: the training layout.
    Case("wide-bshd-bf16", torch.bfloat16, 2, 256, 32, 8, 128, "bshd"),
    # Wide grid, sequence fastest: contiguous (B, H, S, D) tensors.
    Case("wide-bhsd-fp16", torch.float16, 2, 512, 16, 16, 64, "bhsd"),
    # Narrow grid (decoding), positions read per token.
    Case("narrow-decode-positions", torch.bfloat16, 8, 1, 32, 8, 128, "bshd", positions=True),
    # Narrow grid, head_dim 40 (a masked, unaligned variant), float32 table for bfloat16 q.
    Case("narrow-unaligned-fp32-table", torch.bfloat16, 1, 8, 4, 2, 40, "bshd", table_dtype=torch.float32),
    # A sequence longer than the 65535 a grid's y extent holds: the flat grid.
    Case("flat-long-sequence", torch.float32, 1, 70000, 1, 1, 32, "bshd"),
]


def profiled_launches(fn: Callable[[], object], trace_dir: Path) -> List[Launch]:
    """(name, grid, block) of every kernel the device ran during fn, from the profiler's trace."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    path = trace_dir / "trace.json"
    profile.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    return [(event["name"], tuple(event["args"]["grid"]), tuple(event["args"]["block"]))
            for event in events if event.get("cat") == "kernel"]


def _arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_forward_is_one_launch_with_the_tables_grid_and_block(case: Case, tmp_path: Path) -> None:
    q, k, cos, sin, positions = case.inputs()
    torch.ops.rope.fused_qk(q, k, cos, sin, positions)  # first call: loads the module, outside the profile
    with torch.no_grad():
        launches = profiled_launches(lambda: torch.ops.rope.fused_qk(q, k, cos, sin, positions), tmp_path)
    plan = launch_plan(q, k, cos, sin, positions, capability=_arch())
    assert launches == [(KERNEL_NAME, plan.grid, plan.block)]


@requires_cuda
@pytest.mark.parametrize("case", CASES[:3], ids=[case.name for case in CASES[:3]])
def test_backward_is_one_launch_with_the_forwards_grid_and_block(case: Case, tmp_path: Path) -> None:
    q, k, cos, sin, positions = case.inputs()
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, positions)
    # Incoming gradients laid out as the outputs, which are laid out as q and k.
    grad_q, grad_k = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k), retain_graph=True)
    launches = profiled_launches(
        lambda: torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k), retain_graph=True), tmp_path)
    # The backward op rotates the incoming gradients, laid out as q and k: the forward's plan.
    plan = launch_plan(q.detach(), k.detach(), cos, sin, positions, capability=_arch())
    assert launches == [(KERNEL_NAME, plan.grid, plan.block)]


# The plan's choices, on the CPU.

EXPECTED_ORDERS = {
    "wide-bshd-bf16": GRID_HEADS_FASTEST,
    "wide-bhsd-fp16": GRID_SEQUENCE_FASTEST,
    "narrow-decode-positions": GRID_HEADS_FASTEST,
    "narrow-unaligned-fp32-table": GRID_HEADS_FASTEST,
    "flat-long-sequence": GRID_FLAT,
}


@requires_cuda_build
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_plan_grid_covers_every_head_block_of_every_token_in_the_layouts_order(case: Case) -> None:
    plan = case.plan("cpu", 90)
    assert plan.grid_order == EXPECTED_ORDERS[case.name]
    blocks = -(-(case.heads_q + case.heads_k) // plan.block_h)
    expected = {
        GRID_FLAT: (case.batch * case.seq * blocks, 1, 1),
        GRID_HEADS_FASTEST: (blocks, case.seq, case.batch),
        GRID_SEQUENCE_FASTEST: (case.seq, blocks, case.batch),
    }[plan.grid_order]
    assert plan.grid == expected
    assert plan.narrow == (case.batch * case.seq * (case.heads_q + case.heads_k) < 16384)


@requires_cuda_build
@pytest.mark.skipif(not HAS_SOURCE_TREE, reason="kernels/ is not beside this copy of the tests")
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_plan_takes_heads_per_program_and_warps_from_the_launch_table(case: Case) -> None:
    from kernels import aot_specs

    for arch in CUDA_KERNELS["architectures"]:
        plan = case.plan("cpu", arch)
        assert plan.block_d2 == min(b for b in aot_specs.BLOCK_D2_VALUES if b >= case.head_dim // 2)
        shape = aot_specs.launch_shape(arch, QK_NAMES[case.dtype], plan.block_d2, plan.narrow)
        assert (plan.block_h, plan.num_warps) == (shape.block_h, shape.num_warps)
        variant = aot_specs.Variant(**_variant_fields(plan, case))
        assert variant.index == plan.variant and variant.is_built


def _variant_fields(plan: LaunchPlan, case: Case) -> dict:
    from kernels import aot_specs

    table = 0 if case.table_dtype in (None, case.dtype) else 1
    return {"qk": list(QK_NAMES).index(case.dtype), "table": table,
            "block": aot_specs.BLOCK_D2_VALUES.index(plan.block_d2), "pos": 2 if case.positions else 0,
            "aligned": plan.aligned, "even_d": plan.even_d, "narrow": plan.narrow}


def _bshd(heads: int, seq: int = 256, head_dim: int = 128, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, seq, heads, head_dim, dtype=torch.bfloat16).transpose(1, 2)


def _tables(head_dim: int, rows: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(rows, head_dim // 2, dtype=torch.float64) * 6.0
    return angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)


@requires_cuda_build
def test_narrow_grid_class_is_below_16384_head_vectors() -> None:
    cos, sin = _tables(128)
    # 2 x 64 tokens of 64 + 64 heads is 16384 head vectors: wide; one head fewer: narrow.
    wide = launch_plan(_bshd(64, seq=64), _bshd(64, seq=64), cos, sin, capability=90)
    narrow = launch_plan(_bshd(64, seq=64), _bshd(63, seq=64), cos, sin, capability=90)
    assert (wide.narrow, narrow.narrow) == (False, True)


@requires_cuda_build
def test_alignment_even_rows_and_stride_width() -> None:
    cos, sin = _tables(128)
    aligned = launch_plan(_bshd(32), _bshd(8), cos, sin, capability=90)
    assert (aligned.aligned, aligned.even_d, aligned.stride_bits) == (True, True, 32)
    # A slice one element into its storage: 16-byte alignment does not hold.
    base = torch.randn(2 * 256 * 32 * 128 + 1, dtype=torch.bfloat16)
    offset_q = base[1:].view(2, 256, 32, 128).transpose(1, 2)
    unaligned = launch_plan(offset_q, _bshd(8), cos, sin, capability=90)
    assert (unaligned.aligned, unaligned.even_d, unaligned.stride_bits) == (False, False, 64)
    # A fused qkv projection's q and k slices: offsets of whole heads keep the alignment.
    qkv = torch.randn(2, 256, 48 * 128, dtype=torch.bfloat16)
    q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    fused = launch_plan(q.view(2, 256, 32, 128).transpose(1, 2), k.view(2, 256, 8, 128).transpose(1, 2),
                        cos, sin, capability=90)
    assert fused.aligned and fused.even_d
    # head_dim 96 fills 48 of the 64-wide block: aligned, but masked along the features too.
    cos96, sin96 = _tables(96)
    masked = launch_plan(_bshd(32, head_dim=96), _bshd(8, head_dim=96), cos96, sin96, capability=90)
    assert (masked.block_d2, masked.aligned, masked.even_d) == (64, True, False)


@requires_cuda_build
def test_sequence_fastest_falls_back_to_the_flat_grid_past_65535_head_blocks() -> None:
    cos, sin = _tables(32)
    # In sequence-fastest order, 65535 * 64 + 64 heads in blocks of at most 64 need more blocks
    # than a grid's y extent holds. Expanded views (no memory per head) order heads fastest, so
    # the order is given.
    heads = 65535 * 64 + 64
    q = torch.randn(1, 1, 2, 32).expand(1, heads, 2, 32)
    k = torch.randn(1, 1, 2, 32).expand(1, 1, 2, 32)
    plan = launch_plan(q, k, cos.float(), sin.float(), capability=90, inplace=True, heads_fastest=False)
    assert plan.grid_order == GRID_FLAT
    assert plan.grid == (2 * -(-(heads + 1) // plan.block_h), 1, 1)


@requires_cuda_build
def test_overrides_replace_heads_per_program_and_order() -> None:
    cos, sin = _tables(128)
    plan = launch_plan(_bshd(32), _bshd(8), cos, sin, capability=90, block_h=4, heads_fastest=False)
    assert (plan.block_h, plan.grid_order, plan.grid) == (4, GRID_SEQUENCE_FASTEST, (256, 10, 2))
    with pytest.raises(RuntimeError, match=r"rope::_launch_plan: heads per program must be in \[1, 64\]"):
        launch_plan(_bshd(32), _bshd(8), cos, sin, capability=90, block_h=65)


@requires_cuda_build
def test_a_device_without_a_built_architecture_is_named() -> None:
    cos, sin = _tables(128)
    with pytest.raises(RuntimeError, match=r"rope::_launch_plan: no kernel for this GPU \(sm_75\); this build has sm_"):
        launch_plan(_bshd(32), _bshd(8), cos, sin, capability=75)
    # 8.x devices run the largest built 8.y cubin with y <= x; 9.0 and later only their own.
    built = CUDA_KERNELS["architectures"]
    for capability in (80, 86, 87, 89, 90):
        runs = [arch for arch in built if arch == capability or (arch // 10 == 8 == capability // 10
                                                                   and arch <= capability)]
        if runs:
            assert launch_plan(_bshd(32), _bshd(8), cos, sin, capability=capability).arch == max(runs)
        else:
            with pytest.raises(RuntimeError, match=f"no kernel for this GPU \\(sm_{capability}\\)"):
                launch_plan(_bshd(32), _bshd(8), cos, sin, capability=capability)


@requires_cuda_build
def test_a_capability_that_is_not_major_minor_is_refused() -> None:
    cos, sin = _tables(128)
    for capability in (0, -90, 1000):
        with pytest.raises(RuntimeError, match=r"rope::_launch_plan: capability must be 10 \* major \+ minor"):
            launch_plan(_bshd(32), _bshd(8), cos, sin, capability=capability)
