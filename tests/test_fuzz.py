"""Property-based tests: every op of the library on random inputs, against the float64 reference.

Hypothesis draws the shapes (0 and 1 in every dimension), the dtypes, the strides of q and k
(transposed, sliced with gaps, at a storage offset, expanded), the GQA ratio, positions in and
out of the table (NaN tokens), every table form and every keyword argument of the op (pairs,
rotary_dim, the three layouts, packed sequences by cu_seqlens, offsets or positions). Each example
checks the values, the output sizes and strides against the Meta kernel, that no input changed,
and that nothing outside the outputs was written (in place: nothing outside q and k).

Profiles, by the environment variable ROPE_FUZZ_PROFILE: "ci" (the default; a few hundred
examples per test, the same ones every run) and "long" (5,000 per test, new ones each run).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_env import DEVICES
from rope_kernels.testing import assert_close_to_reference, cos_sin_tables, reference_rope

settings.register_profile("ci", max_examples=400, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("ROPE_FUZZ_PROFILE", "ci")

DTYPES = {"cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
          "cuda": (torch.float16, torch.bfloat16, torch.float32)}
# Even head sizes: small ones, sizes whose half is not a power of two, and the largest the CUDA
# kernels take.
HEAD_DIMS = (2, 4, 6, 8, 10, 16, 24, 30, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 512)


@dataclasses.dataclass
class Strided:
    """A tensor drawn as a view into a larger buffer, and the buffer itself (to see what the op
    wrote around the view)."""

    view: torch.Tensor
    buffer: torch.Tensor

    def outside(self) -> torch.Tensor:
        """The buffer's elements that the view does not reach."""
        reached = torch.zeros(self.buffer.numel(), dtype=torch.bool, device=self.buffer.device)
        reached.as_strided(self.view.shape, self.view.stride(), self.view.storage_offset()).fill_(True)
        return self.buffer[~reached]


@st.composite
def strided(draw: st.DrawFn, shape: Tuple[int, ...], dtype: torch.dtype, device: str, expandable: bool,
            make: Callable[[int], torch.Tensor]) -> Strided:
    """A view of `shape` whose last dimension is contiguous (or, rarely, strided by 2) and whose
    other dimensions lie in any order, with gaps, after an offset, or expanded (stride 0)."""
    order = draw(st.permutations(range(len(shape) - 1)))  # outermost first
    last_stride = draw(st.sampled_from((1, 1, 1, 2)))
    strides = [0] * len(shape)
    strides[-1] = last_stride
    step = last_stride * (shape[-1] + draw(st.sampled_from((0, 0, 1, 4))))
    for dim in reversed(order):  # innermost first
        if expandable and draw(st.integers(0, 5)) == 0:
            strides[dim] = 0
            continue
        strides[dim] = step
        step *= shape[dim] + draw(st.sampled_from((0, 0, 1, 2)))
    offset = draw(st.sampled_from((0, 0, 1, 8)))
    reach = sum(s * (n - 1) for s, n in zip(strides, shape)) if all(shape) else 0
    buffer = make(offset + reach + 1 + draw(st.sampled_from((0, 3)))).to(dtype).to(device)
    return Strided(buffer.as_strided(shape, strides, offset), buffer)


@dataclasses.dataclass
class Call:
    """One drawn call: q, k, the tables and every keyword argument."""

    q: Strided
    k: Strided
    cos: torch.Tensor
    sin: torch.Tensor
    kwargs: Dict[str, Any]

    def args(self) -> Tuple[torch.Tensor, ...]:
        return self.q.view, self.k.view, self.cos, self.sin

    def index_tensors(self) -> List[torch.Tensor]:
        return [t for t in self.kwargs.values() if isinstance(t, torch.Tensor)]


@st.composite
def calls(draw: st.DrawFn, device: str, in_place: bool = False) -> Call:
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def normal(n: int) -> torch.Tensor:
        return torch.randn(n, generator=generator)

    dtype = draw(st.sampled_from(DTYPES[device]))
    layout = draw(st.sampled_from(("bhsd", "bshd", "thd")))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    heads_q = draw(st.integers(0, 5))
    heads_k = draw(st.integers(0, 3))
    rotary_dim = draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda half: 2 * half)))
    rotary = head_dim if rotary_dim is None else rotary_dim
    interleaved = draw(st.booleans())
    interleaved_out = draw(st.sampled_from((None, False, True)))
    kwargs: Dict[str, Any] = {"interleaved": interleaved, "interleaved_out": interleaved_out,
                              "rotary_dim": rotary_dim, "layout": layout}

    index_dtype = draw(st.sampled_from((torch.int32, torch.int64)))
    if layout == "thd":
        documents = draw(st.lists(st.integers(0, 4), min_size=1, max_size=4))
        batch, seq = 1, sum(documents)
        shape_q: Tuple[int, ...] = (seq, heads_q, head_dim)
        shape_k: Tuple[int, ...] = (seq, heads_k, head_dim)
        packed_by = draw(st.sampled_from(("cu_seqlens", "cu_seqlens+offsets", "positions", "none")))
        if packed_by.startswith("cu_seqlens"):
            bounds = [0]
            for length in documents:
                bounds.append(bounds[-1] + length)
            kwargs["cu_seqlens"] = torch.tensor(bounds, dtype=index_dtype, device=device)
            if packed_by == "cu_seqlens+offsets":
                offsets = draw(st.lists(st.integers(0, 3), min_size=len(documents), max_size=len(documents)))
                kwargs["seqlen_offsets"] = torch.tensor(offsets, dtype=draw(st.sampled_from((torch.int32, torch.int64))),
                                                        device=device)
        positions_shape: Optional[Tuple[int, ...]] = (seq,) if packed_by == "positions" else None
    else:
        batch, seq = draw(st.integers(0, 3)), draw(st.integers(0, 6))
        if layout == "bshd":
            shape_q, shape_k = (batch, seq, heads_q, head_dim), (batch, seq, heads_k, head_dim)
        else:
            shape_q, shape_k = (batch, heads_q, seq, head_dim), (batch, heads_k, seq, head_dim)
        positions_shape = draw(st.sampled_from((None, (batch, seq), (seq,))))

    # The table: long enough for every token without positions; with them, maybe shorter, so
    # that some positions fall outside it (those tokens are NaN).
    has_positions = positions_shape is not None
    rows = draw(st.integers(0 if has_positions else seq + 7, seq + 7))
    if positions_shape is not None:
        positions = torch.randint(-2, rows + 3, positions_shape, generator=generator, dtype=torch.int64)
        kwargs["positions"] = positions.to(index_dtype).to(device)
        if len(positions_shape) == 2 and draw(st.booleans()):  # a transposed (S, B) tensor
            kwargs["positions"] = kwargs["positions"].t().contiguous().t()
    table_dtype = draw(st.sampled_from((torch.float32, dtype)))
    full_width = draw(st.booleans())
    cos, sin = cos_sin_tables(max(rows, seq + 7), rotary, full_width=full_width, dtype=table_dtype, device=device)
    cos, sin = cos[:rows], sin[:rows]
    table_form = draw(st.sampled_from(("shared", "leading", "per_sequence", "side_by_side")))
    if table_form == "leading":  # Hugging Face's (1, 1, S, W)
        cos, sin = cos[None, None], sin[None, None]
    elif table_form == "per_sequence" and layout != "thd":  # (B, S, W), each sequence its own angles
        shift = torch.randint(0, 3, (batch,), generator=generator).tolist()
        cos_all, sin_all = cos_sin_tables(rows + 3, rotary, full_width=full_width, dtype=table_dtype, device=device)
        cos = torch.stack([cos_all[b:b + rows] for b in shift]) if batch else cos[None].expand(0, -1, -1)
        sin = torch.stack([sin_all[b:b + rows] for b in shift]) if batch else sin[None].expand(0, -1, -1)
    elif table_form == "side_by_side":  # one buffer, sin at a storage offset
        both = torch.cat([cos, sin], dim=-1)
        cos, sin = both[..., :cos.shape[-1]], both[..., cos.shape[-1]:]

    q = draw(strided(shape_q, dtype, device, not in_place, normal))
    k = draw(strided(shape_k, dtype, device, not in_place, normal))
    return Call(q, k, cos, sin, kwargs)


def on_meta(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A Meta tensor of t's sizes and strides."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def expected(x: torch.Tensor, call: Call, inverse: bool) -> torch.Tensor:
    options = {key: value for key, value in call.kwargs.items() if key != "positions"}
    return reference_rope(x, call.cos, call.sin, call.kwargs.get("positions"), inverse, **options)


def assert_as_meta(outputs: Tuple[torch.Tensor, ...], meta_outputs: Tuple[torch.Tensor, ...]) -> None:
    for out, meta in zip(outputs, meta_outputs):
        assert out.shape == meta.shape, f"sizes {tuple(out.shape)}, Meta kernel {tuple(meta.shape)}"
        if out.numel() > 1:
            assert out.stride() == meta.stride(), f"strides {out.stride()}, Meta kernel {meta.stride()}"


@pytest.mark.parametrize("op_name", ["fused_qk", "fused_qk_backward"])
@pytest.mark.parametrize("device", DEVICES)
@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_out_of_place(device: str, op_name: str, data: st.DataObject) -> None:
    call = data.draw(calls(device))
    inputs = [call.q.buffer, call.k.buffer, call.cos, call.sin, *call.index_tensors()]
    before = [t.clone() for t in inputs]
    op = getattr(torch.ops.rope, op_name)
    outputs = op(*call.args(), **call.kwargs)
    inverse = op_name == "fused_qk_backward"
    for out, x in zip(outputs, (call.q.view, call.k.view)):
        assert_close_to_reference(out, expected(x, call, inverse), x.dtype)
    for now, then in zip(inputs, before):
        assert torch.equal(now, then), "the op wrote one of its inputs"
    meta_kwargs = {key: on_meta(value) if isinstance(value, torch.Tensor) else value
                   for key, value in call.kwargs.items()}
    meta_outputs = op(*(on_meta(t) for t in call.args()), **meta_kwargs)
    assert_as_meta(outputs, meta_outputs)


@pytest.mark.parametrize("device", DEVICES)
@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_in_place(device: str, data: st.DataObject) -> None:
    call = data.draw(calls(device, in_place=True))
    q, k = call.q.view, call.k.view
    want = [expected(x, call, False) for x in (q, k)]
    around = [call.q.outside().clone(), call.k.outside().clone()]
    tables = [t.clone() for t in (call.cos, call.sin, *call.index_tensors())]
    returned = torch.ops.rope.fused_qk_(*call.args(), **call.kwargs)
    assert returned[0] is q and returned[1] is k
    for x, reference in zip((q, k), want):
        assert_close_to_reference(x, reference, x.dtype)
    for strided_input, then in zip((call.q, call.k), around):
        assert torch.equal(strided_input.outside(), then), "the op wrote outside q or k"
    for now, then in zip((call.cos, call.sin, *call.index_tensors()), tables):
        assert torch.equal(now, then), "the op wrote a table or an index tensor"


@pytest.mark.parametrize("device", DEVICES)
@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_single_tensor(device: str, data: st.DataObject) -> None:
    # rope::fused on q alone, and its backward, as the pair op computes them.
    call = data.draw(calls(device))
    x = call.q.view
    out = torch.ops.rope.fused(x, call.cos, call.sin, **call.kwargs)
    assert_close_to_reference(out, expected(x, call, False), x.dtype)
    grad = torch.ops.rope.fused_backward(x, call.cos, call.sin, **call.kwargs)
    assert_close_to_reference(grad, expected(x, call, True), x.dtype)
