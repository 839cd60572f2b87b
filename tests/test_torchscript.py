"""TorchScript: modules calling the op, scripted or traced, saved, then loaded and run (forward
and backward) in a fresh process that has only rope_kernels and the saved files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch

import rope_kernels
from rope_env import DEVICES, run_fresh_python
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk, reference_grads

# TorchScript is deprecated in favour of torch.compile/export, but it is what libtorch users load.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


class RopeOp(torch.nn.Module):
    """Calls the registered op directly, with the tables as buffers (saved with the module)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.rope.fused_qk(q, k, self.cos, self.sin, positions)


class RopeApi(RopeOp):
    """Calls the typed Python function, which TorchScript must be able to compile."""

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_kernels.fused_qk(q, k, self.cos, self.sin, positions=positions)


# Runs in the fresh process: rope_kernels registers the op that the saved graph names; the
# results must be those this process computed, bit for bit (same kernel, same inputs).
LOAD_AND_RUN = """
import sys
import torch
import rope_kernels

module = torch.jit.load(sys.argv[1])
saved = torch.load(sys.argv[2])
q = saved["q"].requires_grad_()
k = saved["k"].requires_grad_()
q_out, k_out = module(q, k, saved["positions"])
((q_out * saved["weight_q"]).sum() + (k_out * saved["weight_k"]).sum()).backward()
for name, got in [("q_out", q_out), ("k_out", k_out), ("grad_q", q.grad), ("grad_k", k.grad)]:
    torch.testing.assert_close(got, saved[name], rtol=0, atol=0, msg=name + " differs")
print("fresh process: ok")
"""


@pytest.mark.parametrize("frontend", ["script", "trace"])
@pytest.mark.parametrize("module_type", [RopeOp, RopeApi], ids=["op", "api"])
@pytest.mark.parametrize("device", DEVICES)
def test_saved_module_runs_in_a_fresh_process(tmp_path: Path, device: str, module_type: type[RopeOp],
                                              frontend: str) -> None:
    case = RopeCase(layout="bshd", positions="bs:int64", table_width="full")
    args = make_args(case, device)
    module = module_type(args.cos, args.sin)
    if frontend == "script":
        jit_module = torch.jit.script(module)
    else:
        jit_module = torch.jit.trace(module, (args.q, args.k, args.positions))
    assert "rope::fused_qk" in str(jit_module.inlined_graph), "the op is not a node of the TorchScript graph"

    # Results in this process, checked against the reference so the fresh process is held to known-good numbers.
    q = args.q.detach().requires_grad_()
    k = args.k.detach().requires_grad_()
    weight_q, weight_k = torch.randn(q.shape).to(device), torch.randn(k.shape).to(device)
    q_out, k_out = jit_module(q, k, args.positions)
    ((q_out * weight_q).sum() + (k_out * weight_k).sum()).backward()
    for got, want in zip([q_out, k_out, q.grad, k.grad], [*reference_fused_qk(args), *reference_grads(args, weight_q, weight_k)]):
        assert_close_to_reference(got, want, case.dtype)

    module_path, data_path = tmp_path / "rope.pt", tmp_path / "expected.pt"
    jit_module.save(str(module_path))
    torch.save({"q": args.q, "k": args.k, "positions": args.positions, "weight_q": weight_q, "weight_k": weight_k,
                "q_out": q_out.detach(), "k_out": k_out.detach(), "grad_q": q.grad, "grad_k": k.grad}, data_path)
    run_fresh_python(LOAD_AND_RUN, str(module_path), str(data_path))
