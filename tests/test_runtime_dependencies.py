"""At run time rope_kernels needs torch and nothing else: no Triton (the kernels were compiled
when the package was built), no compiler, no cache directory."""
from __future__ import annotations

from rope_env import run_fresh_python

# A None entry in sys.modules makes every `import triton` fail, as on a machine without Triton.
WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None
import torch
import rope_kernels
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for device in devices:
    case = RopeCase(dtype=torch.float32 if device == "cpu" else torch.bfloat16, layout="bshd")
    args = make_args(case, device)
    for out, ref in zip(torch.ops.rope.fused_qk(*args), reference_fused_qk(args)):
        assert_close_to_reference(out, ref, case.dtype)
print("without triton: ok")
"""


def test_works_without_triton() -> None:
    run_fresh_python(WITHOUT_TRITON)
