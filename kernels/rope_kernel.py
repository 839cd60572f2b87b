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
Face models pass the angles of each token, (B, S, D). Packed sequences come as one sequence of T
tokens with the documents' boundaries cu_seqlens: token s of document j reads row
s - cu_seqlens[j] (+ seqlen_offsets[j]).

Each head's first 2 * rotary_half features are rotated as rotary_half pairs: (i, i + rotary_half)
(half-split, NeoX) or (2i, 2i + 1) (interleaved, GPT-J), chosen for reading and for writing apart
(DeepSeek-V3 reads interleaved pairs and writes half-split ones). Features from 2 * rotary_half to
copy_end are copied through unchanged (partial rotary; in place, copy_end = 2 * rotary_half).

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


# Values of pos_kind: where each token's table row comes from (the launcher's PosKind enum holds
# the same numbers; the generated kernel table asserts it). Index tensors of 64-bit integers are
# read as such through a cast pointer, 32-bit ones through pos_ptr's own type.
POS_NONE = tl.constexpr(0)  # row s
POS_INT32 = tl.constexpr(1)  # positions[b, s]
POS_INT64 = tl.constexpr(2)
POS_CU_SEQLENS_INT32 = tl.constexpr(3)  # s - cu_seqlens[document of s] (+ seqlen_offsets[...])
POS_CU_SEQLENS_INT64 = tl.constexpr(4)
# Documents whose starts one step of the packed-sequence search compares at once.
CU_CHUNK = tl.constexpr(128)


@triton.jit
def _load_index(ptr, i, is_int64):
    """Element i of an int32 or int64 tensor whose address is ptr (typed int32), as int64."""
    if is_int64:
        value = tl.load(ptr.to(tl.pointer_type(tl.int64)) + i)
    else:
        value = tl.load(ptr + i).to(tl.int64)
    return value


@triton.jit
def _load_index_where(ptr, i, is_int32, is_int64):
    """Element i of an int32 or int64 tensor whose address is ptr (typed int32), as int64, read only
    where is_int32 or is_int64 holds (0 elsewhere): predicated loads, no branch."""
    wide = tl.load(ptr.to(tl.pointer_type(tl.int64)) + i, mask=is_int64, other=0)
    narrow = tl.load(ptr + i, mask=is_int32, other=0).to(tl.int64)
    return tl.where(is_int64, wide, narrow)


@triton.jit
def _packed_row(cu_ptr, offsets_ptr, s, n_docs, pos_kind, offsets_kind):
    """Token s's table row in packed sequences: s minus the start of its document (the last one
    starting at or before s, found by counting the starts <= s, CU_CHUNK at a time), plus that
    document's offset where there are offsets. Without packed sequences the launcher passes
    n_docs = 0, the count takes no step, nothing is read, and the row is s. Whatever cu_seqlens
    holds, the document index stays in [0, max(n_docs - 1, 0)] (cu_seqlens holds n_docs + 1
    entries), so nothing is read out of bounds."""
    count = 0
    for first in range(0, n_docs, CU_CHUNK):
        j = first + tl.arange(0, CU_CHUNK)
        if pos_kind == POS_CU_SEQLENS_INT64:
            starts = tl.load(cu_ptr.to(tl.pointer_type(tl.int64)) + j, mask=j < n_docs, other=2**62)
        else:
            starts = tl.load(cu_ptr + j, mask=j < n_docs, other=2**31 - 1).to(tl.int64)
        count += tl.sum((starts <= s).to(tl.int32), axis=0)
    doc = tl.maximum(tl.minimum(count - 1, n_docs - 1), 0)
    packed = pos_kind >= POS_CU_SEQLENS_INT32
    start = _load_index_where(cu_ptr, doc, pos_kind == POS_CU_SEQLENS_INT32, pos_kind == POS_CU_SEQLENS_INT64)
    offset = _load_index_where(offsets_ptr, doc, packed & (offsets_kind == POS_INT32),
                               packed & (offsets_kind == POS_INT64))
    return s - start + offset


@triton.jit
def _tiles(q_base, k_base, q_rows, k_rows, is_q, features):
    """(BLOCK_H, F) pointers to `features` of each row's head, in q or in k. Chosen per element
    between whole pointer tiles: the condition is constant along a row, so the compiler keeps the
    rows' 16-byte vector accesses (a choice between per-row base pointers, broadcast afterwards,
    compiles to scalar accesses)."""
    return tl.where(is_q, q_base + (q_rows[:, None] + features[None, :]),
                    k_base + (k_rows[:, None] + features[None, :]))


@triton.jit
def rope_qk_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr,
    cos_ptr, sin_ptr, pos_ptr, offsets_ptr,
    seq_len, n_heads_q, n_heads_k, rotary_half, copy_end, table_rows, sin_sign, grid_order,
    pos_kind, n_docs, offsets_kind,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    q_out_stride_b, q_out_stride_h, q_out_stride_s,
    k_out_stride_b, k_out_stride_h, k_out_stride_s,
    cos_stride_row, sin_stride_row,
    cos_stride_b, sin_stride_b,  # 0 for one table shared by every sequence
    pos_stride_b, pos_stride_s,
    BLOCK_D2: tl.constexpr,  # rotary_half rounded up to a power of two
    BLOCK_H: tl.constexpr,  # heads per program
    EVEN_D: tl.constexpr,  # rotary_half == BLOCK_D2: no rotated feature of a row is masked
    READ_INTERLEAVED: tl.constexpr,  # pairs (2i, 2i + 1) in q and k, else (i, i + rotary_half)
    WRITE_INTERLEAVED: tl.constexpr,  # the same for the outputs
    NARROW_GRID: tl.constexpr,  # a variant for narrow (latency-bound) launches, else for wide ones
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
    head_ok = (heads < n_heads_q + n_heads_k)[:, None]
    q_rows = b * q_stride_b + s * q_stride_s + heads.to(tl.int64) * q_stride_h
    k_rows = b * k_stride_b + s * k_stride_s + k_heads.to(tl.int64) * k_stride_h
    q_out_rows = b * q_out_stride_b + s * q_out_stride_s + heads.to(tl.int64) * q_out_stride_h
    k_out_rows = b * k_out_stride_b + s * k_out_stride_s + k_heads.to(tl.int64) * k_out_stride_h

    d = tl.arange(0, BLOCK_D2)  # pair index
    d_ok = d < rotary_half
    f = tl.arange(0, 2 * BLOCK_D2)  # feature index within the rotated part
    if EVEN_D:
        # A mask along heads only: a mask over heads and features both is slower on wide grids
        # (docs/performance.md).
        pair_mask = tl.broadcast_to(head_ok, (BLOCK_H, BLOCK_D2))
        feature_mask = tl.broadcast_to(head_ok, (BLOCK_H, 2 * BLOCK_D2))
    else:
        pair_mask = head_ok & d_ok[None, :]
        feature_mask = head_ok & (f < 2 * rotary_half)[None, :]

    # Packed sequences: the token's document is searched before q/k are loaded (after the loads,
    # the search slows head_dim 512 by a fifth). Narrow grids skip it with one branch where there
    # are no packed sequences; on wide grids that branch costs 15 % (llama8b-train), and the
    # search runs unbranched, taking no step (docs/performance.md).
    if NARROW_GRID:
        if pos_kind >= POS_CU_SEQLENS_INT32:
            packed_row = _packed_row(pos_ptr, offsets_ptr, s, n_docs, pos_kind, offsets_kind)
        else:
            packed_row = s
    else:
        packed_row = _packed_row(pos_ptr, offsets_ptr, s, n_docs, pos_kind, offsets_kind)

    # q/k before the position: their addresses need no other load, so they are in flight while
    # the position and then its cos/sin row (a chain of dependent loads) arrive.
    if READ_INTERLEAVED:
        # Whole rows in 16-byte vectors, then each pair split in registers.
        x = tl.load(_tiles(q_ptr, k_ptr, q_rows, k_rows, is_q, f), mask=feature_mask).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D2, 2)))
    else:
        src = _tiles(q_ptr, k_ptr, q_rows, k_rows, is_q, d)
        x1 = tl.load(src, mask=pair_mask).to(tl.float32)
        x2 = tl.load(src + rotary_half, mask=pair_mask).to(tl.float32)

    if pos_kind == POS_NONE:
        row = s
    elif pos_kind <= POS_INT64:
        row = _load_index(pos_ptr, b * pos_stride_b + s * pos_stride_s, pos_kind == POS_INT64)
    else:
        row = packed_row
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
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    if WRITE_INTERLEAVED:
        out = tl.reshape(tl.join(out1, out2), (BLOCK_H, 2 * BLOCK_D2))
        tl.store(_tiles(q_out_ptr, k_out_ptr, q_out_rows, k_out_rows, is_q, f), out.to(out_ty), mask=feature_mask)
    else:
        dst = _tiles(q_out_ptr, k_out_ptr, q_out_rows, k_out_rows, is_q, d)
        tl.store(dst, out1.to(out_ty), mask=pair_mask)
        tl.store(dst + rotary_half, out2.to(out_ty), mask=pair_mask)

    # Partial rotary: the features after the rotated ones, copied 2 * BLOCK_D2 at a time (no
    # iteration for a whole-head rotation, nor in place).
    for first in range(2 * rotary_half, copy_end, 2 * BLOCK_D2):
        rest = first + f
        rest_mask = head_ok & (rest < copy_end)[None, :]
        kept = tl.load(_tiles(q_ptr, k_ptr, q_rows, k_rows, is_q, rest), mask=rest_mask)
        tl.store(_tiles(q_out_ptr, k_out_ptr, q_out_rows, k_out_rows, is_q, rest), kept, mask=rest_mask)
