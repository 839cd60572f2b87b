// An AOTInductor package of the attention model (exported by Python with a dynamic sequence
// length) runs here with libtorch and the rope library only, at two lengths, on every device,
// giving the eager results Python saved. The compiled model calls rope::fused_qk through the
// dispatcher: linking RopeKernels::rope_kernels is what registers it in this process.
//
// Usage: test_aoti_package FIXTURE_DIR (written by make_aoti_fixture.py)
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <string>
#include <vector>

#include "test_support.h"

namespace {

using rope_test::expect;
using rope_test::expect_close;

void run_package(const std::string& fixture_dir, const at::Device& device) {
  const std::string package = fixture_dir + "/rope_attention_" + (device.is_cpu() ? "cpu" : "cuda") + ".pt2";
  const std::string what = "AOTInductor package on " + device.str();
  torch::inductor::AOTIModelPackageLoader loader(package);
  const torch::jit::Module expected = torch::jit::load(fixture_dir + "/rope_attention_aoti_expected.pt");
  const auto saved = [&](const std::string& name) { return expected.attr(name).toTensor(); };

  for (const std::string key : {"a", "b"}) {  // two sequence lengths through one package
    const std::vector<at::Tensor> outputs =
        loader.run({saved("x_" + key).to(device), saved("positions_" + key).to(device)});
    expect(outputs.size() == 1, what + ": " + std::to_string(outputs.size()) + " outputs, expected 1");
    expect(outputs[0].device() == device, what + ": output on " + outputs[0].device().str());
    // Compiled against eager: the same rope kernel, other rounding in the fused float32 ops.
    expect_close(outputs[0], saved("output_" + key), 1e-4, 1e-5,
                 what + ", sequence length " + std::to_string(saved("x_" + key).size(1)));
  }
}

}  // namespace

int main(int argc, char** argv) {
  return rope_test::run_fixture_test(argc, argv, "aoti_package", &run_package);
}
