"""The correctness gate of every candidate, in every convention the workloads use.

The float64 reference (rope_kernels.testing.check_rotation) rotates half-split pairs over the
whole last dimension of (B, H, S, D) tensors. Each convention is brought to that form without
changing a value: interleaved pairs (x[2i], x[2i+1]) are gathered into half-split order (the
even features, then the odd ones: pair i keeps its angle, column i of the table), and of a
partial rotation the first R features are checked as a rotation while the features past R must
equal the input bit for bit (they are copied, or left where they lie, never computed).
"""
from __future__ import annotations

import math

import torch

from .workloads import Inputs

# After .workloads, which finds rope_kernels (installed, or built in place in python/).
from rope_kernels.testing import CheckResult, check_rotation  # noqa: E402


def _half_split_order(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """The first rotary_dim features of interleaved x, gathered as the half-split pairing reads
    them: x[..., 0::2] then x[..., 1::2] (a copy; values unchanged)."""
    rotated = x[..., :rotary_dim]
    return torch.cat([rotated[..., 0::2], rotated[..., 1::2]], dim=-1)


def check_pass_through(name: str, actual: torch.Tensor, source: torch.Tensor) -> CheckResult:
    """actual equals source bit for bit (a NaN in actual counts as a bad element)."""
    with torch.no_grad():
        got, expected = actual.detach(), source.detach()
        bad = int((~(got == expected)).sum().item())
        diff = torch.nan_to_num((got.double() - expected.double()), nan=math.inf)
        err = float(diff.square().sum().item())
        ref = float(expected.double().square().sum().item())
    relative = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)
    message = "" if bad == 0 else "{}: {} of {} features past rotary_dim changed".format(name, bad, actual.numel())
    return CheckResult(bad == 0, 0.0 if bad == 0 else math.inf, relative, bad, message)


def check_convention(name: str, actual: torch.Tensor, source: torch.Tensor, inputs: Inputs,
                     inverse: bool) -> CheckResult:
    """actual (B, H, S, D) against RoPE of source in the inputs' conventions (rotary_dim,
    interleaved pairs), by each token's angles; inverse: the rotation by -angle (the gradient)."""
    if actual.shape != source.shape or actual.dtype != source.dtype:
        return CheckResult(False, math.inf, math.inf, actual.numel(), "{} is {} {}, expected {} {}".format(
            name, actual.dtype, list(actual.shape), source.dtype, list(source.shape)))
    rotary_dim = inputs.rotary_dim
    cos_half, sin_half = inputs.reference_angles()
    if inputs.interleaved:
        rotated_actual = _half_split_order(actual.detach(), rotary_dim)
        rotated_source = _half_split_order(source.detach(), rotary_dim)
    else:
        rotated_actual, rotated_source = actual[..., :rotary_dim], source[..., :rotary_dim]
    result = check_rotation(name, rotated_actual, rotated_source, cos_half, sin_half, inverse)
    if rotary_dim < source.shape[-1]:
        result = result.combined(check_pass_through(name, actual[..., rotary_dim:], source[..., rotary_dim:]))
    return result
