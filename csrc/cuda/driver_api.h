// The CUDA driver API as this library reaches it: libcuda.so.1 is opened with dlopen on first
// use and never linked, so the library loads and imports on machines without a GPU driver
// (CI, CPU-only hosts), and only a CUDA launch asks for the driver.
#pragma once

// Types and function pointer typedefs only (cudaTypedefs.h includes cuda.h); nothing here
// calls into libcuda directly.
#include <cudaTypedefs.h>

#include <c10/macros/Macros.h>

#include <string>

namespace rope_kernels::cuda {

// The driver entry points the launcher uses, resolved once. Each pointer has the signature
// that the CUDA 12.0 ABI gives the call (the version requested from cuGetProcAddress, see
// driver_api.cpp), which is why the typedefs carry explicit version suffixes. The members have
// lower-case names so that cuda.h's renaming macros (e.g. `#define cuGetProcAddress
// cuGetProcAddress_v2`, or the per-thread-stream ones) can never rewrite them.
struct DriverApi {
  PFN_cuGetErrorName_v6000 get_error_name;
  PFN_cuGetErrorString_v6000 get_error_string;
  PFN_cuInit_v2000 init;
  PFN_cuDeviceGetCount_v2000 device_get_count;
  PFN_cuDeviceGet_v2000 device_get;
  PFN_cuDeviceGetAttribute_v2000 device_get_attribute;
  PFN_cuDevicePrimaryCtxRetain_v7000 device_primary_ctx_retain;
  PFN_cuCtxGetCurrent_v4000 ctx_get_current;
  PFN_cuCtxSetCurrent_v4000 ctx_set_current;
  PFN_cuThreadExchangeStreamCaptureMode_v10010 thread_exchange_stream_capture_mode;
  PFN_cuModuleLoadData_v2000 module_load_data;
  PFN_cuModuleUnload_v2000 module_unload;
  PFN_cuModuleGetFunction_v2000 module_get_function;
  PFN_cuFuncGetAttribute_v2020 func_get_attribute;
  PFN_cuFuncSetAttribute_v9000 func_set_attribute;
  PFN_cuLaunchKernel_v4000 launch_kernel;  // the legacy-stream variant: stream 0 means the legacy default stream
};

// The driver table, loaded on the first call of the process (thread safe, std::call_once) and
// cuInit'ed. Throws `<op>: ...` (e.g. "... no CUDA driver (libcuda.so.1 could not be loaded: ...)")
// on every call when there is no usable driver.
const DriverApi& driver_api(const char* op);

// "CUDA_ERROR_INVALID_VALUE (invalid argument)": the result's name and the driver's description.
std::string describe_result(const DriverApi& api, CUresult result);

// Throws `<op>: <call> failed: <name> (<description>)`, followed by `; <context>` when context is
// not empty (what was being done, e.g. which kernel was being loaded).
[[noreturn]] void throw_driver_error(const DriverApi& api, CUresult result, const char* op, const char* call,
                                     const std::string& context = std::string());

// Every driver call goes through this: a result other than CUDA_SUCCESS becomes an exception.
inline void check_driver(const DriverApi& api, CUresult result, const char* op, const char* call) {
  if (C10_UNLIKELY(result != CUDA_SUCCESS)) {
    throw_driver_error(api, result, op, call);
  }
}

}  // namespace rope_kernels::cuda
