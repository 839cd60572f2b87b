"""Autograd of fused_qk: gradcheck and gradgradcheck in float64, low-precision gradients against
the float64 reference, losses that use one output, double backward, and cos/sin as constants."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_env import DEVICES
from rope_kernels.testing import (RopeArgs, RopeCase, assert_close_to_reference, make_args,
                                  reference_grads, reference_rope)

OPS = {"fused_qk": torch.ops.rope.fused_qk, "fused_qk_backward": torch.ops.rope.fused_qk_backward}

# Small float64 inputs keep gradcheck's finite differences fast; the layouts and positions matter
# because the backward op must read the saved tables and positions the way the forward did.
GRADCHECK_CASES = [
    RopeCase(batch=2, heads_q=2, heads_k=1, seq=3, head_dim=8, dtype=torch.float64, table_dtype="same"),
    RopeCase(batch=2, heads_q=3, heads_k=3, seq=4, head_dim=6, dtype=torch.float64, table_dtype="same",
             layout="qkv", positions="bs:int64", table_width="full"),
    RopeCase(batch=1, heads_q=4, heads_k=2, seq=3, head_dim=4, dtype=torch.float64, table_dtype="same",
             layout="bshd", positions="s:int32", table_leading=2),
]


def as_function_of_qk(op: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                      args: RopeArgs) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The op as a function of q and k only: cos, sin and positions are constants."""
    return lambda q, k: op(q, k, args.cos, args.sin, args.positions)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("op_name", list(OPS))
def test_gradcheck(op_name: str, case: RopeCase) -> None:
    args = make_args(case, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(as_function_of_qk(OPS[op_name], args), (args.q, args.k))


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("op_name", list(OPS))
def test_gradgradcheck(op_name: str, case: RopeCase) -> None:
    args = make_args(case, "cpu", requires_grad=True)
    assert torch.autograd.gradgradcheck(as_function_of_qk(OPS[op_name], args), (args.q, args.k))


def random_like(x: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """Random weights for a loss sum(out * w): a nonuniform upstream gradient."""
    return torch.randn(x.shape, dtype=x.dtype).to(x.device).requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device: str, dtype: torch.dtype) -> None:
    case = RopeCase(dtype=dtype, layout="qkv", positions="bs:int64", heads_q=8, heads_k=2, head_dim=128)
    args = make_args(case, device, requires_grad=True)
    weight_q, weight_k = random_like(args.q), random_like(args.k)
    q_out, k_out = torch.ops.rope.fused_qk(*args)
    # In the input dtype, so the incoming gradients are exactly weight_q and weight_k.
    ((q_out * weight_q).sum() + (k_out * weight_k).sum()).backward()
    expected_q, expected_k = reference_grads(args, weight_q, weight_k)
    assert_close_to_reference(args.q.grad, expected_q, dtype)
    assert_close_to_reference(args.k.grad, expected_k, dtype)


# (inputs that require grad, outputs the loss uses). An input that requires grad gets a gradient
# even when the loss ignores its output: one node produces both outputs, so autograd hands the
# node a zero gradient for the unused one and the input's gradient is zero, not None.
LOSS_CASES = [("qk", "q"), ("qk", "k"), ("q", "q"), ("k", "qk"), ("q", "k")]


@pytest.mark.parametrize(("grad_inputs", "loss_outputs"), LOSS_CASES, ids=[f"grad_{i}-loss_{o}" for i, o in LOSS_CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_loss_on_some_outputs(device: str, grad_inputs: str, loss_outputs: str) -> None:
    case = RopeCase(positions="s:int64", layout="bshd")
    args = make_args(case, device)
    q = args.q.detach().requires_grad_("q" in grad_inputs)
    k = args.k.detach().requires_grad_("k" in grad_inputs)
    args = args._replace(q=q, k=k)
    weights = {"q": random_like(q), "k": random_like(k)}
    outputs = dict(zip("qk", torch.ops.rope.fused_qk(*args)))
    loss = sum((outputs[name] * weights[name]).sum() for name in loss_outputs)
    loss.backward()
    expected = dict(zip("qk", reference_grads(args, weights["q"], weights["k"])))
    for name, x in (("q", q), ("k", k)):
        if name not in grad_inputs:
            assert x.grad is None, f"{name} does not require grad but got one"
        elif name in loss_outputs:
            assert_close_to_reference(x.grad, expected[name], case.dtype)
        else:
            assert x.grad is not None, f"{name} requires grad: expected a zero gradient, got None"
            assert torch.count_nonzero(x.grad) == 0, f"{name}'s output is not in the loss: gradient must be zero"


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward(device: str) -> None:
    # grad_q = R^T w_q, so d/dw_q of sum(grad_q * v_q) is R v_q: the forward rotation of v.
    # Checks on every device that the backward op's own backward is the forward op.
    case = RopeCase(positions="bs:int32", layout="qkv", heads_q=4, heads_k=1)
    args = make_args(case, device, requires_grad=True)
    weight_q, weight_k = random_like(args.q, requires_grad=True), random_like(args.k, requires_grad=True)
    q_out, k_out = torch.ops.rope.fused_qk(*args)
    loss = (q_out * weight_q).sum() + (k_out * weight_k).sum()
    grad_q, grad_k = torch.autograd.grad(loss, (args.q, args.k), create_graph=True)
    v_q, v_k = random_like(args.q), random_like(args.k)
    ((grad_q * v_q).sum() + (grad_k * v_k).sum()).backward()
    assert_close_to_reference(weight_q.grad, reference_rope(v_q, args.cos, args.sin, args.positions), case.dtype)
    assert_close_to_reference(weight_k.grad, reference_rope(v_k, args.cos, args.sin, args.positions), case.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_require_grad_only_when_an_input_does(device: str) -> None:
    args = make_args(RopeCase(), device)
    q_out, k_out = torch.ops.rope.fused_qk(*args)
    assert not q_out.requires_grad and not k_out.requires_grad
    q_out, k_out = torch.ops.rope.fused_qk(*args._replace(k=args.k.detach().requires_grad_()))
    assert q_out.requires_grad and k_out.requires_grad


@pytest.mark.parametrize("qk_requires_grad", [True, False], ids=["qk_grad", "qk_no_grad"])
@pytest.mark.parametrize("table", ["cos", "sin"])
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("device", DEVICES)
def test_table_requiring_grad_is_an_error(device: str, op_name: str, table: str, qk_requires_grad: bool) -> None:
    # cos/sin are constants; silently returning no gradient for them would be a wrong answer.
    args = make_args(RopeCase(), device, requires_grad=qk_requires_grad)
    args = args._replace(**{table: getattr(args, table).detach().requires_grad_()})
    with pytest.raises(RuntimeError, match=rf"^rope::{op_name}: gradients with respect to cos/sin are not supported"):
        q_out, k_out = OPS[op_name](*args)
        (q_out.sum() + k_out.sum()).backward()


@pytest.mark.parametrize("device", DEVICES)
def test_table_requiring_grad_is_fine_without_grad_mode(device: str) -> None:
    # Under no_grad nothing would be differentiated, so a table that requires grad is no error.
    args = make_args(RopeCase(), device)
    args = args._replace(cos=args.cos.detach().requires_grad_(), sin=args.sin.detach().requires_grad_())
    with torch.no_grad():
        outputs = torch.ops.rope.fused_qk(*args)
    assert not outputs[0].requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_mode_records_nothing_and_rotates_the_same(device: str) -> None:
    # Without grad mode the op skips building a graph node (a host-time saving): the values must
    # be the ones the recorded path gives, and nothing may be recorded.
    args = make_args(RopeCase(), device, requires_grad=True)
    recorded = torch.ops.rope.fused_qk(*args)
    with torch.no_grad():
        plain = torch.ops.rope.fused_qk(*args)
    for got, expected in zip(plain, recorded):
        assert got.grad_fn is None and not got.requires_grad
        assert got.stride() == expected.stride()
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_ad_is_refused_not_dropped(device: str, op_name: str) -> None:
    # Forward-mode AD has no rule here: a tangent must raise, never vanish from the result.
    import torch.autograd.forward_ad as fwAD

    args = make_args(RopeCase(), device)
    with fwAD.dual_level():
        q_dual = fwAD.make_dual(args.q, torch.randn_like(args.q))
        with pytest.raises(RuntimeError):
            OPS[op_name](q_dual, args.k, args.cos, args.sin, args.positions)
