"""The correctness gate every candidate passes before it is timed: its outputs against RoPE
computed in float64 from the same inputs and the same table values.

The allowance is what a few roundings in the output dtype can cost: the Hugging Face formula in
bf16 rounds each product and the sum (three roundings), a fused kernel rounds once. A wrong
convention, a wrong layout, an unwritten or stale element, or a NaN fails by far.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict

import torch

# Roundings in the output dtype allowed per element, each of at most half an ulp of
# |x1*cos| + |x2*sin| (the size of the products summed into the element).
ROUNDINGS_ALLOWED: float = 4.0

# The float64 reference is computed in chunks of about this many elements (a few hundred MB),
# so that long-context workloads do not need tens of GB for it.
CHUNK_ELEMENTS: int = 1 << 25


@dataclasses.dataclass
class CheckResult:
    passed: bool
    worst_ratio: float  # worst error / allowance over all elements (<= 1 passes; inf: NaN)
    relative_l2: float  # ||out - ref|| / ||ref||
    bad_elements: int
    message: str = ""

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def combined(self, other: "CheckResult") -> "CheckResult":
        return CheckResult(
            self.passed and other.passed,
            max(self.worst_ratio, other.worst_ratio),
            max(self.relative_l2, other.relative_l2),
            self.bad_elements + other.bad_elements,
            "; ".join(m for m in (self.message, other.message) if m))


def check_rotation(name: str, actual: torch.Tensor, source: torch.Tensor, cos_half: torch.Tensor,
                   sin_half: torch.Tensor, inverse: bool) -> CheckResult:
    """actual against the rotation of source (B, H, S, D) by the angles cos_half/sin_half
    (float64, (1 or B, S, D/2)); inverse rotates by -angle, which is the gradient."""
    if actual.shape != source.shape or actual.dtype != source.dtype:
        return CheckResult(False, math.inf, math.inf, actual.numel(), "{} is {} {}, expected {} {}".format(
            name, actual.dtype, list(actual.shape), source.dtype, list(source.shape)))
    unit_roundoff = torch.finfo(source.dtype).eps / 2
    tiny = torch.finfo(source.dtype).tiny  # covers results that land among subnormals
    batch, heads, seq, head_dim = source.shape
    half = head_dim // 2
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * head_dim))
    worst, bad, err_sq, ref_sq = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for start in range(0, seq, step):
            x = source[:, :, start:start + step].detach().to(torch.float64)
            c = cos_half[:, start:start + step].unsqueeze(1).to(x.device)
            s = sin_half[:, start:start + step].unsqueeze(1).to(x.device)
            if inverse:
                s = -s
            x1, x2 = x[..., :half], x[..., half:]
            ref = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
            size = torch.cat([(x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()], dim=-1)
            del x, x1, x2
            got = actual[:, :, start:start + step].detach().to(torch.float64)
            err = (got - ref).abs()
            allowed = ROUNDINGS_ALLOWED * unit_roundoff * size + tiny
            # NaN compares false, so a NaN output counts as bad.
            bad += int((~(err <= allowed)).sum().item())
            ratio = torch.nan_to_num(err / allowed, nan=math.inf)
            worst = max(worst, float(ratio.max().item()) if ratio.numel() else 0.0)
            err_sq += float(torch.nan_to_num(err, nan=math.inf).square().sum().item())
            ref_sq += float(ref.square().sum().item())
    relative = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)
    message = "" if bad == 0 else "{}: {} of {} elements off by more than {:g} roundings (worst {:.3g}x)".format(
        name, bad, actual.numel(), ROUNDINGS_ALLOWED, worst)
    return CheckResult(bad == 0, worst, relative, bad, message)
