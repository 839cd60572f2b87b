"""Unsloth's API: fast_rope_embedding and inplace_rope_embedding, with the tables, indices and
position ids Unsloth's callers pass, against the float64 reference."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import pytest
import torch
from torch._dynamo.utils import counters

import rope_kernels
from rope_env import DEVICES, device_dtype_params
from rope_kernels.testing import (RopeArgs, RopeCase, assert_close_to_reference, make_args,
                                  reference_fused_qk, reference_grads, rope_angles)

CASE = RopeCase(batch=3, heads_q=8, heads_k=2, seq=9, head_dim=32, layout="bshd")


def unsloth_tables(args: RopeArgs, form: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as Unsloth's callers hold them: its rotary cache is the full-width (max_seq, dim)
    table, often kept as (1, 1, max_seq, dim); half-width tables work too."""
    rows, head_dim = args.cos.shape[0], args.q.shape[-1]
    angles = rope_angles(rows, head_dim)
    if form != "half":
        angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype).to(args.q.device), angles.sin().to(dtype).to(args.q.device)
    if form == "full_4d":
        return cos[None, None], sin[None, None]
    if form == "full_middle_one":  # (max_seq, 1, dim): size-1 dims anywhere are squeezed
        return cos[:, None], sin[:, None]
    return cos, sin


def indices(args: RopeArgs, form: str) -> Optional[torch.Tensor]:
    """rope_embedding_indices as TRL and Unsloth make them (int32 (batch, seq)) and other forms."""
    batch, seq = args.q.shape[0], args.q.shape[2]
    rows = args.cos.shape[0]
    if form == "none":
        return None
    values = torch.randint(0, rows, (batch, seq))
    if form == "bs_int32":
        return values.to(torch.int32).to(args.q.device)
    if form == "flat_int64":
        return values.reshape(-1).to(args.q.device)
    if form == "bs_int16_on_cpu":  # converted to int32 and moved to q's device, as Unsloth does
        return values.to(torch.int16)
    raise ValueError(form)


@pytest.mark.parametrize("index_form", ["none", "bs_int32", "flat_int64", "bs_int16_on_cpu"])
@pytest.mark.parametrize("table_form", ["half", "full", "full_4d", "full_middle_one"])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_fast_rope_embedding(device: str, dtype: torch.dtype, table_form: str, index_form: str) -> None:
    args = make_args(dataclasses.replace(CASE, dtype=dtype), device)
    cos, sin = unsloth_tables(args, table_form, torch.float32)
    rope_indices = indices(args, index_form)
    positions = None if rope_indices is None else rope_indices.reshape(args.q.shape[0], args.q.shape[2])
    q_before, k_before = args.q.clone(), args.k.clone()

    q_out, k_out = rope_kernels.fast_rope_embedding(args.q, args.k, cos, sin, rope_indices)

    # The reference takes the table as Unsloth reads it: every size-1 dim dropped.
    table_cos, table_sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    expected_q, expected_k = reference_fused_qk(args._replace(cos=table_cos, sin=table_sin, positions=positions))
    assert_close_to_reference(q_out, expected_q, dtype)
    assert_close_to_reference(k_out, expected_k, dtype)
    # New tensors; the caller's Q and K are never written (Unsloth's indexed path does write them).
    assert torch.equal(args.q, q_before) and torch.equal(args.k, k_before)
    assert q_out.data_ptr() != args.q.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_fast_rope_embedding_table_in_another_dtype(device: str) -> None:
    # A float16 table with bfloat16 Q (any dtype other than float32 and Q's) is read as float32.
    args = make_args(RopeCase(dtype=torch.bfloat16), device)
    cos, sin = unsloth_tables(args, "full", torch.float16)
    q_out, k_out = rope_kernels.fast_rope_embedding(args.q, args.k, cos, sin)
    expected_q, expected_k = reference_fused_qk(args._replace(cos=cos, sin=sin))
    assert_close_to_reference(q_out, expected_q, torch.bfloat16)
    assert_close_to_reference(k_out, expected_k, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_rope_embedding_gradients(device: str) -> None:
    args = make_args(RopeCase(layout="qkv", heads_q=8, heads_k=2, positions="bs:int32"), device, requires_grad=True)
    weight_q, weight_k = torch.randn(args.q.shape).to(device), torch.randn(args.k.shape).to(device)
    q_out, k_out = rope_kernels.fast_rope_embedding(args.q, args.k, args.cos, args.sin, args.positions.reshape(-1))
    ((q_out * weight_q).sum() + (k_out * weight_k).sum()).backward()
    expected_q, expected_k = reference_grads(args, weight_q, weight_k)
    assert_close_to_reference(args.q.grad, expected_q, torch.float32)
    assert_close_to_reference(args.k.grad, expected_k, torch.float32)


@pytest.mark.parametrize("position_form", ["none", "bs", "1s", "s"])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_inplace_rope_embedding(device: str, dtype: torch.dtype, position_form: str) -> None:
    args = make_args(dataclasses.replace(CASE, dtype=dtype), device)
    cos, sin = unsloth_tables(args, "full_4d", torch.float32)
    batch, seq = args.q.shape[0], args.q.shape[2]
    rows = torch.randint(0, cos.shape[-2], (batch, seq)).to(device)
    position_ids = {"none": None, "bs": rows, "1s": rows[:1], "s": rows[0]}[position_form]
    expected_positions = None if position_ids is None else position_ids.expand(batch, seq)
    expected_q, expected_k = reference_fused_qk(args._replace(cos=cos, sin=sin, positions=expected_positions))

    q_out, k_out = rope_kernels.inplace_rope_embedding(args.q, args.k, cos, sin, position_ids)

    assert q_out is args.q and k_out is args.k
    assert_close_to_reference(args.q, expected_q, dtype)
    assert_close_to_reference(args.k, expected_k, dtype)


def test_inplace_rope_embedding_gradients() -> None:
    args = make_args(RopeCase(layout="bshd", positions="bs:int64"), "cpu")
    q_source = args.q.detach().requires_grad_()
    k_source = args.k.detach().requires_grad_()
    q, k = rope_kernels.inplace_rope_embedding(q_source * 1, k_source * 1, args.cos, args.sin, args.positions)
    weight_q, weight_k = torch.randn(args.q.shape), torch.randn(args.k.shape)
    ((q * weight_q).sum() + (k * weight_k).sum()).backward()
    expected_q, expected_k = reference_grads(args, weight_q, weight_k)
    assert_close_to_reference(q_source.grad, expected_q, torch.float32)
    assert_close_to_reference(k_source.grad, expected_k, torch.float32)


BAD_CALLS = [
    ("indices_wrong_length", lambda a: rope_kernels.fast_rope_embedding(a.q, a.k, a.cos, a.sin, torch.zeros(5, dtype=torch.int32)),
     r"rope_kernels.fast_rope_embedding: rope_embedding_indices must have shape"),
    ("indices_float", lambda a: rope_kernels.fast_rope_embedding(a.q, a.k, a.cos, a.sin, torch.zeros(a.q.shape[2])),
     r"rope_embedding_indices must be an integer tensor"),
    ("position_ids_bool", lambda a: rope_kernels.inplace_rope_embedding(a.q, a.k, a.cos, a.sin, torch.ones(a.q.shape[0], a.q.shape[2], dtype=torch.bool)),
     r"rope_kernels.inplace_rope_embedding: position_ids must be an integer tensor; got torch.bool"),
    ("table_3d", lambda a: rope_kernels.fast_rope_embedding(a.q, a.k, a.cos.expand(2, *a.cos.shape), a.sin.expand(2, *a.sin.shape)),
     r"cos must be \(max_seq, width\) up to size-1 dimensions"),
    ("position_ids_wrong", lambda a: rope_kernels.inplace_rope_embedding(a.q, a.k, a.cos, a.sin, torch.zeros(2, 2, dtype=torch.long)),
     r"rope_kernels.inplace_rope_embedding: position_ids must have shape"),
]


@pytest.mark.parametrize(("call", "message"), [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS])
def test_bad_calls_name_the_function(call: Callable[[RopeArgs], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(make_args(RopeCase(), "cpu"))


@pytest.fixture
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def unsloth_attention_prologue(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both entry points in one graph, as a model would call them."""
    batch, seq, head_dim = x.shape[0], x.shape[1], cos.shape[-1]
    q = (x * 1).view(batch, seq, -1, head_dim).transpose(1, 2)
    k = (y * 1).view(batch, seq, -1, head_dim).transpose(1, 2)
    q_fast, k_fast = rope_kernels.fast_rope_embedding(q, k, cos, sin, indices)
    q_inplace, k_inplace = rope_kernels.inplace_rope_embedding(q, k, cos, sin, indices)
    return q_fast, k_fast, q_inplace, k_inplace


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_into_one_graph(device: str, fresh_dynamo: Any) -> None:
    args = make_args(RopeCase(layout="bshd", positions="bs:int32", head_dim=16), device)
    cos, sin = unsloth_tables(args, "full_4d", torch.float32)
    x0 = args.q.transpose(1, 2).reshape(args.q.shape[0], args.q.shape[2], -1).detach()
    y0 = args.k.transpose(1, 2).reshape(args.k.shape[0], args.k.shape[2], -1).detach()
    outcomes = []
    for fn in (unsloth_attention_prologue, torch.compile(unsloth_attention_prologue, fullgraph=True, backend="aot_eager")):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        outs = fn(x, y, cos, sin, args.positions)
        sum((out * (i + 1)).sum() for i, out in enumerate(outs)).backward()
        outcomes.append([o.detach() for o in outs] + [x.grad, y.grad])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for eager, from_graph in zip(*outcomes):
        torch.testing.assert_close(from_graph, eager, rtol=0, atol=0)
    expected_q, _ = reference_fused_qk(args._replace(cos=cos, sin=sin))
    assert_close_to_reference(outcomes[0][0], expected_q, torch.float32)
    torch.testing.assert_close(outcomes[0][2], outcomes[0][0], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_torchscript() -> None:
    scripted = torch.jit.script(rope_kernels.fast_rope_embedding)
    args = make_args(RopeCase(layout="bshd", positions="bs:int32"), "cpu")
    q_out, k_out = scripted(args.q, args.k, args.cos[None, None], args.sin[None, None], args.positions)
    expected_q, expected_k = reference_fused_qk(args)
    assert_close_to_reference(q_out, expected_q, torch.float32)
    assert_close_to_reference(k_out, expected_k, torch.float32)
