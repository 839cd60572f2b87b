"""The launches the library makes, as the CUDA profiler records them.

Two things are checked on a GPU, for inputs that take each grid order and grid class:

- one call is one kernel launch and nothing else (no copy of a transposed view, no fill of the
  outputs), forward and backward;
- its grid and block are what the launch table and the Python copy of the launcher's rule say
  they are (kernels/aot_specs.py: `block_d2_index_of`, `is_narrow_grid`, `launch_shape`;
  bench/tune.py: `launch_grid`, `launcher_heads_fastest`). The tuner times shapes with that copy
  of the rule, so if the C++ launcher (csrc/cuda/rope_launch.cpp) changed its choice and the copy
  did not, the tuner would measure launches the library never makes; this is where that drift
  would show.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest
import torch

from rope_env import requires_cuda

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# The tests also run from a copy of tests/ against an installed wheel, where the repository's
# tools (bench/, kernels/) are not beside them: the launch rule is checked from the source tree.
if not (REPO_ROOT / "bench" / "__init__.py").exists():
    pytest.skip("bench/ is a repository tool: not beside this copy of the tests", allow_module_level=True)

import rope_kernels  # noqa: E402,F401  (loads the op library)
from bench.tune import SPECS as specs, launch_grid, launcher_heads_fastest  # noqa: E402

KERNEL_NAME = specs.KERNEL_NAME
QK_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

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

    def inputs(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        device = torch.device("cuda")

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

    def expected(self, q: torch.Tensor, arch: int) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
        """Grid and block for q by the launch table and the tuner's copy of the launcher's rule."""
        block_d2 = specs.BLOCK_D2_VALUES[specs.block_d2_index_of(self.head_dim // 2)]
        narrow = specs.is_narrow_grid(self.batch * self.seq, self.heads_q + self.heads_k)
        shape = specs.launch_shape(arch, QK_NAMES[self.dtype], block_d2, narrow)
        n_blocks = -(-(self.heads_q + self.heads_k) // shape.block_h)
        grid, _ = launch_grid(self.batch, self.seq, n_blocks, launcher_heads_fastest(q))
        return grid, (32 * shape.num_warps, 1, 1)


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
    grid, block = case.expected(q, _arch())
    assert launches == [(KERNEL_NAME, grid, block)]


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
    grid, block = case.expected(q, _arch())
    assert launches == [(KERNEL_NAME, grid, block)]
