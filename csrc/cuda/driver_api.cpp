#include "cuda/driver_api.h"

#include <c10/util/Exception.h>

#include <dlfcn.h>

#include <mutex>
#include <string>

namespace rope_kernels::cuda {
namespace {

// Every entry point is requested with the ABI of CUDA 12.0, the oldest driver generation that
// exports cuGetProcAddress_v2 (and older than any driver a CUDA 12/13 build of torch runs on).
// Asking for a fixed version, instead of the CUDA_VERSION of the headers at hand, keeps each
// returned function matched to the typedef it is cast to: a newer request can silently return a
// newer signature (CUDA 13.0 gave cuCtxGetDevice a second parameter under the same base name).
constexpr int kRequestedAbiVersion = 12000;

// What the one attempt to load the driver produced; `failure` is empty when `api` is complete.
struct DriverLoad {
  DriverApi api{};
  std::string failure;
};

const char* describe_query_status(CUdriverProcAddressQueryResult status) {
  switch (status) {
    case CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND:
      return "not found";
    case CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT:
      return "not available for the CUDA 12.0 ABI";
    default:
      return "not returned";
  }
}

// Looks up `name` (a base name without _v2-style suffixes: the requested version picks the
// suffix). The legacy-stream flag matters for cuLaunchKernel: the per-thread variant would read
// stream handle 0 as the per-thread default stream, while torch's default stream is the legacy one.
template <typename Fn>
bool resolve(PFN_cuGetProcAddress_v12000 get_proc_address, const DriverApi& api, const char* name, Fn* out,
             std::string* failure) {
  void* address = nullptr;
  CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  const CUresult result =
      get_proc_address(name, &address, kRequestedAbiVersion, CU_GET_PROC_ADDRESS_LEGACY_STREAM, &status);
  if (result != CUDA_SUCCESS) {
    *failure = std::string("cuGetProcAddress(") + name + ") failed: " + describe_result(api, result);
    return false;
  }
  if (status != CU_GET_PROC_ADDRESS_SUCCESS || address == nullptr) {
    *failure = std::string("the CUDA driver does not provide ") + name + " (" + describe_query_status(status) + ")";
    return false;
  }
  *out = reinterpret_cast<Fn>(address);
  return true;
}

DriverLoad load_driver() {
  DriverLoad load;
  // The handle is never closed: the resolved pointers are used until the process exits.
  void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* reason = dlerror();
    load.failure = std::string("no CUDA driver (libcuda.so.1 could not be loaded: ") +
                   (reason != nullptr ? reason : "unknown reason") + ")";
    return load;
  }
  // The only symbol taken by name; everything else comes through it at a chosen ABI version.
  auto get_proc_address =
      reinterpret_cast<PFN_cuGetProcAddress_v12000>(dlsym(library, "cuGetProcAddress_v2"));
  if (get_proc_address == nullptr) {
    load.failure = "the CUDA driver is too old (libcuda.so.1 has no cuGetProcAddress_v2; a CUDA 12.0 or newer "
                   "driver is required)";
    return load;
  }
  DriverApi& api = load.api;
  std::string& failure = load.failure;
  // Error names first, so that the failures below can already be described.
  const bool resolved = resolve(get_proc_address, api, "cuGetErrorName", &api.get_error_name, &failure) &&
                        resolve(get_proc_address, api, "cuGetErrorString", &api.get_error_string, &failure) &&
                        resolve(get_proc_address, api, "cuInit", &api.init, &failure) &&
                        resolve(get_proc_address, api, "cuDeviceGetCount", &api.device_get_count, &failure) &&
                        resolve(get_proc_address, api, "cuDeviceGet", &api.device_get, &failure) &&
                        resolve(get_proc_address, api, "cuDeviceGetAttribute", &api.device_get_attribute, &failure) &&
                        resolve(get_proc_address, api, "cuDevicePrimaryCtxRetain", &api.device_primary_ctx_retain,
                                &failure) &&
                        resolve(get_proc_address, api, "cuCtxGetCurrent", &api.ctx_get_current, &failure) &&
                        resolve(get_proc_address, api, "cuCtxSetCurrent", &api.ctx_set_current, &failure) &&
                        resolve(get_proc_address, api, "cuThreadExchangeStreamCaptureMode",
                                &api.thread_exchange_stream_capture_mode, &failure) &&
                        resolve(get_proc_address, api, "cuModuleLoadData", &api.module_load_data, &failure) &&
                        resolve(get_proc_address, api, "cuModuleUnload", &api.module_unload, &failure) &&
                        resolve(get_proc_address, api, "cuModuleGetFunction", &api.module_get_function, &failure) &&
                        resolve(get_proc_address, api, "cuFuncGetAttribute", &api.func_get_attribute, &failure) &&
                        resolve(get_proc_address, api, "cuFuncSetAttribute", &api.func_set_attribute, &failure) &&
                        resolve(get_proc_address, api, "cuLaunchKernel", &api.launch_kernel, &failure);
  if (!resolved) {
    return load;
  }
  // Torch has normally initialized the driver already; cuInit is then a cheap no-op, but this
  // library must not rely on it (a libtorch program may reach us before any runtime call).
  const CUresult init_result = api.init(0);
  if (init_result != CUDA_SUCCESS) {
    failure = "cuInit failed: " + describe_result(api, init_result);
  }
  return load;
}

const DriverLoad& driver_load() {
  // One attempt per process: the outcome, success or the reason of failure, is kept, so a
  // missing driver costs one dlopen and every later call reports the same reason.
  static std::once_flag once;
  static DriverLoad load;
  std::call_once(once, [] { load = load_driver(); });
  return load;
}

}  // namespace

const DriverApi& driver_api(const char* op) {
  const DriverLoad& load = driver_load();
  TORCH_CHECK(load.failure.empty(), op, ": cannot run on CUDA: ", load.failure);
  return load.api;
}

std::string describe_result(const DriverApi& api, CUresult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  const bool named = api.get_error_name != nullptr && api.get_error_name(result, &name) == CUDA_SUCCESS &&
                     name != nullptr;
  const bool described = api.get_error_string != nullptr &&
                         api.get_error_string(result, &text) == CUDA_SUCCESS && text != nullptr;
  std::string out = named ? std::string(name) : "CUresult " + std::to_string(static_cast<int>(result));
  if (described) {
    out += std::string(" (") + text + ")";
  }
  return out;
}

void throw_driver_error(const DriverApi& api, CUresult result, const char* op, const char* call,
                        const std::string& context) {
  TORCH_CHECK(false, op, ": ", call, " failed: ", describe_result(api, result), context.empty() ? "" : "; ",
              context);
}

}  // namespace rope_kernels::cuda
