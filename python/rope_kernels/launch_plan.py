"""The CUDA launcher's plan for given inputs, read from the library (``rope::_launch_plan``).

The plan is one C++ function (csrc/cuda/launch_plan.cpp) that the launcher runs before every
launch. This module names its values for the tests and the tuner, so that neither keeps a copy
of the rule. It needs no GPU: CPU tensors are planned as CUDA tensors with the same sizes,
strides and alignment would be. Private: the fields may change with the kernel table.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


class LaunchPlan(NamedTuple):
    """One launch, in the order rope::_launch_plan returns its values."""

    arch: int          # the built architecture whose cubin or PTX runs (10 * major + minor)
    variant: int       # index in the kernel table (variant_index in csrc/cuda/kernel_table.h)
    block_d2: int      # pairs block of the variant: rotary_dim / 2 rounded up to a built one (16 ... 256)
    aligned: bool      # the 16-byte-aligned variant, with 32-bit strides
    even_d: bool       # rotary_half == block_d2: masks along the heads only
    narrow: bool       # the narrow grid class (latency-bound launches)
    block_h: int       # heads per program, counted over q's heads then k's
    num_warps: int
    grid: Tuple[int, int, int]
    grid_order: int    # 0 flat, 1 heads fastest, 2 sequence fastest (kernels/aot_specs.GRID_ORDERS)
    stride_bits: int   # width of the stride parameters the cubin takes
    read_interleaved: bool   # the variant reads pairs (2i, 2i + 1)
    write_interleaved: bool  # and writes them so
    pos_kind: int      # where rows come from (kernels/aot_specs.POS_KINDS)
    rotary_half: int   # pairs rotated per head
    copy_end: int      # features [2 * rotary_half, copy_end) copied through
    ptx: bool          # the arch's PTX runs (compiled by the driver), not a cubin

    @property
    def block(self) -> Tuple[int, int, int]:
        """The thread block the launch uses."""
        return (32 * self.num_warps, 1, 1)


def launch_plan(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: Optional[torch.Tensor] = None, *, capability: int, inplace: bool = False,
                block_h: Optional[int] = None, heads_fastest: Optional[bool] = None,
                interleaved: bool = False, interleaved_out: Optional[bool] = None,
                rotary_dim: Optional[int] = None, layout: str = "bhsd",
                cu_seqlens: Optional[torch.Tensor] = None,
                seqlen_offsets: Optional[torch.Tensor] = None) -> LaunchPlan:
    """The plan of ``fused_qk(q, k, cos, sin, positions, **options)`` (or of ``fused_qk_`` with
    ``inplace``) on a device of ``capability`` (10 * major + minor). ``block_h`` and
    ``heads_fastest`` replace the cubin's heads per program and the layout's program order, as the
    tuner does to time shapes the table does not hold. q and k are taken as the op takes them, in
    ``layout``; the plan's grid and strides are those of their (B, H, S, D) views."""
    v = torch.ops.rope._launch_plan(q, k, cos, sin, positions, capability=capability, inplace=inplace,
                                    block_h=block_h, heads_fastest=heads_fastest, interleaved=interleaved,
                                    interleaved_out=interleaved_out, rotary_dim=rotary_dim, layout=layout,
                                    cu_seqlens=cu_seqlens, seqlen_offsets=seqlen_offsets)
    return LaunchPlan(arch=v[0], variant=v[1], block_d2=v[2], aligned=bool(v[3]), even_d=bool(v[4]),
                      narrow=bool(v[5]), block_h=v[6], num_warps=v[7], grid=(v[8], v[9], v[10]),
                      grid_order=v[11], stride_bits=v[12], read_interleaved=bool(v[13]),
                      write_interleaved=bool(v[14]), pos_kind=v[15], rotary_half=v[16], copy_end=v[17],
                      ptx=bool(v[18]))
