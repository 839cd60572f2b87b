// The one place where the rope operator schemas are defined. Each backend (cpu/, cuda/, meta/,
// autograd/) registers its own kernels for these names from its own file.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "build_info.h"

// The keyword options every rope op takes after positions (after a "*, ": keyword only).
#define ROPE_SCHEMA_OPTIONS                                                                         \
  "bool interleaved=False, bool? interleaved_out=None, int? rotary_dim=None, str layout=\"bhsd\", " \
  "Tensor? cu_seqlens=None, Tensor? seqlen_offsets=None"

TORCH_LIBRARY(rope, m) {
  // pt2_compliant: the ops are functional, have Meta kernels and pass opcheck, so torch.compile
  // and torch.export may trace through them without graph breaks.
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // Later options must be keyword arguments with defaults, so that the four-argument call stays
  // valid forever. Every op takes the same options, in this order (rope_kernels::Options and
  // ROPE_OPTION_PARAMS in op_handles.h follow it; docs/conventions.md has their contract).
  m.def("fused_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions=None, *, " ROPE_SCHEMA_OPTIONS
        ") -> (Tensor, Tensor)",
        tags);
  // The gradient of fused_qk: the same rotation by the negated angle. A registered op of its own,
  // whose autograd calls fused_qk, so that double backward works.
  // Its options are those of the fused_qk call whose gradient it computes.
  m.def("fused_qk_backward(Tensor grad_q_out, Tensor grad_k_out, Tensor cos, Tensor sin,"
        " Tensor? positions=None, *, " ROPE_SCHEMA_OPTIONS ") -> (Tensor, Tensor)",
        tags);
  // fused_qk rotating q and k where they lie, for callers that own them (Unsloth's
  // inplace_rope_embedding): no new tensors, the same math. The mutation is declared (a!)/(b!), so
  // autograd, functionalization (torch.compile) and TorchScript all see it; it is never hidden.
  m.def("fused_qk_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions=None, *, "
        ROPE_SCHEMA_OPTIONS ") -> (Tensor(a!), Tensor(b!))",
        tags);
  // One tensor (q alone, k alone, a KV cache, Gemma 4's single call): the pair ops with no second
  // tensor, the same options and math, so every backend, autograd, compile and export serve it
  // through them (csrc/single/rope_single.cpp). The error messages call the tensor q.
  m.def("fused(Tensor x, Tensor cos, Tensor sin, Tensor? positions=None, *, " ROPE_SCHEMA_OPTIONS ") -> Tensor",
        tags);
  m.def("fused_backward(Tensor grad_out, Tensor cos, Tensor sin, Tensor? positions=None, *, " ROPE_SCHEMA_OPTIONS
        ") -> Tensor",
        tags);
  m.def("fused_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? positions=None, *, " ROPE_SCHEMA_OPTIONS
        ") -> Tensor(a!)",
        tags);
  // The CUDA launcher's plan for these inputs on a device of this capability, as plain values
  // (python/rope_kernels/launch_plan.py names them): for the tests and the tuner, which check and
  // time what the launcher launches without keeping a copy of its rule. Private: may change.
  m.def("_launch_plan(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions=None, *, int capability,"
        " bool inplace=False, int? block_h=None, bool? heads_fastest=None, " ROPE_SCHEMA_OPTIONS ") -> int[]");
  // A JSON description of this build (versions, architectures, kernel variants), for C++ and
  // Python users alike.
  m.def("build_info() -> str", &rope_kernels::build_info_json);
}
