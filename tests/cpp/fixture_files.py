"""What the fixture scripts share: the model, and saving tensors in a file that C++ can read.

A C++ program reads the tensors with torch::jit::load(path).attr(name): a scripted module whose
buffers are the tensors is the one file format that libtorch and Python both read and write
without extra code.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Dict

import torch

# tests/ holds the model and the reference the fixtures build on.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rope_models import RopeAttention  # noqa: E402

__all__ = ["RopeAttention", "save_tensors", "parameter_key", "script"]


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    """torch.jit.script, quietly: TorchScript is deprecated in Python, but it is what libtorch loads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


class _Tensors(torch.nn.Module):
    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.detach().cpu().contiguous())


def save_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    script(_Tensors(tensors)).save(str(path))


def parameter_key(name: str) -> str:
    """The key of a parameter's gradient ("qkv.weight" -> "grad_qkv_weight"): buffer names have no dots."""
    return "grad_" + name.replace(".", "_")
