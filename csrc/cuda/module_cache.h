// Per-device state of the CUDA driver: the primary context, the compute capability and the
// kernels loaded so far. Each (device, variant) is loaded once per process and then found
// without taking a lock.
#pragma once

#include "cuda/kernel_table.h"

#include <cudaTypedefs.h>

namespace rope_kernels::cuda {

// A kernel ready to launch in its device's primary context. Never unloaded: a launch on another
// thread may be using it, and unloading at exit could run after the driver has shut down.
struct LoadedKernel {
  CUmodule module;
  CUfunction function;
  unsigned int block_threads;  // num_warps * 32
  unsigned int shared_bytes;   // dynamic shared memory of every launch
};

// The device's compute capability as 10 * major + minor (90 for an H100/H200). `device` is the
// CUDA ordinal, which torch's device index is (both follow CUDA_VISIBLE_DEVICES the same way).
int device_capability(const char* op, int device);

// Makes the device's primary context, the one torch's runtime uses, current on this thread.
// A thread that has not called the CUDA runtime yet may have no current context at all, and a
// device guard whose device index already matches does not make one current, so every launch
// checks (cuCtxGetCurrent reads a thread-local, it is cheap).
void make_primary_context_current(const char* op, int device);

// `image` (variant `variant` of the cubins built for `arch`, the arch chosen for this device)
// loaded into the device's primary context. The first call for a (device, variant) loads it
// (safe inside a CUDA graph capture, see module_cache.cpp); later calls are one atomic load.
const LoadedKernel& loaded_kernel(const char* op, int device, int variant, int arch, const KernelImage& image);

}  // namespace rope_kernels::cuda
