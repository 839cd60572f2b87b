// A model that Python scripted and saved (it calls rope::fused_qk) runs here with libtorch and the
// rope library only: forward and backward, on every device, giving what Python computed.
// This program never includes the rope C++ API: linking RopeKernels::rope_kernels alone must have
// registered the op that the saved graph names, or torch::jit::load fails.
//
// Usage: test_torchscript_module FIXTURE_DIR (written by make_torchscript_fixture.py)
#include <torch/script.h>

#include <string>

#include "test_support.h"

namespace {

using rope_test::expect;
using rope_test::expect_close;

std::string gradient_key(std::string parameter_name) {
  for (char& c : parameter_name) {
    c = c == '.' ? '_' : c;  // as fixture_files.parameter_key does
  }
  return "grad_" + parameter_name;
}

void run_saved_model(const std::string& fixture_dir, const at::Device& device) {
  const std::string what = "TorchScript model on " + device.str();
  torch::jit::Module model = torch::jit::load(fixture_dir + "/rope_attention.pt", device);
  const torch::jit::Module expected = torch::jit::load(fixture_dir + "/rope_attention_expected.pt");
  const auto saved = [&](const std::string& name) { return expected.attr(name).toTensor(); };

  const at::Tensor x = saved("x").to(device).requires_grad_();
  const at::Tensor output = model.forward({x, saved("positions").to(device)}).toTensor();
  (output * saved("weight").to(device)).sum().backward();

  // The CPU runs the kernels Python ran; CUDA rounds its float32 arithmetic differently.
  const double rtol = device.is_cpu() ? 1e-6 : 1e-4;
  const double atol = device.is_cpu() ? 1e-7 : 1e-5;
  expect_close(output, saved("output"), rtol, atol, what + ", output");
  expect(x.grad().defined(), what + ": no gradient reached the input");
  expect_close(x.grad(), saved("grad_x"), rtol, atol, what + ", grad x");
  int checked = 0;
  for (const auto& parameter : model.named_parameters()) {
    expect(parameter.value.grad().defined(), what + ": no gradient for " + parameter.name);
    expect_close(parameter.value.grad(), saved(gradient_key(parameter.name)), rtol, atol,
                 what + ", grad " + parameter.name);
    ++checked;
  }
  expect(checked > 0, what + ": the loaded model has no parameters");
}

}  // namespace

int main(int argc, char** argv) {
  return rope_test::run_fixture_test(argc, argv, "torchscript_module", &run_saved_model);
}
