#include "cuda/module_cache.h"

#include "cuda/driver_api.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>

namespace rope_kernels::cuda {
namespace {

// Launches may use up to this much dynamic shared memory without opting in per function.
constexpr int kSharedBytesWithoutOptIn = 48 * 1024;

struct DeviceState {
  std::mutex mutex;  // serializes this device's slow paths: retaining the context, loading kernels
  CUdevice device = 0;
  std::atomic<CUcontext> primary_context{nullptr};  // set once, under `mutex`
  std::atomic<int> capability{0};                   // 0: not asked yet
  // One slot per variant, published with release after the kernel is fully loaded, so the
  // launch path reads it with one acquire load and no lock.
  std::array<std::atomic<const LoadedKernel*>, kNumVariants> kernels;

  DeviceState() {
    for (auto& slot : kernels) {
      slot.store(nullptr, std::memory_order_relaxed);
    }
  }
};

struct DeviceTable {
  int count = 0;
  std::unique_ptr<DeviceState[]> states;
};

DeviceTable make_device_table(const DriverApi& api, const char* op) {
  DeviceTable table;
  check_driver(api, api.device_get_count(&table.count), op, "cuDeviceGetCount");
  table.states = std::make_unique<DeviceState[]>(table.count);
  for (int ordinal = 0; ordinal < table.count; ++ordinal) {
    check_driver(api, api.device_get(&table.states[ordinal].device, ordinal), op, "cuDeviceGet");
  }
  return table;
}

DeviceState& device_state(const DriverApi& api, const char* op, int device) {
  // Built by the first caller (a function-local static is initialized once, thread safe; if that
  // throws, the next call tries again). The device count of a process does not change.
  static const DeviceTable table = make_device_table(api, op);
  TORCH_CHECK(device >= 0 && device < table.count, op, ": CUDA device ", device,
              " does not exist (the driver reports ", table.count, " devices)");
  return table.states[device];
}

// The thread's stream capture mode switched to relaxed until restore() (or destruction).
//
// CUDA graphs: in the default (global) capture mode, loading a module while any stream is being
// captured is refused and invalidates the capture, and the first call of this op in a process
// may well come inside torch.cuda.graph(...) (or a torch.compile "reduce-overhead" capture). Two
// ways out were possible: load every variant of the device's arch outside any capture at the
// first use, or relax the capture mode around the one load that is needed. The first cannot
// work when that first use is itself inside a capture, and it would load 100+ modules for one
// call; so the load runs with this thread's mode relaxed (which permits such calls) and the
// previous mode is put back right after. The load itself is not a stream operation: nothing is
// recorded into the graph, and launches later in the capture find the kernel already loaded.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode(const DriverApi& api, const char* op) : api_(api) {
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    check_driver(api_, api_.thread_exchange_stream_capture_mode(&mode), op, "cuThreadExchangeStreamCaptureMode");
    previous_ = mode;
    active_ = true;
  }

  // Puts the previous mode back; the caller checks the result (after reporting a load failure).
  CUresult restore() {
    active_ = false;
    CUstreamCaptureMode mode = previous_;
    return api_.thread_exchange_stream_capture_mode(&mode);
  }

  // Only reached with active_ set when an exception (e.g. std::bad_alloc) left the scope early:
  // the mode is still put back, and the exception in flight is the error worth reporting, as a
  // destructor cannot throw a second one.
  ~RelaxedCaptureMode() {
    if (active_) {
      CUstreamCaptureMode mode = previous_;
      (void)api_.thread_exchange_stream_capture_mode(&mode);
    }
  }

  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  const DriverApi& api_;
  CUstreamCaptureMode previous_ = CU_STREAM_CAPTURE_MODE_GLOBAL;
  bool active_ = false;
};

// Everything after the module load: the function handle, a check that it is really loaded and
// can run the block size, the shared-memory opt-in. Returns what failed ("" on success) instead
// of throwing, so that the caller can unload the module and restore the capture mode first.
std::string prepare_function(const DriverApi& api, CUmodule module, const KernelImage& image, LoadedKernel* out) {
  CUfunction function = nullptr;
  CUresult result = api.module_get_function(&function, module, image.function_name);
  if (result != CUDA_SUCCESS) {
    return std::string("cuModuleGetFunction(") + image.function_name + ") failed: " + describe_result(api, result);
  }
  // This attribute needs the fully loaded function: with lazy loading (the default since CUDA
  // 12.2) that also guarantees the loading happens here, under the relaxed capture mode, and
  // not at the first launch.
  int max_threads = 0;
  result = api.func_get_attribute(&max_threads, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, function);
  if (result != CUDA_SUCCESS) {
    return "cuFuncGetAttribute(MAX_THREADS_PER_BLOCK) failed: " + describe_result(api, result);
  }
  if (static_cast<unsigned int>(max_threads) < out->block_threads) {
    return "the kernel runs at most " + std::to_string(max_threads) + " threads per block but its metadata asks for " +
           std::to_string(out->block_threads);
  }
  if (image.shared_bytes > kSharedBytesWithoutOptIn) {
    result = api.func_set_attribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, image.shared_bytes);
    if (result != CUDA_SUCCESS) {
      return "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, " + std::to_string(image.shared_bytes) +
             ") failed: " + describe_result(api, result);
    }
  }
  out->module = module;
  out->function = function;
  return std::string();
}

// Loads the cubin into the current context. Returns what failed ("" on success); after a
// failure nothing stays loaded.
std::string load_into_current_context(const DriverApi& api, const KernelImage& image, LoadedKernel* out) {
  CUmodule module = nullptr;
  const CUresult result = api.module_load_data(&module, image.image);
  if (result != CUDA_SUCCESS) {
    return "cuModuleLoadData failed: " + describe_result(api, result);
  }
  std::string problem = prepare_function(api, module, image, out);
  if (!problem.empty()) {
    const CUresult unloaded = api.module_unload(module);
    if (unloaded != CUDA_SUCCESS) {
      problem += "; unloading the module again failed too: " + describe_result(api, unloaded);
    }
  }
  return problem;
}

CUcontext retained_primary_context(const DriverApi& api, const char* op, DeviceState& state) {
  CUcontext context = state.primary_context.load(std::memory_order_acquire);
  if (context != nullptr) {
    return context;
  }
  std::lock_guard<std::mutex> lock(state.mutex);
  context = state.primary_context.load(std::memory_order_relaxed);
  if (context == nullptr) {
    // Retained once per process and never released: it is the context torch's runtime uses
    // too, alive until exit, and a release during exit could run after the driver shut down.
    // If the first call comes inside a capture, the context exists already (the capturing
    // stream lives in it) and retaining it only counts a reference; the relaxed capture mode
    // is there in case a driver treats the call as capture-unsafe all the same.
    RelaxedCaptureMode relaxed(api, op);
    const CUresult retained = api.device_primary_ctx_retain(&context, state.device);
    const CUresult restored = relaxed.restore();
    check_driver(api, retained, op, "cuDevicePrimaryCtxRetain");
    check_driver(api, restored, op, "cuThreadExchangeStreamCaptureMode");
    state.primary_context.store(context, std::memory_order_release);
  }
  return context;
}

const LoadedKernel& load_kernel(const DriverApi& api, const char* op, int device, DeviceState& state,
                                int variant, int arch, const KernelImage& image) {
  std::lock_guard<std::mutex> lock(state.mutex);
  std::atomic<const LoadedKernel*>& slot = state.kernels[variant];
  if (const LoadedKernel* loaded = slot.load(std::memory_order_acquire)) {
    return *loaded;  // another thread loaded it while this one waited for the lock
  }
  TORCH_CHECK(image.image != nullptr && image.function_name != nullptr, op, ": variant ", variant,
              " was not built for sm_", arch);
  TORCH_CHECK(image.num_warps >= 1 && image.num_warps <= 32 && image.shared_bytes >= 0, op,
              ": the kernel table is inconsistent for sm_", arch, " variant ", variant, " (num_warps ",
              image.num_warps, ", shared bytes ", image.shared_bytes, ")");
  auto kernel = std::make_unique<LoadedKernel>();
  kernel->block_threads = static_cast<unsigned int>(image.num_warps) * 32u;
  kernel->shared_bytes = static_cast<unsigned int>(image.shared_bytes);

  RelaxedCaptureMode relaxed(api, op);
  const std::string problem = load_into_current_context(api, image, kernel.get());
  if (problem.empty()) {
    // Published before the capture mode is restored so that a failure to restore it cannot
    // leak a loaded module: the kernel is good either way.
    slot.store(kernel.release(), std::memory_order_release);
  }
  const CUresult restored = relaxed.restore();
  TORCH_CHECK(problem.empty(), op, ": could not load the sm_", arch, " kernel ", image.function_name, " (variant ",
              variant, ") on CUDA device ", device, ": ", problem,
              restored == CUDA_SUCCESS ? std::string()
                                       : "; restoring the stream capture mode failed too: " +
                                             describe_result(api, restored));
  check_driver(api, restored, op, "cuThreadExchangeStreamCaptureMode");
  return *slot.load(std::memory_order_acquire);
}

}  // namespace

int device_capability(const char* op, int device) {
  const DriverApi& api = driver_api(op);
  DeviceState& state = device_state(api, op, device);
  const int cached = state.capability.load(std::memory_order_relaxed);
  if (cached != 0) {
    return cached;
  }
  int major = 0;
  int minor = 0;
  check_driver(api, api.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, state.device), op,
               "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
  check_driver(api, api.device_get_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, state.device), op,
               "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
  const int capability = 10 * major + minor;
  // Threads racing here all store the same value, so no lock is needed.
  state.capability.store(capability, std::memory_order_relaxed);
  return capability;
}

void make_primary_context_current(const char* op, int device) {
  const DriverApi& api = driver_api(op);
  DeviceState& state = device_state(api, op, device);
  const CUcontext primary = retained_primary_context(api, op, state);
  CUcontext current = nullptr;
  check_driver(api, api.ctx_get_current(&current), op, "cuCtxGetCurrent");
  if (current != primary) {
    // Left current afterwards, as cudaSetDevice would leave it: this is the context of the
    // device the caller's guard selected, and restoring would cost two more calls per launch.
    check_driver(api, api.ctx_set_current(primary), op, "cuCtxSetCurrent");
  }
}

const LoadedKernel& loaded_kernel(const char* op, int device, int variant, int arch, const KernelImage& image) {
  TORCH_CHECK(variant >= 0 && variant < kNumVariants, op, ": kernel variant ", variant, " is out of range");
  const DriverApi& api = driver_api(op);
  DeviceState& state = device_state(api, op, device);
  if (const LoadedKernel* loaded = state.kernels[variant].load(std::memory_order_acquire)) {
    return *loaded;
  }
  // The module must go into the primary context, whatever this thread had current.
  make_primary_context_current(op, device);
  return load_kernel(api, op, device, state, variant, arch, image);
}

}  // namespace rope_kernels::cuda
