"""rope_kernels.testing itself, on the CPU: the float64 reference is the rotate_half formula, the
tolerances catch errors a few ulps past what they allow, and the layouts are what they claim."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from rope_kernels.testing import (ANY_FORMULA, FUSED_KERNEL, LAYOUTS, POSITIONS, WORKLOADS, RopeCase,
                                  assert_close_to_reference, check_rotation, cos_sin_tables, error_ratio,
                                  fused_qkv_heads, make_args, random_heads, random_qk, reference_fused_qk,
                                  reference_rope, reference_rope_and_size, rope_angles, tolerance,
                                  unit_roundoff, workload_by_name)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hand_written(x: torch.Tensor, cos_full: torch.Tensor, sin_full: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Hugging Face's formula in float64, the table rows gathered by hand token by token."""
    batch, _, seq, _ = x.shape
    c = torch.stack([torch.stack([cos_full[int(positions[b, s])] for s in range(seq)]) for b in range(batch)])
    s_ = torch.stack([torch.stack([sin_full[int(positions[b, s])] for s in range(seq)]) for b in range(batch)])
    x64 = x.double()
    return x64 * c[:, None].double() + rotate_half(x64) * s_[:, None].double()


@pytest.mark.parametrize("head_dim", [2, 16, 64, 96])
def test_reference_is_the_rotate_half_formula(head_dim: int) -> None:
    batch, heads, seq, rows = 3, 2, 5, 11
    x = torch.randn(batch, heads, seq, head_dim, dtype=torch.float64)
    positions = torch.randint(0, rows, (batch, seq))
    cos_full, sin_full = cos_sin_tables(rows, head_dim, full_width=True, dtype=torch.float64)
    expected = hand_written(x, cos_full, sin_full, positions)
    cos_half, sin_half = cos_sin_tables(rows, head_dim, dtype=torch.float64)
    for cos, sin in ((cos_full, sin_full), (cos_half, sin_half), (cos_full[None, None], sin_full[None, None])):
        torch.testing.assert_close(reference_rope(x, cos, sin, positions), expected, rtol=1e-14, atol=1e-14)
    # Without positions token s uses row s; inverse rotates back.
    arange = torch.arange(seq).expand(batch, seq)
    torch.testing.assert_close(reference_rope(x, cos_half, sin_half), hand_written(x, cos_full, sin_full, arange))
    back = reference_rope(reference_rope(x, cos_half, sin_half, positions), cos_half, sin_half, positions, inverse=True)
    torch.testing.assert_close(back, x)
    ref, size = reference_rope_and_size(x, cos_half, sin_half, positions)
    torch.testing.assert_close(ref, expected, rtol=1e-14, atol=1e-14)
    assert bool((size >= ref.abs() - 1e-12).all())


def test_reference_per_sequence_tables_and_out_of_range_rows() -> None:
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    cos, sin = cos_sin_tables(6, 8, dtype=torch.float64)
    per_sequence_cos = torch.stack([cos, cos.flip(0)])
    per_sequence_sin = torch.stack([sin, sin.flip(0)])
    out = reference_rope(x, per_sequence_cos, per_sequence_sin)
    torch.testing.assert_close(out[0], reference_rope(x[:1], cos, sin)[0])
    torch.testing.assert_close(out[1], reference_rope(x[1:], cos.flip(0), sin.flip(0))[0])
    positions = torch.tensor([[0, -1, 5, 6], [2 ** 32 + 1, 1, 2, 3]])
    out = reference_rope(x, cos, sin, positions)
    nan_tokens = out.isnan().all(-1).all(1)  # (B, S)
    assert nan_tokens.tolist() == [[False, True, False, True], [True, False, False, False]]
    assert not out.isnan()[~nan_tokens[:, None].expand(2, 3, 4)].any()


def test_tables_are_real_rope_angles() -> None:
    angles = rope_angles(5, 8)
    assert angles.dtype == torch.float64 and angles.shape == (5, 4)
    assert angles[3, 1].item() == pytest.approx(3 * 10000.0 ** (-2 / 8))
    cos, sin = cos_sin_tables(5, 8, full_width=True, dtype=torch.bfloat16)
    assert cos.shape == (5, 8) and cos.dtype == torch.bfloat16
    assert torch.equal(cos[:, :4], cos[:, 4:]) and torch.equal(sin[:, :4], sin[:, 4:])
    assert torch.equal(cos[:, :4], angles.cos().to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_assert_close_catches_a_few_ulps_past_its_tolerance(dtype: torch.dtype) -> None:
    args = make_args(RopeCase(dtype=dtype), "cpu")
    expected, _ = reference_fused_qk(args)
    rounded = expected.to(dtype)  # one rounding of the exact result: within the tolerance
    assert_close_to_reference(rounded, expected, dtype)
    tol = tolerance(dtype)
    index = (0, 1, 2, 3)
    value = float(expected[index])
    allowed = tol["atol"] + tol["rtol"] * abs(value)
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(value)))
    wrong = expected.clone()
    wrong[index] = value + allowed + 3 * ulp  # a few ulps past the allowance
    with pytest.raises(AssertionError):
        assert_close_to_reference(wrong.to(dtype), expected, dtype)
    nan = rounded.clone()
    nan[index] = math.nan
    with pytest.raises(AssertionError):
        assert_close_to_reference(nan, expected, dtype)
    with pytest.raises(AssertionError):  # wrong dtype
        assert_close_to_reference(expected, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rounding_models_catch_a_few_ulps_past_their_allowance(dtype: torch.dtype) -> None:
    x = random_heads("bshd", 2, 3, 5, 16, dtype)
    cos, sin = cos_sin_tables(5, 16)
    reference, size = reference_rope_and_size(x, cos, sin)
    rounded = reference.to(dtype)
    assert error_ratio(rounded, reference, size, FUSED_KERNEL) <= 1.0
    index = (1, 2, 3, 4)
    for model in (FUSED_KERNEL, ANY_FORMULA):
        allowed = float(model.allowed(reference, size, dtype)[index])
        value = float(reference[index])
        wrong = reference.clone()
        wrong[index] = value + allowed * 1.5 + 4 * unit_roundoff(dtype) * abs(value)
        assert error_ratio(wrong.to(dtype), reference, size, model) > 1.0
    nan = rounded.clone()
    nan[index] = math.nan
    assert error_ratio(nan, reference, size) == math.inf

    # The chunked gate of the benchmark, on per-token angles.
    cos_half, sin_half = cos[None, :5].double(), sin[None, :5].double()
    assert check_rotation("x", rounded, x, cos_half, sin_half, inverse=False).passed
    allowed = float(ANY_FORMULA.allowed(reference, size, dtype)[index])
    wrong = reference.clone()
    wrong[index] = float(reference[index]) + 2 * allowed
    result = check_rotation("x", wrong.to(dtype), x, cos_half, sin_half, inverse=False)
    assert not result.passed and result.bad_elements == 1 and "roundings" in result.message
    assert not check_rotation("x", nan, x, cos_half, sin_half, inverse=False).passed
    assert not check_rotation("x", rounded, x, cos_half, sin_half, inverse=True).passed


def test_layouts_are_the_views_they_claim() -> None:
    b, h, s, d = 2, 3, 5, 8
    dense = random_heads("bhsd", b, h, s, d)
    assert dense.shape == (b, h, s, d) and dense.is_contiguous()
    bshd = random_heads("bshd", b, h, s, d)
    assert bshd.shape == (b, h, s, d) and not bshd.is_contiguous()
    assert bshd.transpose(1, 2).is_contiguous() and bshd.stride() == (s * h * d, d, h * d, 1)
    padded = random_heads("padded", b, h, s, d)
    assert padded.shape == (b, h, s, d) and not padded.is_contiguous() and padded.storage_offset() % 2 == 1
    assert padded.untyped_storage().nbytes() > padded.numel() * padded.element_size()
    broadcast = random_heads("broadcast", b, h, s, d)
    assert broadcast.stride(1) == 0
    strided = random_heads("strided_d", b, h, s, d)
    assert strided.stride(-1) == 2
    for t in (dense, bshd, padded, broadcast, strided):
        assert not t.isnan().any()
    for t in (padded, strided):  # everything else in the buffer is NaN
        whole = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
        assert whole.isnan().sum() == whole.numel() - t.numel()

    q, k = fused_qkv_heads(b, s, 4, 2, d)
    assert q.shape == (b, 4, s, d) and k.shape == (b, 2, s, d)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert q.storage_offset() == 0 and k.storage_offset() == 4 * d
    assert q.stride(2) == k.stride(2) == (4 + 2 * 2) * d  # token rows wider than the heads
    assert not q.isnan().any() and not k.isnan().any()
    whole = torch.empty(0, dtype=q.dtype).set_(q.untyped_storage())
    assert whole.isnan().sum() == b * s * 2 * d  # v

    for layout in LAYOUTS:
        q, k = random_qk(layout, b, 4, 2, s, d, torch.bfloat16)
        assert q.shape == (b, 4, s, d) and k.shape == (b, 2, s, d) and q.dtype == torch.bfloat16
        assert layout == "bhsd" or not q.is_contiguous()
    with pytest.raises(ValueError):
        random_heads("qkv", b, h, s, d)

    generator = torch.Generator().manual_seed(3)
    first = random_heads("bshd", b, h, s, d, generator=generator)
    again = random_heads("bshd", b, h, s, d, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)


@pytest.mark.parametrize("positions", POSITIONS)
def test_make_args_follows_the_case(positions: str) -> None:
    case = RopeCase(layout="qkv", positions=positions, table_width="full", table_leading=2,
                    table_layout="packed", table_dtype="same", dtype=torch.float16)
    args = make_args(case, "cpu", requires_grad=True)
    assert args.q.is_leaf and args.q.requires_grad and not args.q.is_contiguous()
    assert args.cos.shape == (1, 1, case.rows, case.head_dim) and args.cos.dtype == torch.float16
    assert args.sin.storage_offset() == case.head_dim
    if positions == "none":
        assert args.positions is None
    else:
        assert args.positions is not None and args.positions.dtype == getattr(torch, positions.split(":")[1])
        assert positions != "sb:int64" or not args.positions.is_contiguous()


def test_workload_table() -> None:
    assert len({w.name for w in WORKLOADS}) == len(WORKLOADS)
    main = workload_by_name("llama8b-train")
    assert (main.batch, main.seq, main.heads_q, main.heads_k, main.head_dim) == (4, 4096, 32, 8, 128)
    assert main.bytes_moved == 2 * 4 * 4096 * 40 * 128 * 2
    assert main.smoke().seq == 8 and workload_by_name("decode-b64").smoke().seq == 1
    with pytest.raises(KeyError):
        workload_by_name("nope")


def test_module_needs_neither_pytest_nor_a_gpu() -> None:
    code = ("import sys; sys.modules['pytest'] = None; import rope_kernels.testing as t; "
            "a = t.make_args(t.RopeCase(), 'cpu'); t.reference_fused_qk(a)")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
