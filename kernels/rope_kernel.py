"""Triton source of the fused RoPE kernel (compiled ahead of time, never JIT-launched by the library).

Each program rotates BLOCK_H consecutive heads of one token t = b * seq_len + s, counted along
one axis that holds q's heads and then k's: head block j covers heads j * BLOCK_H ... of that
axis, so q and k share one launch (GQA: k may have fewer heads), a block may hold heads of both,
and with BLOCK_H >= n_heads_q + n_heads_k one program rotates the whole token. The launcher picks
the order in which programs walk (batch, sequence, head block) to follow memory and says which
in ``grid_order``: heads fastest for a (B, S, H, D) layout, grid (head blocks, seq_len, batch);
sequence fastest for (B, H, S, D), grid (seq_len, head blocks, batch). Each program reads its
coordinates straight from its grid indices: no integer division stands between its start and its
first load, which is most of the latency of a decoding step's kernel. Where the sequence or the
batch exceeds the 65535 the y and z extents hold (long context), a one-dimensional grid walks
heads fastest and divides instead.

The table in aot_specs.py sets BLOCK_H and the warp count per element size, head-dim block and
grid class, from measurements: bandwidth-bound launches want many small programs, latency-bound
ones (decode, short prefill) few programs holding all of a token's heads (docs/performance.md has
the figures).

q, k and the outputs are addressed through their batch/head/sequence strides, so a transposed view
of a (B, S, H, D) projection is read where it lies. The last dimension is always contiguous (the
launcher guarantees it). The aligned variants take the strides as 32-bit integers (the launcher
picks them only when every stride fits), the general ones as 64-bit; offsets are 64-bit in both.

Token (b, s) reads row positions[b, s] (or s, without positions) of the cos/sin table of its
sequence: one table shared by every sequence (batch stride 0), or one per sequence, as Hugging
Face models pass the angles of each token, (B, S, D).

Forward and backward are the same code: backward is the rotation by the negated angle, which the
launcher asks for with ``sin_sign = -1``.
"""
import triton
import triton.language as tl

# Values of grid_order: which grid index is which coordinate (the launcher's GridOrder enum holds
# the same numbers; the generated kernel table asserts it).
GRID_FLAT = tl.constexpr(0)
GRID_HEADS_FASTEST = tl.constexpr(1)
GRID_SEQUENCE_FASTEST = tl.constexpr(2)


@triton.jit
def rope_qk_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr,
    cos_ptr, sin_ptr, pos_ptr,
    seq_len, n_heads_q, n_heads_k, half_dim, table_rows, sin_sign, grid_order,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    q_out_stride_b, q_out_stride_h, q_out_stride_s,
    k_out_stride_b, k_out_stride_h, k_out_stride_s,
    cos_stride_row, sin_stride_row,
    cos_stride_b, sin_stride_b,  # 0 for one table shared by every sequence
    pos_stride_b, pos_stride_s,
    BLOCK_D2: tl.constexpr,  # half_dim rounded up to a power of two
    BLOCK_H: tl.constexpr,  # heads per program
    HAS_POS: tl.constexpr,  # positions tensor given (int32 or int64, from pos_ptr's type)
    EVEN_D: tl.constexpr,  # half_dim == BLOCK_D2: no feature of a row is masked
):
    if grid_order == GRID_HEADS_FASTEST:
        # (head blocks, seq_len, batch): neighbouring programs read neighbouring memory when a
        # token's heads lie together, (B, S, H, D).
        head_block = tl.program_id(0)
        s32 = tl.program_id(1)
        b32 = tl.program_id(2)
    elif grid_order == GRID_SEQUENCE_FASTEST:
        # (seq_len, head blocks, batch): for layouts whose heads lie apart, (B, H, S, D).
        s32 = tl.program_id(0)
        head_block = tl.program_id(1)
        b32 = tl.program_id(2)
    else:
        # One dimension, heads fastest (GRID_FLAT), for grids the other two cannot hold: program p
        # is head block p % n_blocks of token p // n_blocks. 32-bit divisions: the launcher keeps
        # the grid below 2^31 programs.
        n_blocks = tl.cdiv(n_heads_q + n_heads_k, BLOCK_H)
        program = tl.program_id(0)
        token = program // n_blocks
        head_block = program - token * n_blocks
        b32 = token // seq_len
        s32 = token - b32 * seq_len
    # Indices in 32 bits, addresses in 64.
    b = b32.to(tl.int64)
    s = s32.to(tl.int64)

    # The block's rows index q's heads and then k's as one axis: row r is q head r while
    # r < n_heads_q and k head r - n_heads_q after that. A block may straddle the two, so a
    # token's q and k heads fill whole blocks (40 heads take one block of 64, not 32 + 32), and
    # one program can rotate every head of a token with a single cos/sin row.
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    is_q = (heads < n_heads_q)[:, None]
    k_heads = heads - n_heads_q  # negative on q's rows, whose k addresses are never used
    d = tl.arange(0, BLOCK_D2)
    d_ok = d < half_dim
    head_ok = (heads < n_heads_q + n_heads_k)[:, None]
    if EVEN_D:
        # A mask along heads only: a mask over heads and features both is slower on wide grids
        # (docs/performance.md).
        mask = tl.broadcast_to(head_ok, (BLOCK_H, BLOCK_D2))
    else:
        mask = head_ok & d_ok[None, :]
    q_tile = b * q_stride_b + s * q_stride_s + heads.to(tl.int64)[:, None] * q_stride_h + d[None, :]
    k_tile = b * k_stride_b + s * k_stride_s + k_heads.to(tl.int64)[:, None] * k_stride_h + d[None, :]
    q_out_tile = b * q_out_stride_b + s * q_out_stride_s + heads.to(tl.int64)[:, None] * q_out_stride_h + d[None, :]
    k_out_tile = b * k_out_stride_b + s * k_out_stride_s + k_heads.to(tl.int64)[:, None] * k_out_stride_h + d[None, :]
    # Chosen per element between whole pointer tiles: the condition is constant along a row, so
    # the compiler keeps the rows' 16-byte vector accesses (a choice between per-row base
    # pointers, broadcast afterwards, compiles to scalar accesses).
    src_tile = tl.where(is_q, q_ptr + q_tile, k_ptr + k_tile)
    dst_tile = tl.where(is_q, q_out_ptr + q_out_tile, k_out_ptr + k_out_tile)

    # q/k first: their addresses need no other load, so they are in flight while the position
    # and then its cos/sin row (a chain of two dependent loads) arrive.
    x1 = tl.load(src_tile, mask=mask).to(tl.float32)
    x2 = tl.load(src_tile + half_dim, mask=mask).to(tl.float32)

    if HAS_POS:
        row = tl.load(pos_ptr + b * pos_stride_b + s * pos_stride_s).to(tl.int64)
    else:
        row = s
    # A position outside the table must not read out of bounds: such a token's outputs are NaN
    # (documented), which makes the bad input visible instead of silently rotating by a wrong angle.
    row_ok = (row >= 0) & (row < table_rows)
    row = tl.where(row_ok, row, 0)
    # One cos/sin row for the whole block: a (BLOCK_H, BLOCK_D2) tile in the q/k layout would
    # spare a redistribution through shared memory, but its repeated loads cost more.
    cos_row = cos_ptr + b * cos_stride_b + row * cos_stride_row
    sin_row = sin_ptr + b * sin_stride_b + row * sin_stride_row
    # Default cache policy, although each sequence then reads the shared table from DRAM again:
    # keeping the rows in the L2 (evict_last) would slow the kernels after the call, such as the
    # attention, more than it saves here (docs/performance.md).
    cos = tl.load(cos_row + d, mask=d_ok & row_ok, other=float("nan")).to(tl.float32)
    sin = tl.load(sin_row + d, mask=d_ok & row_ok, other=float("nan")).to(tl.float32)
    sin = sin * sin_sign  # int32 times float32 is float32 (and a plain 1 where Triton specializes it)

    out_ty = q_out_ptr.dtype.element_ty
    tl.store(dst_tile, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ty), mask=mask)
    tl.store(dst_tile + half_dim, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ty), mask=mask)
