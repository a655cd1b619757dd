// CPU kernel of ama::shell_sample. The Gaussian coordinates and the radial uniforms come from ATen's
// own (vectorised) normal_ and uniform_ fills on the CPU generator -- the default one, seeded by
// torch.manual_seed, unless one is passed -- so a seed fixes the samples. The kernel then does the
// rest in one parallel pass per row: the norm (in float64), the shell radius, the scaling.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../ops_common.h"

namespace ama {
namespace {

at::Tensor shell_sample_cpu(
    int64_t n,
    int64_t d,
    double r_inner,
    double r_outer,
    bool volume,
    std::optional<at::Generator> generator,
    std::optional<at::Device> device) {
  check_shell_sample_args(n, d, r_inner, r_outer);
  TORCH_CHECK_VALUE(!device.has_value() || device->is_cpu(), "shell_sample: CPU kernel called for ", *device);
  const auto opts = at::TensorOptions().device(at::kCPU);
  at::Tensor out = at::empty({n, d}, opts.dtype(at::kFloat));
  out.normal_(0.0, 1.0, generator);
  at::Tensor u = at::empty({n}, opts.dtype(at::kDouble));
  u.uniform_(0.0, 1.0, generator);
  float* data = out.data_ptr<float>();
  const double* uniform = u.const_data_ptr<double>();
  const ShellRadius radius(d, r_inner, r_outer, volume);
  const int64_t grain = std::max<int64_t>(1, 32768 / d);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = data + i * d;
      double sq = 0.0;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) {
        sq += static_cast<double>(row[j]) * row[j];
      }
      // 1 - u is in (0, 1]: its log stays finite.
      const float scale = static_cast<float>(radius(1.0 - uniform[i]) / std::max(std::sqrt(sq), 1e-12));
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        row[j] *= scale;
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace ama

TORCH_LIBRARY_IMPL(ama, CPU, m) {
  m.impl("shell_sample", &ama::shell_sample_cpu);
}
