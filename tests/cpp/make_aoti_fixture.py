"""Exports the attention model (which calls torch.ops.rope.fused_qk) with a dynamic sequence
length, compiles it with AOTInductor into a package per device (the CPU, and CUDA when present),
and saves inputs of two lengths with the eager outputs, for test_aoti_package.cpp.

Usage: python make_aoti_fixture.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.export import Dim

import rope_kernels  # noqa: F401  (registers the op that the model calls)
from fixture_files import RopeAttention, save_tensors

MAX_SEQ = 64
LENGTHS = {"a": 13, "b": 40}  # the export example's length and another one


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = RopeAttention(max_seq=MAX_SEQ)
    tensors = {}
    for key, seq in LENGTHS.items():
        x = torch.randn(2, seq, 32)
        positions = torch.randint(0, MAX_SEQ, (2, seq))
        tensors.update({f"x_{key}": x, f"positions_{key}": positions, f"output_{key}": model(x, positions)})
    save_tensors(out_dir / "rope_attention_aoti_expected.pt", tensors)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    seq = Dim("seq", min=2, max=MAX_SEQ)
    for device in devices:
        on_device = model.to(device)
        example = (tensors["x_a"].to(device), tensors["positions_a"].to(device))
        program = torch.export.export(on_device, example, dynamic_shapes={"x": {1: seq}, "positions": {1: seq}})
        path = out_dir / f"rope_attention_{device}.pt2"
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        print(f"AOTInductor package written: {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
