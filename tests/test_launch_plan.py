"""The launch plan (plan_launch in csrc/cuda/launch_plan.cpp, read through rope::_launch_plan).

On the CPU, anywhere: the plan's choices for inputs of every grid order, grid class, alignment,
head size, pair convention, rotary_dim, layout and source of the table rows (the plan reads
tensor metadata only, so CPU tensors stand in for CUDA ones), and its heads per program and warps
against the launch table the build compiled (kernels/aot_specs).

On a GPU: one call is one kernel launch and nothing else (no copy of a transposed view, no fill
of the outputs, no separate copy of the features past rotary_dim), forward and backward, with
exactly the grid and block the plan names.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch

from rope_env import HAS_SOURCE_TREE, requires_cuda, run_fresh_python

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
    interleaved: bool = False
    interleaved_out: Optional[bool] = None
    rotary_dim: Optional[int] = None  # None: head_dim

    @property
    def rotary_half(self) -> int:
        return (self.rotary_dim or self.head_dim) // 2

    @property
    def write_interleaved(self) -> bool:
        return self.interleaved if self.interleaved_out is None else self.interleaved_out

    def options(self) -> Dict[str, Any]:
        """The op's keyword options of this case."""
        return {"interleaved": self.interleaved, "interleaved_out": self.interleaved_out,
                "rotary_dim": self.rotary_dim}

    def inputs(self, device: str = "cuda") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   Optional[torch.Tensor]]:

        def heads_tensor(heads: int) -> torch.Tensor:
            if self.layout == "bshd":
                x = torch.randn(self.batch, self.seq, heads, self.head_dim, dtype=self.dtype, device=device)
                return x.transpose(1, 2)
            return torch.randn(self.batch, heads, self.seq, self.head_dim, dtype=self.dtype, device=device)

        q, k = heads_tensor(self.heads_q), heads_tensor(self.heads_k)
        rows = self.seq + 16
        angles = torch.rand(rows, self.rotary_half, device=device, dtype=torch.float64) * 6.0
        table_dtype = self.table_dtype or self.dtype
        cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
        positions = None
        if self.positions:
            positions = torch.randint(0, rows, (self.batch, self.seq), device=device, dtype=torch.int64)
        return q, k, cos, sin, positions

    def plan(self, device: str, arch: int) -> LaunchPlan:
        q, k, cos, sin, positions = self.inputs(device)
        return launch_plan(q, k, cos, sin, positions, capability=arch, **self.options())


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
    # Wide grid, DeepSeek-V3's convention (interleaved pairs in, half-split out) on the first half
    # of each head: the second half is copied through by the same launch.
    Case("wide-bshd-interleaved-in-partial", torch.bfloat16, 2, 256, 32, 8, 128, "bshd", interleaved=True,
         interleaved_out=False, rotary_dim=64),
    # Narrow grid, the largest head_dim, GPT-J's interleaved pairs, positions read per token.
    Case("narrow-interleaved-head-dim-512", torch.float16, 4, 1, 8, 2, 512, "bhsd", positions=True,
         interleaved=True),
]
# Cases whose backward is checked too: one of each grid order and grid class, and one of the options.
BACKWARD_CASES = [case for case in CASES if case.name in {
    "wide-bshd-bf16", "wide-bhsd-fp16", "narrow-decode-positions", "wide-bshd-interleaved-in-partial"}]


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
    options = case.options()
    torch.ops.rope.fused_qk(q, k, cos, sin, positions, **options)  # first call: loads the module, outside the profile
    with torch.no_grad():
        launches = profiled_launches(lambda: torch.ops.rope.fused_qk(q, k, cos, sin, positions, **options),
                                     tmp_path)
    plan = launch_plan(q, k, cos, sin, positions, capability=_arch(), **options)
    assert launches == [(KERNEL_NAME, plan.grid, plan.block)]


@requires_cuda
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[case.name for case in BACKWARD_CASES])
def test_backward_is_one_launch_with_the_forwards_grid_and_block(case: Case, tmp_path: Path) -> None:
    q, k, cos, sin, positions = case.inputs()
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, positions, **case.options())
    # Incoming gradients laid out as the outputs, which are laid out as q and k.
    grad_q, grad_k = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k), retain_graph=True)
    launches = profiled_launches(
        lambda: torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k), retain_graph=True), tmp_path)
    # The backward op rotates the incoming gradients, laid out as q and k: the forward's grid and
    # block (its variant reads the pairs as the forward wrote them, and writes them as it read them).
    plan = launch_plan(q.detach(), k.detach(), cos, sin, positions, capability=_arch(), **case.options())
    assert launches == [(KERNEL_NAME, plan.grid, plan.block)]


# The plan's choices, on the CPU.

EXPECTED_ORDERS = {
    "wide-bshd-bf16": GRID_HEADS_FASTEST,
    "wide-bhsd-fp16": GRID_SEQUENCE_FASTEST,
    "narrow-decode-positions": GRID_HEADS_FASTEST,
    "narrow-unaligned-fp32-table": GRID_HEADS_FASTEST,
    "flat-long-sequence": GRID_FLAT,
    "wide-bshd-interleaved-in-partial": GRID_HEADS_FASTEST,
    "narrow-interleaved-head-dim-512": GRID_HEADS_FASTEST,
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
        assert plan.block_d2 == min(b for b in aot_specs.BLOCK_D2_VALUES if b >= case.rotary_half)
        shape = aot_specs.launch_shape(arch, QK_NAMES[case.dtype], plan.block_d2, plan.narrow)
        assert (plan.block_h, plan.num_warps) == (shape.block_h, shape.num_warps)
        variant = aot_specs.Variant(**_variant_fields(plan, case))
        assert variant.index == plan.variant and variant.is_built


def _variant_fields(plan: LaunchPlan, case: Case) -> Dict[str, Any]:
    from kernels import aot_specs

    table = 0 if case.table_dtype in (None, case.dtype) else 1
    return {"qk": list(QK_NAMES).index(case.dtype), "table": table,
            "block": aot_specs.BLOCK_D2_VALUES.index(plan.block_d2), "read_interleaved": case.interleaved,
            "write_interleaved": case.write_interleaved, "aligned": plan.aligned, "even_d": plan.even_d,
            "narrow": plan.narrow}


def _bshd(heads: int, seq: int = 256, head_dim: int = 128, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, seq, heads, head_dim, dtype=torch.bfloat16).transpose(1, 2)


def _tables(rotary_dim: int, rows: int = 256, device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """A (rows, rotary_dim/2) bfloat16 table of random angles."""
    angles = torch.rand(rows, rotary_dim // 2, dtype=torch.float64, device=device) * 6.0
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


def _expected_kernels(capability: int, built: List[int], ptx_arch: Optional[int]) -> Optional[Tuple[int, bool]]:
    """(arch, ptx) of what runs on this capability: an 8.x device runs the largest built 8.y cubin
    with y <= x, 9.0 and later only their own; else the PTX where its arch is not above the device's."""
    runs = [arch for arch in built if arch == capability or (arch // 10 == 8 == capability // 10 and arch <= capability)]
    if runs:
        return max(runs), False
    if ptx_arch is not None and ptx_arch <= capability:
        return ptx_arch, True
    return None


@requires_cuda_build
def test_a_device_without_a_built_architecture_is_named() -> None:
    cos, sin = _tables(128)
    with pytest.raises(RuntimeError, match=r"rope::_launch_plan: no kernel for this GPU \(sm_75\); this build has sm_"):
        launch_plan(_bshd(32), _bshd(8), cos, sin, capability=75)
    built, ptx_arch = CUDA_KERNELS["architectures"], CUDA_KERNELS["ptx_architecture"]
    for capability in (80, 86, 87, 89, 90, 100, 103, 110, 120, 121, 130):
        expected = _expected_kernels(capability, built, ptx_arch)
        if expected is not None:
            plan = launch_plan(_bshd(32), _bshd(8), cos, sin, capability=capability)
            assert (plan.arch, plan.ptx) == expected, (capability, plan)
        else:
            with pytest.raises(RuntimeError, match=f"no kernel for this GPU \\(sm_{capability}\\)"):
                launch_plan(_bshd(32), _bshd(8), cos, sin, capability=capability)


@requires_cuda_build
def test_gpus_newer_than_the_build_run_the_ptx_of_the_newest_portable_arch() -> None:
    # Triton's PTX for sm_90 and later is arch-specific (sm_90a ...): the PTX kept is that of the
    # newest arch built below sm_90, which the driver compiles for any later GPU.
    built = CUDA_KERNELS["architectures"]
    portable = [arch for arch in built if arch < 90]
    assert CUDA_KERNELS["ptx_architecture"] == (max(portable) if portable else None)
    if not portable:
        pytest.skip(f"this build ({built}) has no arch below sm_90, so no PTX")
    cos, sin = _tables(128)
    plan = launch_plan(_bshd(32), _bshd(8), cos, sin, capability=130)
    assert plan.ptx and plan.arch == max(portable)
    assert not launch_plan(_bshd(32), _bshd(8), cos, sin, capability=max(built)).ptx


@requires_cuda_build
def test_rope_force_ptx_takes_the_ptx_wherever_it_runs() -> None:
    if CUDA_KERNELS["ptx_architecture"] is None:
        pytest.skip("this build has no PTX")
    out = run_fresh_python(FORCED_PTX_PLANS, env={"ROPE_FORCE_PTX": "1"})
    plans = json.loads(out.strip().splitlines()[-1])
    ptx_arch = CUDA_KERNELS["ptx_architecture"]
    assert plans["forced"] is True
    for capability in (80, 86, 89, 90, 100, 120, 130):
        expected = [ptx_arch, True] if capability >= ptx_arch else "error"
        assert plans[str(capability)] == expected, (capability, plans)


FORCED_PTX_PLANS = """
import json, torch, rope_kernels
from rope_kernels.launch_plan import launch_plan
q, k = torch.randn(1, 8, 16, 128), torch.randn(1, 2, 16, 128)
cos, sin = torch.randn(16, 64), torch.randn(16, 64)
plans = {"forced": rope_kernels.build_info()["ptx_forced"]}
for capability in (80, 86, 89, 90, 100, 120, 130):
    try:
        plan = launch_plan(q, k, cos, sin, capability=capability)
        plans[str(capability)] = [plan.arch, plan.ptx]
    except RuntimeError as error:
        assert "ROPE_FORCE_PTX=1" in str(error), error
        plans[str(capability)] = "error"
print(json.dumps(plans))
"""


@requires_cuda_build
def test_a_capability_that_is_not_major_minor_is_refused() -> None:
    cos, sin = _tables(128)
    for capability in (0, -90, 1000):
        with pytest.raises(RuntimeError, match=r"rope::_launch_plan: capability must be 10 \* major \+ minor"):
            launch_plan(_bshd(32), _bshd(8), cos, sin, capability=capability)


# The plan of the options (interleaved, interleaved_out, rotary_dim, layout, cu_seqlens), on the CPU.

# (interleaved, interleaved_out) and the pairs the variant then reads and writes interleaved.
PAIR_OPTIONS = [
    ((False, None), (False, False)),
    ((True, None), (True, True)),
    ((False, False), (False, False)),
    ((True, True), (True, True)),
    ((True, False), (True, False)),  # DeepSeek-V3: interleaved in, half-split out
    ((False, True), (False, True)),
]


@requires_cuda_build
@pytest.mark.parametrize("options, pairs", PAIR_OPTIONS, ids=[f"{o[0]}-{o[1]}" for o, _ in PAIR_OPTIONS])
def test_variant_reads_and_writes_the_pairs_the_options_name(options: Tuple[bool, Optional[bool]],
                                                             pairs: Tuple[bool, bool]) -> None:
    interleaved, interleaved_out = options
    cos, sin = _tables(128)
    q, k = _bshd(32), _bshd(8)
    for inplace in (False, True):
        half_split = launch_plan(q, k, cos, sin, capability=90, inplace=inplace)
        plan = launch_plan(q, k, cos, sin, capability=90, inplace=inplace, interleaved=interleaved,
                           interleaved_out=interleaved_out)
        assert (plan.read_interleaved, plan.write_interleaved) == pairs
        # The pair convention is a variant of its own and changes nothing else of the launch.
        assert plan._replace(variant=half_split.variant, read_interleaved=False,
                             write_interleaved=False) == half_split
        assert (plan.variant == half_split.variant) == (pairs == (False, False))


@requires_cuda_build
def test_every_pair_convention_is_its_own_variant() -> None:
    cos, sin = _tables(128)
    q, k = _bshd(32), _bshd(8)
    variants = {launch_plan(q, k, cos, sin, capability=90, interleaved=options[0], interleaved_out=options[1]).variant
                for options, _ in PAIR_OPTIONS}
    assert len(variants) == 4


# (head_dim, rotary_dim, BLOCK_D2): rotary_dim/2 rounded up to a built block, whatever head_dim.
BLOCKS = [
    (128, None, 64),
    (128, 96, 64),
    (128, 64, 32),
    (128, 40, 32),
    (128, 32, 16),
    (128, 2, 16),
    (256, None, 128),
    (512, None, 256),
    (512, 320, 256),
    (512, 256, 128),
]


@requires_cuda_build
@pytest.mark.parametrize("head_dim, rotary_dim, block_d2", BLOCKS, ids=[f"{h}-{r}" for h, r, _ in BLOCKS])
def test_block_d2_follows_rotary_half(head_dim: int, rotary_dim: Optional[int], block_d2: int) -> None:
    cos, sin = _tables(rotary_dim or head_dim)
    plan = launch_plan(_bshd(32, head_dim=head_dim), _bshd(8, head_dim=head_dim), cos, sin, capability=90,
                       rotary_dim=rotary_dim)
    rotary_half = (rotary_dim or head_dim) // 2
    assert (plan.block_d2, plan.rotary_half, plan.narrow) == (block_d2, rotary_half, False)
    # Rotated rows that fill the block are the even variant where the launch is aligned.
    assert plan.even_d == (plan.aligned and rotary_half == block_d2)


@requires_cuda_build
def test_head_dim_512_takes_the_largest_block() -> None:
    assert CUDA_KERNELS["max_head_dim"] == 512
    cos, sin = _tables(512)
    wide = launch_plan(_bshd(32, head_dim=512), _bshd(8, head_dim=512), cos, sin, capability=90)
    assert (wide.block_d2, wide.rotary_half, wide.copy_end, wide.aligned, wide.even_d, wide.narrow) == (
        256, 256, 512, True, True, False)
    narrow = launch_plan(_bshd(4, seq=1, head_dim=512), _bshd(1, seq=1, head_dim=512), cos, sin, capability=90)
    assert (narrow.block_d2, narrow.narrow) == (256, True)


@requires_cuda_build
@pytest.mark.parametrize("rotary_dim", [None, 96, 64, 40, 2])
def test_copy_end_is_head_dim_out_of_place_and_the_rotated_features_in_place(rotary_dim: Optional[int]) -> None:
    cos, sin = _tables(rotary_dim or 128)
    q, k = _bshd(32), _bshd(8)
    rotary_half = (rotary_dim or 128) // 2
    out_of_place = launch_plan(q, k, cos, sin, capability=90, rotary_dim=rotary_dim)
    in_place = launch_plan(q, k, cos, sin, capability=90, inplace=True, rotary_dim=rotary_dim)
    # Out of place the features past rotary_dim are copied to the outputs; in place they stay.
    assert (out_of_place.rotary_half, out_of_place.copy_end) == (rotary_half, 128)
    assert (in_place.rotary_half, in_place.copy_end) == (rotary_half, 2 * rotary_half)


def _positions(dtype: torch.dtype, batch: int = 2, seq: int = 256) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), dtype=dtype)


@requires_cuda_build
def test_pos_kind_names_where_rows_come_from_and_keeps_the_variant() -> None:
    cos, sin = _tables(128)
    q, k = _bshd(32), _bshd(8)
    by_index = launch_plan(q, k, cos, sin, capability=90)
    assert by_index.pos_kind == 0
    for positions, pos_kind in ((_positions(torch.int32), 1), (_positions(torch.int64), 2),
                                (torch.randint(0, 256, (256,), dtype=torch.int32), 1),
                                (torch.randint(0, 256, (256,), dtype=torch.int64), 2)):
        plan = launch_plan(q, k, cos, sin, positions, capability=90)
        assert plan.pos_kind == pos_kind
        # A runtime argument: the same cubin and grid as rows by token index.
        assert plan._replace(pos_kind=0) == by_index

    # Packed sequences: 3 documents in 300 tokens, with or without offsets of either width.
    packed_q, packed_k = torch.randn(300, 16, 128, dtype=torch.bfloat16), torch.randn(300, 4, 128, dtype=torch.bfloat16)
    packed_cos, packed_sin = _tables(128, rows=320)
    packed = launch_plan(packed_q, packed_k, packed_cos, packed_sin, capability=90, layout="thd")
    assert packed.pos_kind == 0
    for cu_dtype, pos_kind in ((torch.int32, 3), (torch.int64, 4)):
        cu_seqlens = torch.tensor([0, 100, 250, 300], dtype=cu_dtype)
        for offsets in (None, torch.tensor([0, 5, 9], dtype=torch.int32), torch.tensor([3, 0, 1], dtype=torch.int64)):
            plan = launch_plan(packed_q, packed_k, packed_cos, packed_sin, capability=90, layout="thd",
                               cu_seqlens=cu_seqlens, seqlen_offsets=offsets)
            assert plan.pos_kind == pos_kind
            assert plan._replace(pos_kind=0) == packed
    for pos_dtype, pos_kind in ((torch.int32, 1), (torch.int64, 2)):
        positions = torch.randint(0, 320, (300,), dtype=pos_dtype)
        plan = launch_plan(packed_q, packed_k, packed_cos, packed_sin, positions, capability=90, layout="thd")
        assert (plan.pos_kind, plan._replace(pos_kind=0)) == (pos_kind, packed)


@requires_cuda_build
@pytest.mark.parametrize("rotary_dim, aligned", [(None, True), (96, True), (64, True), (32, True), (40, False),
                                                 (72, False), (2, False)])
def test_aligned_needs_rotary_half_a_multiple_of_16(rotary_dim: Optional[int], aligned: bool) -> None:
    cos, sin = _tables(rotary_dim or 128)
    for inplace in (False, True):
        plan = launch_plan(_bshd(32), _bshd(8), cos, sin, capability=90, inplace=inplace, rotary_dim=rotary_dim)
        assert (plan.aligned, plan.stride_bits) == (aligned, 32 if aligned else 64)


@requires_cuda_build
def test_aligned_needs_copy_end_a_multiple_of_16() -> None:
    # One head vector of 136 features, its first 128 rotated: every stride is 0 (size-1
    # dimensions), so only copy_end decides. Out of place it is 136; in place 128.
    cos, sin = _tables(128, rows=4)
    q, k = torch.randn(1, 1, 1, 136, dtype=torch.bfloat16), torch.randn(1, 1, 1, 136, dtype=torch.bfloat16)
    out_of_place = launch_plan(q, k, cos, sin, capability=90, rotary_dim=128)
    in_place = launch_plan(q, k, cos, sin, capability=90, inplace=True, rotary_dim=128)
    assert (out_of_place.copy_end, out_of_place.aligned) == (136, False)
    assert (in_place.copy_end, in_place.aligned) == (128, True)


# (batch, seq, heads_q, heads_k, head_dim): wide, decoding, and a narrow unaligned one.
BSHD_SHAPES = [(2, 256, 32, 8, 128), (8, 1, 32, 8, 128), (1, 8, 4, 2, 40)]
# Options the layout must not change the plan of: none, and DeepSeek-V3's pairs on part of each head.
LAYOUT_OPTIONS: List[Dict[str, Any]] = [{}, {"interleaved": True, "interleaved_out": False, "rotary_dim": 32}]


@requires_cuda_build
@pytest.mark.parametrize("shape", BSHD_SHAPES, ids=["wide", "decode", "narrow-unaligned"])
def test_bshd_layout_plans_as_the_transposed_view(shape: Tuple[int, int, int, int, int]) -> None:
    batch, seq, heads_q, heads_k, head_dim = shape
    q = torch.randn(batch, seq, heads_q, head_dim, dtype=torch.bfloat16)
    k = torch.randn(batch, seq, heads_k, head_dim, dtype=torch.bfloat16)
    for options in LAYOUT_OPTIONS:
        cos, sin = _tables(options.get("rotary_dim", head_dim))
        for positions in (None, _positions(torch.int64, batch, seq)):
            for inplace in (False, True):
                plan = launch_plan(q, k, cos, sin, positions, capability=90, inplace=inplace, layout="bshd",
                                   **options)
                view = launch_plan(q.transpose(1, 2), k.transpose(1, 2), cos, sin, positions, capability=90,
                                   inplace=inplace, **options)
                assert plan == view
                # A token's heads lie together: heads fastest, one grid row per token.
                assert (plan.grid_order, plan.grid[1:]) == (GRID_HEADS_FASTEST, (seq, batch))


@requires_cuda_build
@pytest.mark.parametrize("tokens", [300, 1], ids=["prefill", "one-token"])
def test_thd_layout_plans_as_one_sequence_of_all_tokens(tokens: int) -> None:
    q = torch.randn(tokens, 16, 128, dtype=torch.bfloat16)
    k = torch.randn(tokens, 4, 128, dtype=torch.bfloat16)
    for options in LAYOUT_OPTIONS:
        cos, sin = _tables(options.get("rotary_dim", 128), rows=320)
        for positions in (None, torch.randint(0, 320, (tokens,), dtype=torch.int32)):
            for inplace in (False, True):
                plan = launch_plan(q, k, cos, sin, positions, capability=90, inplace=inplace, layout="thd",
                                   **options)
                # A batch of one (B, S, H, D) sequence of T tokens, in either layout's terms.
                batch_of_one = launch_plan(q[None], k[None], cos, sin, positions, capability=90, inplace=inplace,
                                           layout="bshd", **options)
                view = launch_plan(q[None].transpose(1, 2), k[None].transpose(1, 2), cos, sin,
                                   None if positions is None else positions[None], capability=90,
                                   inplace=inplace, **options)
                assert plan == batch_of_one == view
                assert (plan.grid_order, plan.grid[1:]) == (GRID_HEADS_FASTEST, (tokens, 1))


@requires_cuda
def test_packed_sequences_are_one_launch_with_the_plans_grid_and_block(tmp_path: Path) -> None:
    q = torch.randn(300, 16, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(300, 4, 128, dtype=torch.bfloat16, device="cuda")
    cos, sin = _tables(64, rows=320, device="cuda")
    options: Dict[str, Any] = {
        "layout": "thd", "interleaved": True, "rotary_dim": 64,
        "cu_seqlens": torch.tensor([0, 100, 250, 300], dtype=torch.int32, device="cuda"),
        "seqlen_offsets": torch.tensor([0, 5, 9], dtype=torch.int64, device="cuda")}
    torch.ops.rope.fused_qk(q, k, cos, sin, **options)  # first call: loads the module, outside the profile
    with torch.no_grad():
        launches = profiled_launches(lambda: torch.ops.rope.fused_qk(q, k, cos, sin, **options), tmp_path)
    plan = launch_plan(q, k, cos, sin, capability=_arch(), **options)
    assert plan.pos_kind == 3
    assert launches == [(KERNEL_NAME, plan.grid, plan.block)]
