"""Triton source of the fused RoPE kernel (compiled ahead of time, never JIT-launched).

One program rotates every q head and every k head of one token (b, s): the cos/sin row of
that token is read once and reused for all heads, and q and k share one launch. q, k and the
outputs are addressed through their batch/head/sequence strides, so a transposed view of a
(B, S, H, D) projection is read where it lies. The last dimension is always contiguous (the
launcher guarantees it).

Forward and backward are the same code: backward is the rotation by the negated angle, which
the launcher asks for with ``sin_sign = -1``.
"""
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(src_base, src_stride_h, dst_base, dst_stride_h, n_heads, half_dim, cos, sin,
                  BLOCK_D2: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate n_heads head vectors of one token, BLOCK_H heads at a time, math in fp32."""
    d = tl.arange(0, BLOCK_D2)
    h = tl.arange(0, BLOCK_H)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + h)[:, None]
        mask = (heads < n_heads) & (d < half_dim)[None, :]
        src = src_base + heads.to(tl.int64) * src_stride_h + d[None, :]
        dst = dst_base + heads.to(tl.int64) * dst_stride_h + d[None, :]
        x1 = tl.load(src, mask=mask).to(tl.float32)
        x2 = tl.load(src + half_dim, mask=mask).to(tl.float32)
        out_ty = dst_base.dtype.element_ty
        tl.store(dst, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
        tl.store(dst + half_dim, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def rope_qk_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr,
    cos_ptr, sin_ptr, pos_ptr,
    seq_len, n_heads_q, n_heads_k, half_dim, table_rows, sin_sign,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    q_out_stride_b, q_out_stride_h, q_out_stride_s,
    k_out_stride_b, k_out_stride_h, k_out_stride_s,
    cos_stride_row, sin_stride_row,
    pos_stride_b, pos_stride_s,
    BLOCK_D2: tl.constexpr,  # half_dim rounded up to a power of two
    BLOCK_H: tl.constexpr,  # heads rotated per inner step
    HAS_POS: tl.constexpr,  # positions tensor given (int32 or int64, from pos_ptr's type)
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token - b * seq_len

    if HAS_POS:
        row = tl.load(pos_ptr + b * pos_stride_b + s * pos_stride_s).to(tl.int64)
    else:
        row = s
    # A position outside the table must not read out of bounds: such a token's outputs are NaN
    # (documented), which makes the bad input visible instead of silently rotating by a wrong angle.
    row_ok = (row >= 0) & (row < table_rows)
    row = tl.where(row_ok, row, 0)

    d = tl.arange(0, BLOCK_D2)
    d_ok = d < half_dim
    cos = tl.load(cos_ptr + row * cos_stride_row + d, mask=d_ok & row_ok, other=float("nan")).to(tl.float32)
    sin = tl.load(sin_ptr + row * sin_stride_row + d, mask=d_ok & row_ok, other=float("nan")).to(tl.float32)
    sin = sin * sin_sign.to(tl.float32)
    cos = cos[None, :]
    sin = sin[None, :]

    _rotate_heads(q_ptr + b * q_stride_b + s * q_stride_s, q_stride_h,
                  q_out_ptr + b * q_out_stride_b + s * q_out_stride_s, q_out_stride_h,
                  n_heads_q, half_dim, cos, sin, BLOCK_D2, BLOCK_H)
    _rotate_heads(k_ptr + b * k_stride_b + s * k_stride_s, k_stride_h,
                  k_out_ptr + b * k_out_stride_b + s * k_out_stride_s, k_out_stride_h,
                  n_heads_k, half_dim, cos, sin, BLOCK_D2, BLOCK_H)
