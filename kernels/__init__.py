"""The RoPE kernels and their ahead-of-time build.

rope_kernel (the Triton source; needs Triton), aot_specs (the specialization table and launch
shapes; no Triton), aot_compile, aot_emit and build_aot (the build: ``python -m kernels.build_aot``
from the source tree, which CMake runs), and tune (``python -m kernels.tune`` on a GPU: where the
launch shapes of aot_specs come from).
"""
