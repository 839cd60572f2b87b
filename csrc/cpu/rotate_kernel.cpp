#include "cpu/rotate_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace rope_kernels::cpu {
namespace {

// Math in float32 as on the GPU; float64 stays float64 (gradcheck).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Where each token's table row comes from: its positions entry, its place in its packed
// document (plus the document's offset), or its index.
struct RowSource {
  const void* positions = nullptr;
  bool positions_int64 = false;
  int64_t positions_stride_b = 0;
  int64_t positions_stride_s = 0;
  const int64_t* starts = nullptr;  // cu_seqlens, n_docs + 1 entries
  int64_t n_docs = 0;
  const void* offsets = nullptr;
  bool offsets_int64 = false;

  static int64_t read(const void* data, bool is_int64, int64_t i) {
    return is_int64 ? static_cast<const int64_t*>(data)[i] : static_cast<const int32_t*>(data)[i];
  }

  int64_t row(int64_t b, int64_t s) const {
    if (positions != nullptr) {
      return read(positions, positions_int64, b * positions_stride_b + s * positions_stride_s);
    }
    if (starts != nullptr) {
      // The last document starting at or before s (an empty document starts where the next does).
      const int64_t doc = std::upper_bound(starts, starts + n_docs + 1, s) - starts - 1;
      const int64_t position = s - starts[doc];
      return offsets == nullptr ? position : position + read(offsets, offsets_int64, doc);
    }
    return s;
  }
};

RowSource row_source(const RopeInputs& in, const std::optional<at::Tensor>& document_starts) {
  RowSource source;
  if (in.positions.has_value()) {
    source.positions = in.positions->data_ptr();
    source.positions_int64 = in.positions->scalar_type() == at::kLong;
    source.positions_stride_b = in.positions->stride(0);
    source.positions_stride_s = in.positions->stride(1);
  } else if (document_starts.has_value()) {
    source.starts = document_starts->data_ptr<int64_t>();
    source.n_docs = document_starts->numel() - 1;
    if (in.seqlen_offsets.has_value()) {
      source.offsets = in.seqlen_offsets->data_ptr();
      source.offsets_int64 = in.seqlen_offsets->scalar_type() == at::kLong;
    }
  }
  return source;
}

// The hot loops are compiled twice, for any x86-64 and for AVX2, and the loader picks the one the
// processor runs (GCC's target_clones).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROPE_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ROPE_CPU_CLONES
#endif

// A contiguous run of elements to the compute type and back: plain loops, which the compiler
// vectorizes; bfloat16 and float16 get their own below.
template <typename acc_t, typename scalar_t>
void widen(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<acc_t>(src[i]);
  }
}

template <typename scalar_t, typename acc_t>
void narrow(const acc_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// bfloat16: the upper half of a float32. Written as bit arithmetic (round to nearest even, NaN
// kept a quiet NaN), which vectorizes where c10::BFloat16's conversion does not.
template <>
ROPE_CPU_CLONES void widen<float, c10::BFloat16>(const c10::BFloat16* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = c10::bit_cast<float>(static_cast<uint32_t>(src[i].x) << 16);
  }
}

template <>
ROPE_CPU_CLONES void narrow<c10::BFloat16, float>(const float* __restrict__ src, c10::BFloat16* __restrict__ dst, int64_t n) {
  auto* bits_out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = c10::bit_cast<uint32_t>(src[i]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    bits_out[i] = src[i] != src[i] ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
}

// float16: the F16C instructions where the processor has them (a runtime check: the library is
// built for any x86-64).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx,f16c"))) void widen_f16c(const c10::Half* __restrict__ src, float* __restrict__ dst,
                                                    int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

__attribute__((target("avx,f16c"))) void narrow_f16c(const float* __restrict__ src, c10::Half* __restrict__ dst,
                                                     int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // round to nearest even, as c10::Half's conversion does
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<c10::Half>(src[i]);
  }
}

const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");

template <>
void widen<float, c10::Half>(const c10::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  if (kHasF16C) {
    widen_f16c(src, dst, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

template <>
void narrow<c10::Half, float>(const float* __restrict__ src, c10::Half* __restrict__ dst, int64_t n) {
  if (kHasF16C) {
    narrow_f16c(src, dst, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<c10::Half>(src[i]);
  }
}
#endif

// One head's rotated part, x (2 * half values in the compute type, as read), rotated into out in
// the written convention: pairs (x[i], x[i + half]) or (x[2i], x[2i + 1]).
template <typename acc_t>
ROPE_CPU_CLONES void rotate_pairs(const acc_t* __restrict__ x, acc_t* __restrict__ out, const acc_t* __restrict__ c,
                  const acc_t* __restrict__ s, acc_t* __restrict__ split, int64_t half, bool read_interleaved,
                  bool write_interleaved) {
  const acc_t* x1 = x;
  const acc_t* x2 = x + half;
  if (read_interleaved) {  // split the pairs into `split`: first halves, then second halves
    for (int64_t i = 0; i < half; ++i) {
      split[i] = x[2 * i];
      split[half + i] = x[2 * i + 1];
    }
    x1 = split;
    x2 = split + half;
  }
  if (write_interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      out[2 * i] = x1[i] * c[i] - x2[i] * s[i];
      out[2 * i + 1] = x2[i] * c[i] + x1[i] * s[i];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      out[i] = x1[i] * c[i] - x2[i] * s[i];
      out[half + i] = x2[i] * c[i] + x1[i] * s[i];
    }
  }
}

// A table row in the compute type, sin negated for the inverse rotation.
template <typename table_t, typename acc_t>
inline void load_angles(const table_t* __restrict__ cos, const table_t* __restrict__ sin, acc_t* __restrict__ c,
                        acc_t* __restrict__ s, int64_t half, acc_t sign) {
  for (int64_t i = 0; i < half; ++i) {
    c[i] = static_cast<acc_t>(cos[i]);
    s[i] = sign * static_cast<acc_t>(sin[i]);
  }
}

// One of q and k: where its heads are read and written, in elements.
template <typename scalar_t>
struct Heads {
  const scalar_t* src;
  scalar_t* dst;
  int64_t count;
  int64_t src_b, src_h, src_s;
  int64_t dst_b, dst_h, dst_s;
  bool copy_rest;  // out of place: the features past rotary_dim are copied

  Heads(const at::Tensor& x, const at::Tensor& out)
      : src(x.const_data_ptr<scalar_t>()),
        dst(out.data_ptr<scalar_t>()),
        count(x.size(1)),
        src_b(x.stride(0)), src_h(x.stride(1)), src_s(x.stride(2)),
        dst_b(out.stride(0)), dst_h(out.stride(1)), dst_s(out.stride(2)),
        copy_rest(x.data_ptr() != out.data_ptr()) {}
};

template <typename scalar_t, typename table_t>
void rotate_typed(const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out, bool inverse,
                  const RowSource& rows) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = in.q.size(0);
  const int64_t seq = in.q.size(2);
  const int64_t head_dim = in.q.size(3);
  const int64_t half = in.rotary_half.expect_int();
  const bool read_interleaved = in.read_interleaved;
  const bool write_interleaved = in.write_interleaved;
  const table_t* cos = in.cos.const_data_ptr<table_t>();
  const table_t* sin = in.sin.const_data_ptr<table_t>();
  const int64_t table_rows = in.cos.size(1);
  // One table for every sequence, or one per sequence.
  const int64_t cos_b = in.cos.size(0) == 1 ? 0 : in.cos.stride(0);
  const int64_t sin_b = in.sin.size(0) == 1 ? 0 : in.sin.stride(0);
  const int64_t cos_row = in.cos.stride(1);
  const int64_t sin_row = in.sin.stride(1);
  const Heads<scalar_t> both[2] = {Heads<scalar_t>(in.q, q_out), Heads<scalar_t>(in.k, k_out)};
  const acc_t sign = inverse ? acc_t(-1) : acc_t(1);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  // Each task rotates blocks of kTokenBlock consecutive tokens of one sequence: the block's
  // angles first, then token by token every head vector, so that a token's angles stay in L1
  // while its heads are rotated. In (B, H, S, D) tensors too: walking each head's tokens in
  // memory order instead reads another token's angles for every vector, and ran about twice as
  // slow (docs/performance.md).
  constexpr int64_t kTokenBlock = 16;
  const int64_t blocks_per_sequence = (seq + kTokenBlock - 1) / kTokenBlock;
  const int64_t per_block = kTokenBlock * (both[0].count + both[1].count) * head_dim;
  // Tasks of at least this many elements, so that threads are not woken for a few heads.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(per_block, 1));
  at::parallel_for(0, batch * blocks_per_sequence, grain, [&](int64_t begin, int64_t end) {
    // Per task: a block's angles, and one head's rotated part as read, split and rotated.
    std::vector<acc_t> angles(2 * kTokenBlock * half);
    std::vector<acc_t> work(6 * half);
    acc_t* x = work.data();
    acc_t* split = x + 2 * half;
    acc_t* out = split + 2 * half;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t b = block / blocks_per_sequence;
      const int64_t first = (block - b * blocks_per_sequence) * kTokenBlock;
      const int64_t tokens = std::min(kTokenBlock, seq - first);
      for (int64_t t = 0; t < tokens; ++t) {
        acc_t* c = angles.data() + 2 * t * half;
        const int64_t row = rows.row(b, first + t);
        // A position outside the table gives NaN (documented), as on CUDA.
        if (row >= 0 && row < table_rows) {
          load_angles(cos + b * cos_b + row * cos_row, sin + b * sin_b + row * sin_row, c, c + half, half, sign);
        } else {
          std::fill(c, c + 2 * half, nan);
        }
      }
      for (const Heads<scalar_t>& heads : both) {
        const auto rotate_one = [&](int64_t h, int64_t t) {
          const int64_t s = first + t;
          const scalar_t* src = heads.src + b * heads.src_b + h * heads.src_h + s * heads.src_s;
          scalar_t* dst = heads.dst + b * heads.dst_b + h * heads.dst_h + s * heads.dst_s;
          const acc_t* c = angles.data() + 2 * t * half;
          // The whole rotated part is read before any of it is written (in place).
          widen(src, x, 2 * half);
          rotate_pairs(x, out, c, c + half, split, half, read_interleaved, write_interleaved);
          narrow(out, dst, 2 * half);
          if (heads.copy_rest) {
            std::copy(src + 2 * half, src + head_dim, dst + 2 * half);
          }
        };
        for (int64_t t = 0; t < tokens; ++t) {
          for (int64_t h = 0; h < heads.count; ++h) {
            rotate_one(h, t);
          }
        }
      }
    }
  });
}

}  // namespace

void rotate(const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out, bool inverse,
            const std::optional<at::Tensor>& document_starts) {
  if (in.q.numel() == 0 && in.k.numel() == 0) {
    return;
  }
  const RowSource rows = row_source(in, document_starts);
  const bool same_table = in.cos.scalar_type() == in.q.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "rope_cpu", [&] {
    if (same_table) {
      rotate_typed<scalar_t, scalar_t>(in, q_out, k_out, inverse, rows);
    } else {
      rotate_typed<scalar_t, float>(in, q_out, k_out, inverse, rows);
    }
  });
}

}  // namespace rope_kernels::cpu
