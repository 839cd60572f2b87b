"""rope::fused_qk_, the in-place rotation: results, what it writes and what it leaves alone, the
refusals every in-place op makes, autograd, opcheck, torch.compile and functionalization."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import pytest
import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

import rope_kernels
from rope_env import DEVICES, device_dtype_params
from rope_kernels.testing import (RopeArgs, RopeCase, assert_close_to_reference, make_args,
                                  reference_fused_qk, reference_grads, reference_rope)

INPLACE = torch.ops.rope.fused_qk_

# Layouts a caller may own and rotate in place: contiguous, a transposed projection, q and k
# sliced from one fused qkv projection, gaps everywhere, a last dimension with stride 2.
LAYOUT_CASES = [
    RopeCase(layout="bhsd"),
    RopeCase(layout="bshd", positions="bs:int64", table_width="full"),
    RopeCase(layout="qkv", positions="s:int32", heads_q=8, heads_k=1),
    RopeCase(layout="padded", positions="sb:int64", head_dim=10, table_layout="packed"),
    RopeCase(layout="strided_d", table_leading=2),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_rotates_in_place(device: str, dtype: torch.dtype, case: RopeCase) -> None:
    args = make_args(dataclasses.replace(case, dtype=dtype), device)
    expected_q, expected_k = reference_fused_qk(args)
    functional_q, functional_k = torch.ops.rope.fused_qk(*args)
    tables = [t.clone() for t in (args.cos, args.sin)]
    positions = None if args.positions is None else args.positions.clone()
    q_address, k_address, q_strides = args.q.data_ptr(), args.k.data_ptr(), args.q.stride()

    q_out, k_out = INPLACE(*args)

    assert q_out is args.q and k_out is args.k, "the in-place op must return its inputs"
    assert args.q.data_ptr() == q_address and args.k.data_ptr() == k_address and args.q.stride() == q_strides
    assert_close_to_reference(args.q, expected_q, dtype)
    assert_close_to_reference(args.k, expected_k, dtype)
    # The same kernel as fused_qk: identical numbers, only the destination differs.
    torch.testing.assert_close(args.q, functional_q, rtol=0, atol=0)
    torch.testing.assert_close(args.k, functional_k, rtol=0, atol=0)
    for before, after in zip(tables, (args.cos, args.sin)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    if positions is not None:
        assert torch.equal(args.positions, positions)


@pytest.mark.parametrize("device", DEVICES)
def test_writes_nothing_outside_the_views(device: str) -> None:
    # q is a window of a NaN-filled buffer (the padded layout): every element of the buffer outside
    # the window must still be NaN afterwards, and the window must hold finite results.
    args = make_args(RopeCase(layout="padded", positions="bs:int32", head_dim=12), device)
    buffer = args.q._base
    assert buffer is not None
    inside = torch.zeros(buffer.shape, dtype=torch.bool, device=device)
    inside.as_strided(args.q.shape, args.q.stride(), args.q.storage_offset() - buffer.storage_offset()).fill_(True)
    assert buffer[~inside].isnan().all()
    INPLACE(*args)
    assert torch.isfinite(args.q).all() and torch.isfinite(args.k).all()
    assert buffer[~inside].isnan().all(), "the op wrote outside q"


@pytest.mark.parametrize("device", DEVICES)
def test_bumps_version_counters(device: str) -> None:
    args = make_args(RopeCase(layout="bshd"), device)
    q_version, k_version = args.q._version, args.k._version
    INPLACE(*args)
    assert args.q._version > q_version and args.k._version > k_version


def test_stale_saved_tensor_is_detected() -> None:
    # A backward that saved q before the rotation must refuse to run, as for any in-place op.
    args = make_args(RopeCase(), "cpu")
    weight = torch.randn(args.q.shape, requires_grad=True)
    saved_q_product = (args.q * weight).sum()
    INPLACE(*args)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_q_product.backward()


def leaf_q(device: str) -> RopeArgs:
    args = make_args(RopeCase(), device)
    return args._replace(q=args.q.detach().requires_grad_())


def view_of_leaf_q(device: str) -> RopeArgs:
    args = make_args(RopeCase(), device)
    base = args.q.detach().transpose(1, 2).contiguous().requires_grad_()
    return args._replace(q=base.transpose(1, 2))


def broadcast_q(device: str) -> RopeArgs:
    return make_args(RopeCase(layout="broadcast"), device)


def q_is_k(device: str) -> RopeArgs:
    args = make_args(RopeCase(heads_k=4), device)
    return args._replace(k=args.q)


def q_overlaps_cos(device: str) -> RopeArgs:
    args = make_args(RopeCase(seq=4, table_rows=4, head_dim=8, table_width="full"), device)
    cos = args.q[0, 0]  # the first head of q, as an (S, D) full-width table
    return args._replace(cos=cos, sin=cos.clone())


def q_overlaps_k_with_gaps(device: str) -> RopeArgs:
    # Two views of one buffer whose elements interleave with gaps and partly coincide: torch's
    # own overlap check gives up on such a pair.
    base = torch.randn(1, 2, 4, 16, device=device)
    q, k = base[..., 0:8], base[:, :1, :, 4:12]
    return RopeArgs(q, k, torch.rand(4, 4, device=device), torch.rand(4, 4, device=device), None)


def q_folds_onto_itself(device: str) -> RopeArgs:
    # No stride-0 dimension, yet each token's elements overlap the next token's.
    q = torch.randn(64, device=device).as_strided((1, 1, 4, 8), (32, 32, 4, 1))
    k = torch.randn(1, 1, 4, 8, device=device)
    return RopeArgs(q, k, torch.rand(4, 4, device=device), torch.rand(4, 4, device=device), None)


def k_overlaps_positions(device: str) -> RopeArgs:
    # positions read from the same buffer as k, through an int32 view, on k's own elements.
    buffer = torch.randn(4, 16, device=device)
    k = buffer[:, :8].view(1, 1, 4, 8)
    positions = buffer.view(torch.int32)[:, 3].view(1, 4)
    positions.copy_(torch.arange(4, dtype=torch.int32, device=device).view(1, 4))
    q = torch.randn(1, 2, 4, 8, device=device)
    return RopeArgs(q, k, torch.rand(4, 4, device=device), torch.rand(4, 4, device=device), positions)


REFUSALS = [
    ("leaf", leaf_q, r"a leaf Variable that requires grad is being used in an in-place operation"),
    ("view_of_leaf", view_of_leaf_q, r"a view of a leaf Variable that requires grad is being used in an in-place"),
    ("broadcast", broadcast_q, r"rope::fused_qk_: q has elements that share memory"),
    ("q_is_k", q_is_k, r"rope::fused_qk_: q and k share memory"),
    ("q_overlaps_cos", q_overlaps_cos, r"rope::fused_qk_: q and cos share memory"),
    ("q_overlaps_k_with_gaps", q_overlaps_k_with_gaps, r"rope::fused_qk_: q and k share memory \(or may"),
    ("q_folds_onto_itself", q_folds_onto_itself, r"rope::fused_qk_: q has elements that share memory"),
    ("k_overlaps_positions", k_overlaps_positions, r"rope::fused_qk_: k and positions share memory"),
]


@pytest.mark.parametrize(("build", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
@pytest.mark.parametrize("device", DEVICES)
def test_refuses_what_torch_refuses(device: str, build: Callable[[str], RopeArgs], message: str) -> None:
    args = build(device)
    before = [t.detach().clone() for t in (args.q, args.k)]
    with pytest.raises(RuntimeError, match=message):
        INPLACE(*args)
    # Refused before anything was written.
    for now, then in zip((args.q, args.k), before):
        torch.testing.assert_close(now.detach(), then, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_views_of_one_buffer_that_lie_apart_rotate_in_place(device: str) -> None:
    # q, k, the positions and the tables all in one buffer, interleaved token by token, no
    # element shared: a layout whose address ranges overlap, accepted because its elements
    # provably lie apart.
    seq, heads_q, heads_k, head_dim = 5, 2, 1, 8
    row = (heads_q + heads_k) * head_dim + 1 + head_dim  # q, k, one position, cos and sin (D/2 each)
    buffer = torch.randn(seq, row, device=device)
    q = buffer[:, :heads_q * head_dim].view(seq, heads_q, head_dim).permute(1, 0, 2).unsqueeze(0)
    k = buffer[:, heads_q * head_dim:(heads_q + heads_k) * head_dim].view(seq, heads_k, head_dim)
    k = k.permute(1, 0, 2).unsqueeze(0)
    start = (heads_q + heads_k) * head_dim
    positions = buffer.view(torch.int32)[:, start].view(1, seq)
    positions.copy_(torch.tensor([[3, 0, 4, 1, 2]], dtype=torch.int32, device=device))
    cos = buffer[:, start + 1:start + 1 + head_dim // 2]
    sin = buffer[:, start + 1 + head_dim // 2:]
    expected = torch.ops.rope.fused_qk(q.clone(), k.clone(), cos.clone(), sin.clone(), positions.clone())
    untouched = buffer[:, start:].clone()
    INPLACE(q, k, cos, sin, positions)
    torch.testing.assert_close(q, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(k, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(buffer[:, start:], untouched, rtol=0, atol=0)


def test_broadcast_is_refused_at_trace_time() -> None:
    # The Meta kernel refuses it too, so torch.compile fails as eager does.
    args = make_args(RopeCase(layout="broadcast"), "meta")
    with pytest.raises(RuntimeError, match=r"rope::fused_qk_: q has elements that share memory"):
        INPLACE(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_flow_to_what_q_and_k_came_from(device: str, dtype: torch.dtype) -> None:
    # The common use: q and k are transposed views of projections (non-leaf), rotated in place.
    case = RopeCase(dtype=dtype, layout="bshd", positions="bs:int64", heads_q=8, heads_k=2, head_dim=64)
    args = make_args(case, device)
    q_proj = args.q.transpose(1, 2).detach().requires_grad_()  # (B, S, H, D) leaves
    k_proj = args.k.transpose(1, 2).detach().requires_grad_()
    q, k = (q_proj * 1).transpose(1, 2), (k_proj * 1).transpose(1, 2)
    weight_q = torch.randn(q.shape, dtype=dtype).to(device)
    weight_k = torch.randn(k.shape, dtype=dtype).to(device)
    INPLACE(q, k, args.cos, args.sin, args.positions)
    ((q * weight_q).sum() + (k * weight_k).sum()).backward()
    expected_q, expected_k = reference_grads(args, weight_q, weight_k)
    assert_close_to_reference(q_proj.grad.transpose(1, 2), expected_q, dtype)
    assert_close_to_reference(k_proj.grad.transpose(1, 2), expected_k, dtype)


def test_only_the_tensor_that_requires_grad_gets_history() -> None:
    args = make_args(RopeCase(), "cpu")
    source = args.q.detach().requires_grad_()
    q = source * 1
    INPLACE(q, args.k, args.cos, args.sin, args.positions)
    assert q.grad_fn is not None and args.k.grad_fn is None and not args.k.requires_grad
    q.sum().backward()
    expected = reference_rope(torch.ones(args.q.shape, dtype=torch.float64), args.cos, args.sin, args.positions,
                              inverse=True)
    assert_close_to_reference(source.grad, expected, torch.float32)


def rotated_in_place(args: RopeArgs) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The in-place op as a function of leaves q and k: rotates copies of them (in-place on a leaf
    is refused), so gradcheck sees a pure function whose backward is the in-place op's."""
    def fn(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_copy, k_copy = q * 1, k * 1
        return INPLACE(q_copy, k_copy, args.cos, args.sin, args.positions)
    return fn


@pytest.mark.parametrize("case", [
    RopeCase(batch=2, heads_q=2, heads_k=1, seq=3, head_dim=8, dtype=torch.float64, table_dtype="same"),
    RopeCase(batch=1, heads_q=3, heads_k=2, seq=4, head_dim=6, dtype=torch.float64, table_dtype="same",
             positions="bs:int64", table_width="full"),
], ids=str)
def test_gradcheck_and_gradgradcheck(case: RopeCase) -> None:
    args = make_args(case, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(rotated_in_place(args), (args.q, args.k))
    assert torch.autograd.gradgradcheck(rotated_in_place(args), (args.q, args.k))


OPCHECK_CASES = [
    RopeCase(),
    RopeCase(layout="bshd", positions="bs:int64", table_width="full", table_leading=2),
    RopeCase(layout="qkv", positions="s:int32", dtype=torch.bfloat16, table_dtype="same", heads_q=8, heads_k=1),
]


def opcheck_args(case: RopeCase, device: str, requires_grad: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args = make_args(case, device)
    q, k = args.q, args.k
    if requires_grad:  # non-leaf tensors that require grad: what an in-place op may write
        q = q.detach().requires_grad_() * 1
        k = k.detach().requires_grad_() * 1
    kwargs = {} if args.positions is None else {"positions": args.positions}
    return (q, k, args.cos, args.sin), kwargs


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str, case: RopeCase) -> None:
    args, kwargs = opcheck_args(case, device, requires_grad=False)
    torch.library.opcheck(INPLACE.default, args, kwargs)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_grad(device: str, case: RopeCase) -> None:
    # opcheck's AOTDispatcher test differentiates with respect to the mutated inputs themselves,
    # which compiled code returns as new tensors whenever the history comes from a C++ autograd
    # node: the gradient to the inputs' sources, what training needs, is checked under
    # torch.compile below instead (test_compiled_*).
    args, kwargs = opcheck_args(case, device, requires_grad=True)
    torch.library.opcheck(INPLACE.default, args, kwargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))




def rotate_projections(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       positions: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An attention-like prologue: projections viewed as (B, H, S, D), rotated in place."""
    batch, seq = x.shape[0], x.shape[1]
    q = (x * 2).view(batch, seq, -1, cos.shape[-1] * 2).transpose(1, 2)
    k = (y * 2).view(batch, seq, -1, cos.shape[-1] * 2).transpose(1, 2)
    rope_kernels.fused_qk_(q, k, cos, sin, positions)
    return (q * q).sum() + (k * 3).sum(), q, k


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_in_place_on_intermediates(device: str, backend: str, fresh_dynamo: Any) -> None:
    args = make_args(RopeCase(layout="bshd", positions="bs:int64", head_dim=16), device)
    x0 = args.q.transpose(1, 2).reshape(args.q.shape[0], args.q.shape[2], -1).detach()
    y0 = args.k.transpose(1, 2).reshape(args.k.shape[0], args.k.shape[2], -1).detach()
    results = []
    for fn in (rotate_projections, torch.compile(rotate_projections, backend=backend, fullgraph=True)):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        loss, q, k = fn(x, y, args.cos, args.sin, args.positions)
        loss.backward()
        results.append([loss.detach(), q.detach(), k.detach(), x.grad, y.grad])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for name, eager, compiled in zip(["loss", "q", "k", "grad_x", "grad_y"], *results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5, msg=f"{name} differs under compile")


def rotate_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    rope_kernels.fused_qk_(q, k, cos, sin)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_in_place_on_graph_inputs(device: str, backend: str, fresh_dynamo: Any) -> None:
    # The caller's tensors are rotated (the mutation is not lost in the functional graph), and
    # gradients reach what they were computed from.
    args = make_args(RopeCase(layout="bshd"), device)
    compiled = torch.compile(rotate_inputs, backend=backend, fullgraph=True)
    outcomes = []
    for fn in (rotate_inputs, compiled):
        q_source = args.q.detach().clone().requires_grad_()
        k_source = args.k.detach().clone().requires_grad_()
        q, k = q_source * 1, k_source * 1
        fn(q, k, args.cos, args.sin)
        (q.sum() + (k * 2).sum()).backward()
        outcomes.append([q.detach(), k.detach(), q_source.grad, k_source.grad])
    for name, eager, from_graph in zip(["q", "k", "grad_q_source", "grad_k_source"], *outcomes):
        torch.testing.assert_close(from_graph, eager, rtol=0, atol=0, msg=f"{name} differs under compile")
    expected_q, _ = reference_fused_qk(args)
    assert_close_to_reference(outcomes[1][0], expected_q, torch.float32)


def test_functionalized_graph_has_no_mutation_but_the_final_copy() -> None:
    args = make_args(RopeCase(), "cpu")

    def fn(q: torch.Tensor, k: torch.Tensor) -> None:
        INPLACE(q, k, args.cos, args.sin)

    graph = make_fx(torch.func.functionalize(fn, remove="mutations_and_views"))(args.q.clone(), args.k.clone())
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.rope.fused_qk.default in targets and INPLACE.default not in targets, targets
    assert targets.count(torch.ops.aten.copy_.default) == 2, targets  # q and k written back once
    q, k = args.q.clone(), args.k.clone()
    graph(q, k)
    expected_q, expected_k = reference_fused_qk(args)
    assert_close_to_reference(q, expected_q, torch.float32)
    assert_close_to_reference(k, expected_k, torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_torchscript() -> None:
    scripted = torch.jit.script(rope_kernels.inplace_rope_embedding)
    args = make_args(RopeCase(layout="bshd", positions="bs:int64"), "cpu")
    expected_q, expected_k = reference_fused_qk(args)
    q_out, k_out = scripted(args.q, args.k, args.cos, args.sin, args.positions)
    assert q_out is args.q and k_out is args.k
    assert_close_to_reference(args.q, expected_q, torch.float32)
    assert_close_to_reference(args.k, expected_k, torch.float32)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_is_refused_in_the_op_s_name(device: str) -> None:
    # The same argument checks as fused_qk (shared code), reported under the in-place op's name.
    args = make_args(RopeCase(seq=5, table_rows=5), device)
    with pytest.raises(RuntimeError, match=r"^rope::fused_qk_: cos and sin have 4 rows but the sequence has 5"):
        INPLACE(args.q, args.k, args.cos[:4], args.sin[:4])
    with pytest.raises(RuntimeError, match=r"^rope::fused_qk_: q and k must have the same dtype"):
        INPLACE(args.q, args.k.double(), args.cos, args.sin)
