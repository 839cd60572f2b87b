#include "cuda/rope_launch.h"

#include "cuda/driver_api.h"
#include "cuda/launch_plan.h"
#include "cuda/module_cache.h"

#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

namespace rope_kernels::cuda {
namespace {

// Triton 3.6..3.9 append two scratch pointers (global, profile); room for a couple more.
constexpr int kMaxTrailingNullParams = 4;

// The device's current stream, as c10::cuda::getCurrentCUDAStream(device).stream() gives it,
// reached through torch's registered CUDA guard implementation so that this library's code calls
// no c10_cuda or cudart function. The native handle is a cudaStream_t, the same type as CUstream
// (struct CUstream_st*), and goes to the driver as is, including 0 for the legacy default stream.
CUstream current_stream(const c10::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<CUstream>(stream.native_handle());
}

}  // namespace

void launch_rope(const char* op, const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out,
                 int sin_sign) {
  if (in.q.size(0) == 0 || in.q.size(2) == 0 || (in.q.size(1) == 0 && in.k.size(1) == 0)) {
    return;  // nothing to rotate; an empty grid is not a valid launch
  }
  const int device = in.q.device().index();
  LaunchPlan plan = plan_launch(op, in, q_out, k_out, sin_sign, device_capability(op, device));
  const KernelImage& image = *plan.image;
  TORCH_CHECK(image.num_trailing_null_params >= 0 && image.num_trailing_null_params <= kMaxTrailingNullParams, op,
              ": the sm_", plan.arch, " kernel ", image.function_name, " expects ", image.num_trailing_null_params,
              " trailing scratch pointers; this launcher passes at most ", kMaxTrailingNullParams);

  make_primary_context_current(op, device);
  const LoadedKernel& kernel = loaded_kernel(op, device, plan.variant.index(), plan.arch, image);

  KernelArgs& args = plan.args;
  // Triton's trailing scratch pointers: this kernel needs no scratch memory, so null.
  CUdeviceptr null_scratch[kMaxTrailingNullParams] = {};
  void* params[kNumKernelParams + kMaxTrailingNullParams] = {
      &args.q_ptr,       &args.k_ptr,     &args.q_out_ptr,  &args.k_out_ptr,    // 0-3
      &args.cos_ptr,     &args.sin_ptr,   &args.pos_ptr,    &args.offsets_ptr,  // 4-7
      &args.seq_len,     &args.n_heads_q, &args.n_heads_k,  &args.rotary_half,  // 8-11
      &args.copy_end,    &args.table_rows, &args.sin_sign,  &args.grid_order,   // 12-15
      &args.pos_kind,    &args.n_docs,    &args.offsets_kind,                   // 16-18
  };
  constexpr int kFirstStrideParam = kNumPointerParams + kNumInt32Params;
  for (int i = 0; i < kNumStrideParams; ++i) {  // 19-36
    params[kFirstStrideParam + i] =
        plan.narrow_strides ? static_cast<void*>(&args.strides32[i]) : static_cast<void*>(&args.strides[i]);
  }
  for (int i = 0; i < image.num_trailing_null_params; ++i) {
    params[kNumKernelParams + i] = &null_scratch[i];
  }

  const DriverApi& api = driver_api(op);
  const CUstream stream = current_stream(in.q.device());
  check_driver(api,
               api.launch_kernel(kernel.function, static_cast<unsigned int>(plan.grid.x),
                                 static_cast<unsigned int>(plan.grid.y), static_cast<unsigned int>(plan.grid.z),
                                 kernel.block_threads, 1, 1, kernel.shared_bytes, stream, params, nullptr),
               op, "cuLaunchKernel");
}

}  // namespace rope_kernels::cuda
