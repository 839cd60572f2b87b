"""The op's conventions (keyword options): interleaved pairs, interleaved-in/half-split-out,
partial rotary, (B, S, H, D) and packed (T, H, D) layouts with cu_seqlens and offsets, and every
even head_dim up to 512, on the CPU and on CUDA, against the float64 reference of
rope_kernels.testing: forward, gradients, in place, opcheck, gradcheck, compile, TorchScript,
export and the errors.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

import rope_kernels
from rope_env import DEVICES, device_dtype_params, requires_cuda
from rope_kernels.testing import assert_close_to_reference, cos_sin_tables, reference_rope


@dataclasses.dataclass(frozen=True)
class Convention:
    """One call: the tensors' shape and layout, and the op's options."""

    layout: str = "bhsd"  # the op's layout option
    batch: int = 2
    seq: int = 9
    heads_q: int = 4
    heads_k: int = 2
    head_dim: int = 64
    rotary_dim: Optional[int] = None
    interleaved: bool = False
    interleaved_out: Optional[bool] = None
    # "dense": contiguous in the layout; "view": (B, H, S, D) as a transposed (B, S, H, D) view,
    # or q and k as slices of one fused qkv projection (storage offsets, gaps between heads).
    storage: str = "view"
    # Packed layouts: document lengths (summing to the token count), or positions (T,) instead.
    documents: Tuple[int, ...] = (3, 0, 4, 2)
    packed_by: str = "cu_seqlens"  # "cu_seqlens", "cu_seqlens+offsets", "positions"
    full_width_table: bool = False

    def __str__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != field.default:
                parts.append(f"{field.name}={value}")
        return ",".join(parts) or "default"

    @property
    def tokens(self) -> int:
        return sum(self.documents)

    def options(self) -> Dict[str, Any]:
        return {"interleaved": self.interleaved, "interleaved_out": self.interleaved_out,
                "rotary_dim": self.rotary_dim, "layout": self.layout}


def _heads(c: Convention, heads: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Fresh random q or k in the convention's layout and storage."""
    d = c.head_dim
    if c.layout == "thd":
        shape = (c.tokens, heads, d)
    elif c.layout == "bshd":
        shape = (c.batch, c.seq, heads, d)
    else:
        shape = (c.batch, heads, c.seq, d)
    if c.storage == "dense":
        return torch.randn(shape, dtype=torch.float32).to(dtype).to(device)
    if c.layout == "bhsd":  # a transposed (B, S, H, D) projection
        return torch.randn(c.batch, c.seq, heads, d).to(dtype).to(device).transpose(1, 2)
    # a slice of a fused projection: one more head on either side
    wide = list(shape)
    wide[-2] += 2
    return torch.randn(wide).to(dtype).to(device).narrow(-2, 1, heads)


def make_call(c: Convention, dtype: torch.dtype, device: str, table_dtype: torch.dtype = torch.float32
              ) -> Tuple[Tuple[torch.Tensor, ...], Dict[str, Any]]:
    """(q, k, cos, sin), and the keyword arguments of one call of the op."""
    q = _heads(c, c.heads_q, dtype, device)
    k = _heads(c, c.heads_k, dtype, device)
    rotary = c.head_dim if c.rotary_dim is None else c.rotary_dim
    rows = max(c.seq, c.tokens) + 6
    cos, sin = cos_sin_tables(rows, rotary, full_width=c.full_width_table, dtype=table_dtype, device=device)
    kwargs = c.options()
    if c.layout == "thd":
        bounds = torch.tensor([0, *torch.tensor(c.documents).cumsum(0).tolist()])
        if c.packed_by == "positions":
            kwargs["positions"] = torch.randint(0, rows, (c.tokens,)).to(device)
        else:
            kwargs["cu_seqlens"] = bounds.to(torch.int32).to(device)
            if c.packed_by == "cu_seqlens+offsets":
                kwargs["seqlen_offsets"] = torch.tensor([1, 5, 0, 3][:len(c.documents)]).to(device)
    return (q, k, cos, sin), kwargs


def expected(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kwargs: Dict[str, Any],
             inverse: bool = False) -> torch.Tensor:
    return reference_rope(x, cos, sin, kwargs.get("positions"), inverse, **{
        key: value for key, value in kwargs.items() if key != "positions"})


def assert_passed_through(out: torch.Tensor, x: torch.Tensor, c: Convention) -> None:
    """Features past rotary_dim are the input's, bit for bit."""
    if c.rotary_dim is not None and c.rotary_dim < c.head_dim:
        assert torch.equal(out[..., c.rotary_dim:], x[..., c.rotary_dim:])


# Each option alone and the combinations models use. Head sizes: a power of two, sizes whose
# half is not one (80, 96, 160, 192, 320), and 512.
CONVENTIONS = [
    Convention(),
    Convention(interleaved=True),
    Convention(interleaved=True, interleaved_out=False),  # DeepSeek-V3
    Convention(interleaved_out=True),  # the backward of the one above
    Convention(rotary_dim=48),  # Phi-4-mini: 3/4 of the head
    Convention(rotary_dim=16, head_dim=64, full_width_table=True),  # a quarter (Qwen3-Next)
    Convention(rotary_dim=32, interleaved=True),  # GLM-4: half the head, interleaved
    Convention(rotary_dim=40, head_dim=64),  # not a multiple of 16: the unaligned kernels
    Convention(layout="bshd"),
    Convention(layout="bshd", storage="dense", rotary_dim=96, head_dim=128),
    Convention(layout="thd"),
    Convention(layout="thd", storage="dense", packed_by="cu_seqlens+offsets", interleaved=True),
    Convention(layout="thd", packed_by="positions", rotary_dim=32),
    Convention(layout="thd", documents=(9,), heads_q=3, heads_k=1),
    Convention(head_dim=80),
    Convention(head_dim=96, layout="bshd"),
    Convention(head_dim=160, interleaved=True),
    Convention(head_dim=192, rotary_dim=128),
    Convention(head_dim=320, storage="dense"),
    Convention(head_dim=512, layout="bshd", heads_q=2, heads_k=1),
    Convention(head_dim=512, rotary_dim=256, interleaved=True, interleaved_out=False, heads_q=2, heads_k=1),
]


@pytest.mark.parametrize("c", CONVENTIONS, ids=str)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params())
def test_forward_matches_reference(device: str, dtype: torch.dtype, c: Convention) -> None:
    (q, k, cos, sin), kwargs = make_call(c, dtype, device)
    q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, **kwargs)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == dtype and q_out.device == q.device
    assert_close_to_reference(q_out, expected(q, cos, sin, kwargs), dtype)
    assert_close_to_reference(k_out, expected(k, cos, sin, kwargs), dtype)
    assert_passed_through(q_out, q, c)
    assert_passed_through(k_out, k, c)


@pytest.mark.parametrize("c", CONVENTIONS, ids=str)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_backward_op_is_the_inverse_rotation(device: str, dtype: torch.dtype, c: Convention) -> None:
    (q, k, cos, sin), kwargs = make_call(c, dtype, device)
    grad_q, grad_k = torch.ops.rope.fused_qk_backward(q, k, cos, sin, **kwargs)
    assert_close_to_reference(grad_q, expected(q, cos, sin, kwargs, inverse=True), dtype)
    assert_close_to_reference(grad_k, expected(k, cos, sin, kwargs, inverse=True), dtype)


@pytest.mark.parametrize("c", CONVENTIONS, ids=str)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "fp32")))
def test_gradients_match_reference(device: str, dtype: torch.dtype, c: Convention) -> None:
    (q, k, cos, sin), kwargs = make_call(c, dtype, device)
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_out, k_out = rope_kernels.fused_qk(q, k, cos, sin, **kwargs)
    weight_q, weight_k = torch.randn_like(q_out), torch.randn_like(k_out)
    ((q_out * weight_q).sum() + (k_out * weight_k).sum()).backward()
    # The reference's own gradient, by float64 autograd through it.
    q64 = q.detach().cpu().double().requires_grad_()
    k64 = k.detach().cpu().double().requires_grad_()
    loss = ((expected(q64, cos, sin, kwargs) * weight_q.cpu().double()).sum()
            + (expected(k64, cos, sin, kwargs) * weight_k.cpu().double()).sum())
    ref_q, ref_k = torch.autograd.grad(loss, (q64, k64))
    assert q.grad is not None and k.grad is not None
    assert_close_to_reference(q.grad, ref_q, dtype)
    assert_close_to_reference(k.grad, ref_k, dtype)


@pytest.mark.parametrize("c", CONVENTIONS, ids=str)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_in_place_matches_reference(device: str, dtype: torch.dtype, c: Convention) -> None:
    (q, k, cos, sin), kwargs = make_call(c, dtype, device)
    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = torch.ops.rope.fused_qk_(q, k, cos, sin, **kwargs)
    assert q_out is q and k_out is k
    assert_close_to_reference(q, expected(q_before, cos, sin, kwargs), dtype)
    assert_close_to_reference(k, expected(k_before, cos, sin, kwargs), dtype)
    assert_passed_through(q, q_before, c)
    assert_passed_through(k, k_before, c)


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_touches_nothing_past_the_rotated_features(device: str) -> None:
    # The features past rotary_dim are not written at all in place: a concurrent reader (or a
    # NaN there) is left alone, and the other heads of a fused projection too.
    c = Convention(layout="bshd", rotary_dim=32, storage="view")
    (q, k, cos, sin), kwargs = make_call(c, torch.float32, device)
    base = q._base if q._base is not None else q
    before = base.clone()
    q[..., 32:] = float("nan")
    torch.ops.rope.fused_qk_(q, k, cos, sin, **kwargs)
    assert torch.isnan(q[..., 32:]).all()
    outside = torch.ones_like(base, dtype=torch.bool)
    outside.narrow(-2, 1, c.heads_q).fill_(False)
    assert torch.equal(base[outside], before[outside])


@pytest.mark.parametrize("device", DEVICES)
def test_every_even_head_dim_up_to_512(device: str) -> None:
    # One small call per size: whole-head rotation, and a partial one over a quarter of it.
    for head_dim in range(2, 514, 2):
        for rotary_dim in sorted({head_dim, max(2, head_dim // 4 // 2 * 2)}):
            c = Convention(head_dim=head_dim, rotary_dim=rotary_dim, batch=1, seq=3, heads_q=2, heads_k=1,
                           interleaved=head_dim % 4 == 0)
            (q, k, cos, sin), kwargs = make_call(c, torch.float32, device)
            q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, **kwargs)
            assert_close_to_reference(q_out, expected(q, cos, sin, kwargs), torch.float32)
            assert_close_to_reference(k_out, expected(k, cos, sin, kwargs), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_bshd_matches_the_transposed_view(device: str) -> None:
    # layout="bshd" is the same computation as passing the (B, H, S, D) view of the same memory,
    # and the outputs come back as (B, S, H, D) tensors of the same strides as q.
    c = Convention(layout="bshd", storage="dense")
    (q, k, cos, sin), kwargs = make_call(c, torch.bfloat16, device)
    q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, layout="bshd")
    q_ref, k_ref = torch.ops.rope.fused_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(q_out, q_ref.transpose(1, 2)) and torch.equal(k_out, k_ref.transpose(1, 2))
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_packed_documents_restart_at_their_offsets(device: str) -> None:
    # cu_seqlens with offsets is the same as explicit per-token positions.
    c = Convention(layout="thd", packed_by="cu_seqlens+offsets")
    (q, k, cos, sin), kwargs = make_call(c, torch.float32, device)
    # documents (3, 0, 4, 2) with offsets (1, 5, 0, 3): 1..3, (empty), 0..3, 3..4
    positions = torch.tensor([1, 2, 3, 0, 1, 2, 3, 3, 4], device=device)
    by_documents = torch.ops.rope.fused_qk(q, k, cos, sin, **kwargs)
    by_positions = torch.ops.rope.fused_qk(q, k, cos, sin, positions, layout="thd")
    assert torch.equal(by_documents[0], by_positions[0]) and torch.equal(by_documents[1], by_positions[1])


@requires_cuda
def test_bad_cu_seqlens_on_cuda_never_read_out_of_bounds() -> None:
    # On CUDA, cu_seqlens' values cannot be checked without a device synchronization: whatever
    # they hold, every read stays inside it and the table, and tokens whose row falls outside the
    # table come out NaN instead of reading past it (compute-sanitizer checks the reads).
    c = Convention(layout="thd", storage="dense")
    (q, k, cos, sin), kwargs = make_call(c, torch.float32, "cuda")
    for bounds in ([0, 100, 2, 9, 9], [5, 3, 1, 0, -7], [0, 2**30, -2**30, 9, 2**31 - 1]):
        kwargs["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, **kwargs)
        torch.cuda.synchronize()
        assert q_out.shape == q.shape


# ----------------------------------------------------------------------------------------------
# One tensor: rope::fused, rope::fused_backward, rope::fused_

SINGLE_CONVENTIONS = [
    Convention(),
    Convention(layout="bshd", rotary_dim=32, interleaved=True, interleaved_out=False),
    Convention(layout="thd", packed_by="cu_seqlens+offsets", head_dim=512, heads_q=2),
]


@pytest.mark.parametrize("c", SINGLE_CONVENTIONS, ids=str)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_single_tensor_ops(device: str, dtype: torch.dtype, c: Convention) -> None:
    (q, _, cos, sin), kwargs = make_call(c, dtype, device)
    out = torch.ops.rope.fused(q, cos, sin, **kwargs)
    assert out.shape == q.shape and out.stride() == torch.ops.rope.fused_qk(q, q, cos, sin, **kwargs)[0].stride()
    assert_close_to_reference(out, expected(q, cos, sin, kwargs), dtype)
    assert_close_to_reference(torch.ops.rope.fused_backward(q, cos, sin, **kwargs),
                              expected(q, cos, sin, kwargs, inverse=True), dtype)
    # The gradient, through autograd.
    leaf = q.detach().requires_grad_()
    weight = torch.randn_like(out)
    (rope_kernels.fused(leaf, cos, sin, **kwargs) * weight).sum().backward()
    assert leaf.grad is not None
    assert_close_to_reference(leaf.grad, expected(weight, cos, sin, kwargs, inverse=True), dtype)
    # In place: returns x itself, rotated.
    before = q.clone()
    assert torch.ops.rope.fused_(q, cos, sin, **kwargs) is q
    assert_close_to_reference(q, expected(before, cos, sin, kwargs), dtype)
    assert_passed_through(q, before, c)


@pytest.mark.parametrize("op", ["fused", "fused_backward", "fused_"])
@pytest.mark.parametrize("device", DEVICES)
def test_single_tensor_opcheck(device: str, op: str) -> None:
    (q, _, cos, sin), kwargs = make_call(SINGLE_CONVENTIONS[1], torch.float32, device)
    torch.library.opcheck(getattr(torch.ops.rope, op).default, (q if op == "fused_" else q.requires_grad_(), cos, sin),
                          kwargs)


def rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope_kernels.fused(x, cos, sin, rotary_dim=32, interleaved=True, layout="bshd")


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("device", DEVICES)
def test_single_tensor_compile_torchscript_export(device: str) -> None:
    (q, _, cos, sin), _ = make_call(Convention(layout="bshd", rotary_dim=32, interleaved=True), torch.float32, device)
    want = rope_one(q, cos, sin)
    assert torch.equal(torch.compile(rope_one, fullgraph=True, dynamic=True, backend="aot_eager")(q, cos, sin), want)
    assert torch.equal(torch.jit.script(rope_one)(q, cos, sin), want)

    class Module(torch.nn.Module):
        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            return rope_one(x, cos, sin)

    program = torch.export.export(Module(), (q, cos, sin))
    assert torch.equal(program.module()(q, cos, sin), want)


# ----------------------------------------------------------------------------------------------
# The op as PyTorch sees it: opcheck, gradcheck, compile, TorchScript, export

OPCHECK_CONVENTIONS = [
    Convention(interleaved=True, interleaved_out=False, rotary_dim=48),
    Convention(layout="bshd", rotary_dim=32, interleaved=True),
    Convention(layout="thd", packed_by="cu_seqlens+offsets"),
    Convention(layout="thd", packed_by="positions", head_dim=96),
]


@pytest.mark.parametrize("c", OPCHECK_CONVENTIONS, ids=str)
@pytest.mark.parametrize("op", ["fused_qk", "fused_qk_backward", "fused_qk_"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str, op: str, c: Convention) -> None:
    (q, k, cos, sin), kwargs = make_call(c, torch.float32, device)
    if op != "fused_qk_":
        q, k = q.requires_grad_(), k.requires_grad_()
    torch.library.opcheck(getattr(torch.ops.rope, op).default, (q, k, cos, sin), kwargs)


@pytest.mark.parametrize("c", OPCHECK_CONVENTIONS, ids=str)
def test_gradcheck_and_gradgradcheck(c: Convention) -> None:
    (q, k, cos, sin), kwargs = make_call(dataclasses.replace(c, seq=4, heads_q=2, heads_k=1), torch.float64, "cpu",
                                         table_dtype=torch.float64)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()

    def fn(q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.rope.fused_qk(q, k, cos, sin, **kwargs)

    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))


def rope_with_options(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return rope_kernels.fused_qk(q, k, cos, sin, interleaved=True, interleaved_out=False, rotary_dim=32,
                                 layout="thd", cu_seqlens=cu_seqlens)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_dynamic(device: str) -> None:
    compiled = torch.compile(rope_with_options, fullgraph=True, dynamic=True, backend="aot_eager")
    for documents in ((3, 0, 4, 2), (5, 6, 1, 7, 2)):
        c = Convention(layout="thd", documents=documents, rotary_dim=32, interleaved=True, interleaved_out=False)
        (q, k, cos, sin), kwargs = make_call(c, torch.float32, device)
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        got = compiled(q, k, cos, sin, kwargs["cu_seqlens"])
        want = rope_with_options(q, k, cos, sin, kwargs["cu_seqlens"])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        (got[0].sum() + got[1].sum()).backward()
        assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_torchscript(device: str) -> None:
    scripted = torch.jit.script(rope_with_options)
    c = Convention(layout="thd", rotary_dim=32, interleaved=True, interleaved_out=False)
    (q, k, cos, sin), kwargs = make_call(c, torch.float32, device)
    got = scripted(q, k, cos, sin, kwargs["cu_seqlens"])
    want = rope_with_options(q, k, cos, sin, kwargs["cu_seqlens"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class PartialRotaryBshd(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.rope.fused_qk(q, k, cos, sin, rotary_dim=48, layout="bshd", interleaved=True)


@pytest.mark.parametrize("device", DEVICES)
def test_export(device: str) -> None:
    c = Convention(layout="bshd", rotary_dim=48, interleaved=True)
    (q, k, cos, sin), _ = make_call(c, torch.float32, device)
    # Up to the table's length: the op checks the table holds every token's row.
    seq = torch.export.Dim("seq", min=2, max=cos.shape[0])
    program = torch.export.export(PartialRotaryBshd(), (q, k, cos, sin),
                                  dynamic_shapes=({1: seq}, {1: seq}, None, None))
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and "rope" in str(n.target)]
    assert len(nodes) == 1 and nodes[0].kwargs.get("rotary_dim") == 48
    for length in (5, 9):
        c2 = dataclasses.replace(c, seq=length)
        (q2, k2, _, _), _ = make_call(c2, torch.float32, device)
        got = program.module()(q2, k2, cos, sin)
        want = PartialRotaryBshd()(q2, k2, cos, sin)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------
# Errors: each bad option is refused, naming the op and the problem, on every backend


@dataclasses.dataclass(frozen=True)
class BadOption:
    name: str
    convention: Convention
    change: Dict[str, Any]  # keyword arguments replaced ("<tensor>" values are built per device)
    problem: str
    devices: Tuple[str, ...] = ("cpu", "meta", "cuda")


BAD_OPTIONS: List[BadOption] = [
    BadOption("odd_rotary_dim", Convention(), {"rotary_dim": 31}, r"rotary_dim must be even and positive"),
    BadOption("zero_rotary_dim", Convention(), {"rotary_dim": 0}, r"rotary_dim must be even and positive"),
    BadOption("rotary_dim_past_the_head", Convention(), {"rotary_dim": 66}, r"rotary_dim \(66\) exceeds head_dim \(64\)"),
    BadOption("table_for_another_rotary_dim", Convention(rotary_dim=32), {"rotary_dim": 48},
              r"cos and sin must have rotary_dim/2 \(24\) or rotary_dim \(48\) columns"),
    BadOption("unknown_layout", Convention(), {"layout": "sbhd"}, r'layout must be "bhsd", "bshd" or "thd"'),
    BadOption("thd_with_4d", Convention(), {"layout": "thd"}, r"q must be 3-D \(tokens, heads, head_dim\)"),
    BadOption("bshd_with_3d", Convention(layout="thd"), {"layout": "bshd", "cu_seqlens": None},
              r"q must be 4-D \(batch, seq, heads, head_dim\)"),
    BadOption("cu_seqlens_without_thd", Convention(), {"cu_seqlens": "<cu>"}, r'cu_seqlens needs packed sequences'),
    BadOption("cu_seqlens_and_positions", Convention(layout="thd"), {"positions": "<positions>"},
              r"pass positions or cu_seqlens, not both"),
    BadOption("offsets_without_cu_seqlens", Convention(layout="thd", packed_by="positions"),
              {"seqlen_offsets": "<offsets>"}, r"seqlen_offsets needs cu_seqlens"),
    BadOption("offsets_of_another_count", Convention(layout="thd"), {"seqlen_offsets": "<two offsets>"},
              r"seqlen_offsets must be 1-D with one offset per document \(4\)"),
    BadOption("float_cu_seqlens", Convention(layout="thd"), {"cu_seqlens": "<float cu>"},
              r"cu_seqlens must be int32 or int64"),
    BadOption("cu_seqlens_2d", Convention(layout="thd"), {"cu_seqlens": "<2-D cu>"}, r"cu_seqlens must be 1-D"),
    BadOption("cu_seqlens_of_no_document", Convention(layout="thd"), {"cu_seqlens": "<cu of none>"},
              r"cu_seqlens of shape \[1\] holds no document, but there are 9 tokens"),
    # Index tensors left on the CPU beside CUDA q and k (the kernel would read host memory).
    BadOption("cu_seqlens_on_another_device", Convention(layout="thd"), {"cu_seqlens": "<cu on the cpu>"},
              r"cu_seqlens must be on q's device \(cuda:0\); got cpu", devices=("cuda",)),
    BadOption("offsets_on_another_device", Convention(layout="thd"), {"seqlen_offsets": "<offsets on the cpu>"},
              r"seqlen_offsets must be on q's device \(cuda:0\); got cpu", devices=("cuda",)),
    # The values: only where reading them needs no device synchronization.
    BadOption("cu_seqlens_not_from_0", Convention(layout="thd"), {"cu_seqlens": "<cu from 1>"},
              r"cu_seqlens must start at 0", devices=("cpu",)),
    BadOption("cu_seqlens_decreasing", Convention(layout="thd"), {"cu_seqlens": "<cu decreasing>"},
              r"cu_seqlens must not decrease", devices=("cpu",)),
    BadOption("cu_seqlens_short_of_the_tokens", Convention(layout="thd"), {"cu_seqlens": "<cu short>"},
              r"cu_seqlens must end at the token count \(9\)", devices=("cpu",)),
]

_SPECIAL_VALUES = {
    "<cu>": lambda: torch.tensor([0, 9]),
    "<positions>": lambda: torch.arange(9),
    "<offsets>": lambda: torch.tensor([0]),
    "<two offsets>": lambda: torch.tensor([0, 1]),
    "<float cu>": lambda: torch.tensor([0.0, 9.0]),
    "<2-D cu>": lambda: torch.tensor([[0, 9]]),
    "<cu of none>": lambda: torch.tensor([0]),
    "<cu from 1>": lambda: torch.tensor([1, 3, 3, 7, 9]),
    "<cu decreasing>": lambda: torch.tensor([0, 3, 2, 7, 9]),
    "<cu short>": lambda: torch.tensor([0, 3, 3, 7, 8]),
    "<cu on the cpu>": lambda: torch.tensor([0, 3, 3, 7, 9]),
    "<offsets on the cpu>": lambda: torch.tensor([0, 1, 2, 3]),
}


def bad_option_params() -> List[Any]:
    params = []
    for bad in BAD_OPTIONS:
        for device in bad.devices:
            marks = [requires_cuda] if device == "cuda" else []
            params.append(pytest.param(device, bad, id=f"{device}-{bad.name}", marks=marks))
    return params


@pytest.mark.parametrize("op", ["fused_qk", "fused_qk_backward", "fused_qk_"])
@pytest.mark.parametrize(("device", "bad"), bad_option_params())
def test_bad_option_is_refused(device: str, bad: BadOption, op: str) -> None:
    message = bad_option_refusal(bad, device, op)
    assert message.startswith(f"rope::{op}: "), message
    assert re.search(bad.problem, message), f"message does not say {bad.problem!r}: {message!r}"


def bad_option_refusal(bad: BadOption, device: str, op: str) -> str:
    """The message of the RuntimeError the op raises for the bad option on device."""
    (q, k, cos, sin), kwargs = make_call(bad.convention, torch.float32, "cpu" if device == "meta" else device)
    for key, value in bad.change.items():
        if isinstance(value, str) and value.startswith("<"):
            special = _SPECIAL_VALUES[value]()
            kwargs[key] = special if value.endswith("on the cpu>") else special.to(q.device)
        else:
            kwargs[key] = value
    if device == "meta":
        q, k, cos, sin = (t.to("meta") for t in (q, k, cos, sin))
        kwargs = {key: v.to("meta") if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.rope, op)(q, k, cos, sin, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_index_tensors(device: str) -> None:
    # cu_seqlens and seqlen_offsets as every-other-element views: read through their strides.
    c = Convention(layout="thd", storage="dense", packed_by="cu_seqlens+offsets")
    (q, k, cos, sin), kwargs = make_call(c, torch.float32, device)
    for key in ("cu_seqlens", "seqlen_offsets"):
        spread = torch.zeros(2 * kwargs[key].numel(), dtype=kwargs[key].dtype, device=device)
        spread[::2] = kwargs[key]
        kwargs[key] = spread[::2]
    q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, **kwargs)
    assert_close_to_reference(q_out, expected(q, cos, sin, kwargs), torch.float32)
    assert_close_to_reference(k_out, expected(k, cos, sin, kwargs), torch.float32)
