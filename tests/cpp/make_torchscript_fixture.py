"""Scripts the attention model (which calls torch.ops.rope.fused_qk), saves it, and saves beside it
inputs with the outputs and gradients that Python computes, for test_torchscript_module.cpp.

Usage: python make_torchscript_fixture.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import rope_kernels  # noqa: F401  (registers the op that the scripted model calls)
from fixture_files import RopeAttention, parameter_key, save_tensors, script


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = RopeAttention(max_seq=64)
    scripted = script(model)
    assert "rope::fused_qk" in str(scripted.inlined_graph), "the op is not a node of the scripted graph"
    scripted.save(str(out_dir / "rope_attention.pt"))

    x = torch.randn(2, 11, 32, requires_grad=True)
    positions = torch.randint(0, 64, (2, 11))
    weight = torch.randn(2, 11, 32)
    output = model(x, positions)
    (output * weight).sum().backward()
    grads = {parameter_key(name): p.grad for name, p in model.named_parameters()}
    save_tensors(out_dir / "rope_attention_expected.pt",
                 {"x": x, "positions": positions, "weight": weight, "output": output, "grad_x": x.grad, **grads})
    print(f"TorchScript fixture written to {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
