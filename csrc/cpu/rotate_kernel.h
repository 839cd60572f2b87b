// The CPU kernel of every rotating op: one pass over q and k, parallel over tokens.
#pragma once

#include "rope_inputs.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace rope_kernels::cpu {

// Rotates in.q and in.k into q_out and k_out, (B, H, S, D) views with a contiguous last
// dimension; for the in-place op they are in.q and in.k themselves (each head is read whole
// before it is written, so reading and writing different pair conventions in place is safe).
// Features past rotary_dim are copied where the output is not the input. `inverse` rotates by
// the negated angle (the backward ops). `document_starts`: packed sequences' cu_seqlens as
// contiguous int64, already checked to start at 0, not decrease and end at the token count.
void rotate(const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out, bool inverse,
            const std::optional<at::Tensor>& document_starts);

}  // namespace rope_kernels::cpu
