"""What the built CUDA kernels take, as the library reports it (build_info's "cuda_kernels").

The limits are the kernel table's (csrc/cuda/kernel_table.h): read here once, at import, so the
drop-ins decide per call without parsing anything and never restate a number.
"""
from __future__ import annotations

import json
from typing import Any, Dict

import torch


def _cuda_kernels() -> Dict[str, Any]:
    kernels: Dict[str, Any] = json.loads(torch.ops.rope.build_info())["cuda_kernels"] or {}
    return kernels


_KERNELS = _cuda_kernels()
# The largest head_dim the CUDA kernels rotate; 0 for a build without the CUDA path.
CUDA_MAX_HEAD_DIM: int = int(_KERNELS.get("max_head_dim", 0))
# Whether the CUDA kernels take float64 q and k (a plain bool: TorchScript reads it as a constant).
CUDA_TAKES_FLOAT64: bool = "float64" in _KERNELS.get("dtypes", [])
