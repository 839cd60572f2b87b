"""At run time rope_kernels needs torch and nothing else: no Triton (the kernels were compiled
when the package was built), no compiler, no cache directory, and no CUDA build of torch."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from rope_env import run_fresh_python
from rope_kernels.cubins import installed_op_library

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


def test_the_op_library_loads_only_torch_c10_and_system_libraries() -> None:
    # Neither libtorch_cuda nor any CUDA library: the same library serves the CPU and the CUDA
    # builds of its torch release (a build with GPU kernels runs its CPU path on a CPU-only torch),
    # and libcuda is opened at run time only where a GPU is used.
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed; .ci/check_distributions.py checks the same on the wheel")
    dynamic = subprocess.run([readelf, "-d", str(installed_op_library())], check=True, capture_output=True,
                             text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    allowed = {"libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libstdc++.so.6", "libgcc_s.so.1", "libm.so.6",
               "libc.so.6"}
    assert "libtorch_cpu.so" in needed and "libc10.so" in needed, needed
    unexpected = sorted(n for n in set(needed) - allowed if not n.startswith("ld-linux"))
    assert not unexpected, f"unexpected NEEDED entries: {unexpected}"
