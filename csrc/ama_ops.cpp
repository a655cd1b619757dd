// Schemas of the `ama` ops (the one place they are declared), the device selection of the
// tensor-less sampler, and the empty Python module `ama_stream._C` whose import loads this
// library so that the static registrations below run. Kernels: csrc/cpu/*.cpp, csrc/cuda/*.cu.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops_common.h"

extern "C" {
// Built with the limited C API (no pybind11): the module has no members, the ops live in torch.ops.ama.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ama {
namespace {

// The sampler has no tensor input, so the dispatcher cannot pick a backend from its arguments:
// the device is the `device` argument, else the generator's device, else the CPU.
at::Device resolve_sample_device(const std::optional<at::Generator>& generator, std::optional<at::Device> device) {
  if (!(generator.has_value() && generator->defined())) {
    return device.value_or(at::Device(at::kCPU));
  }
  const at::Device gen_device = generator->device();
  if (device.has_value()) {
    const bool same = device->type() == gen_device.type() &&
        (!device->has_index() || !gen_device.has_index() || device->index() == gen_device.index());
    TORCH_CHECK_VALUE(
        same, "shell_sample: generator is on ", gen_device, " but device is ", *device,
        " (generator and output must be on the same device)");
    if (device->has_index()) {
      return *device;
    }
  }
  return gen_device;
}

using ShellSampleFn =
    at::Tensor(int64_t, int64_t, double, double, bool, std::optional<at::Generator>, std::optional<at::Device>);

at::Tensor shell_sample_backend_select(
    c10::DispatchKeySet /*keys*/,
    int64_t n,
    int64_t d,
    double r_inner,
    double r_outer,
    bool volume,
    std::optional<at::Generator> generator,
    std::optional<at::Device> device) {
  const at::Device target = resolve_sample_device(generator, device);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ama::shell_sample", "").typed<ShellSampleFn>();
  const auto key = c10::computeDispatchKey(std::nullopt, std::nullopt, target);
  return op.redispatch(c10::DispatchKeySet(key), n, d, r_inner, r_outer, volume, std::move(generator), target);
}

}  // namespace
}  // namespace ama

TORCH_LIBRARY(ama, m) {
  // R-score tail of the mirrored critic: h [2B, C, H, W] -> R [B] float32. Only R: z, log A, p-values
  // and decisions belong to the calibration (ama_stream/calibration.py), which owns mu and sigma.
  m.def("pair_rscore(Tensor h) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Same, plus the pooled features f = sum_hw ReLU(h) [2B, C] float32 for callers that need D's logits.
  m.def("pair_rscore_features(Tensor h) -> (Tensor r, Tensor features)", {at::Tag::pt2_compliant_tag});
  // Same R, plus the anomaly map [B, H, W] float32: per position, sum_c |ReLU(h_xx) - ReLU(h_xxhat)|
  // (the pair's feature difference before the sum-pool), from the same single pass over h.
  m.def("pair_rscore_map(Tensor h) -> (Tensor r, Tensor map)", {at::Tag::pt2_compliant_tag});
  // n points of the shell r_inner <= |z| <= r_outer in R^d, float32 [n, d]: a uniform direction and a
  // radius uniform in [r_inner, r_outer], or (volume=True) uniform over the shell's volume.
  m.def(
      "shell_sample(int n, int d, float r_inner, float r_outer, *, bool volume=False, Generator? generator=None, "
      "Device? device=None) -> Tensor",
      {at::Tag::nondeterministic_seeded, at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ama, BackendSelect, m) {
  m.impl("shell_sample", TORCH_FN(ama::shell_sample_backend_select));
}
