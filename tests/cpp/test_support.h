// What every C++ test program shares: devices to run on, comparisons with a readable failure,
// the check that no Python is in the process, and a main() that turns exceptions into exit 1.
#pragma once

#include <ATen/ATen.h>
#include <torch/cuda.h>

#include <cstdlib>
#include <exception>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace rope_test {

inline void expect(bool condition, const std::string& what) {
  if (!condition) {
    throw std::runtime_error("check failed: " + what);
  }
}

// The CPU, and the first GPU when the process sees one: every test runs on each.
inline std::vector<at::Device> devices() {
  std::vector<at::Device> result = {at::Device(at::kCPU)};
  if (torch::cuda::is_available()) {
    result.emplace_back(at::kCUDA, 0);
  }
  return result;
}

// got equals want within rtol/atol, elementwise, with NaN accepted where want is NaN;
// on failure says where and by how much.
inline void expect_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol,
                         const std::string& what) {
  expect(got.sizes() == want.sizes(), what + ": shape " + c10::str(got.sizes()) + ", expected " +
                                          c10::str(want.sizes()));
  const at::Tensor g = got.detach().to(at::kCPU, at::kDouble);
  const at::Tensor w = want.detach().to(at::kCPU, at::kDouble);
  const at::Tensor both_nan = g.isnan() & w.isnan();
  const at::Tensor excess = ((g - w).abs() - (atol + rtol * w.abs())).masked_fill(both_nan, 0.0);
  const at::Tensor bad = excess.gt(0) | (g.isnan() & ~w.isnan());
  if (bad.any().item<bool>()) {
    const int64_t count = bad.sum().item<int64_t>();
    const int64_t first = bad.flatten().nonzero()[0][0].item<int64_t>();
    std::ostringstream message;
    message << what << ": " << count << " of " << g.numel() << " elements differ (rtol " << rtol
            << ", atol " << atol << "); first at flat index " << first << ": got "
            << g.flatten()[first].item<double>() << ", expected " << w.flatten()[first].item<double>();
    throw std::runtime_error(message.str());
  }
}

// The point of these tests is a process with libtorch and the rope library only: fail if a
// Python interpreter got in (through the library's dependencies, for instance).
inline void expect_no_python() {
  std::ifstream maps("/proc/self/maps");
  if (!maps) {
    return;  // not Linux: the library's dependencies are checked at build time instead
  }
  std::string line;
  while (std::getline(maps, line)) {
    expect(line.find("libpython") == std::string::npos, "libpython is mapped into the process: " + line);
  }
}

// A fresh seed on every run, printed so that a failure can be replayed (ROPE_TEST_SEED=...).
inline uint64_t seed_from_environment() {
  const char* fixed = std::getenv("ROPE_TEST_SEED");
  const uint64_t seed = fixed ? std::strtoull(fixed, nullptr, 10) : std::random_device{}();
  std::cout << "seed " << seed << " (ROPE_TEST_SEED=" << seed << " repeats this run)" << std::endl;
  at::manual_seed(seed);
  return seed;
}

inline int run_test(const char* name, const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& error) {
    std::cerr << name << ": FAILED\n" << error.what() << std::endl;
    return 1;
  }
  std::cout << name << ": passed" << std::endl;
  return 0;
}

// main() of a program that checks fixtures Python saved: `program FIXTURE_DIR`, the check run on
// every device, then the check that no Python came into the process.
inline int run_fixture_test(int argc, char** argv, const char* name,
                            const std::function<void(const std::string&, const at::Device&)>& check) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " FIXTURE_DIR" << std::endl;
    return 2;
  }
  const std::string fixture_dir = argv[1];
  return run_test(name, [&] {
    for (const at::Device& device : devices()) {
      check(fixture_dir, device);
      std::cout << "checked on " << device << std::endl;
    }
    expect_no_python();
  });
}

}  // namespace rope_test
