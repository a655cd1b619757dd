// CUDA side of the `ama` ops as the dispatcher sees it: argument checks, device guard, outputs,
// the generator's Philox reservation, and the launches of the kernels in this folder's .cu files.
// Compiled by the host compiler only, so nvcc never parses the ATen headers it needs.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <mutex>

#include "../ops_common.h"
#include "launch.h"

namespace ama {
namespace {

std::tuple<at::Tensor, at::Tensor> pair_rscore_impl(const at::Tensor& h_in, bool with_features) {
  check_pair_rscore_args(h_in);
  TORCH_CHECK_VALUE(h_in.is_cuda(), "pair_rscore: CUDA kernel called with h on ", h_in.device());
  const c10::cuda::CUDAGuard guard(h_in.device());
  auto [r, features] = allocate_pair_rscore_outputs(h_in, with_features);
  const int64_t pairs = h_in.size(0) / 2;
  if (pairs == 0) {
    return {r, features};
  }
  TORCH_CHECK(pairs <= std::numeric_limits<int32_t>::max(), "pair_rscore: too many pairs for one launch: ", pairs);
  const bool nhwc = reads_as_nhwc(h_in);
  const at::Tensor h = nhwc ? h_in : h_in.contiguous();
  float* f = with_features ? features.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AMA_DISPATCH_RSCORE_TYPES(h.scalar_type(), "ama::pair_rscore (CUDA)", [&] {
    C10_CUDA_CHECK(cuda::launch_pair_rscore<scalar_t>(
        h.const_data_ptr<scalar_t>(), nhwc, pairs, h.size(1), h.size(2) * h.size(3), r.data_ptr<float>(), f, stream));
  });
  return {r, features};
}

at::Tensor pair_rscore_cuda(const at::Tensor& h) {
  return std::get<0>(pair_rscore_impl(h, /*with_features=*/false));
}

std::tuple<at::Tensor, at::Tensor> pair_rscore_features_cuda(const at::Tensor& h) {
  return pair_rscore_impl(h, /*with_features=*/true);
}

std::tuple<at::Tensor, at::Tensor> pair_rscore_map_cuda(const at::Tensor& h_in) {
  check_pair_rscore_args(h_in);
  TORCH_CHECK_VALUE(h_in.is_cuda(), "pair_rscore_map: CUDA kernel called with h on ", h_in.device());
  const c10::cuda::CUDAGuard guard(h_in.device());
  auto [r, map] = allocate_pair_rscore_map_outputs(h_in);
  const int64_t pairs = h_in.size(0) / 2;
  if (pairs == 0) {
    return {r, map};
  }
  TORCH_CHECK(pairs <= std::numeric_limits<int32_t>::max(), "pair_rscore_map: too many pairs for one launch: ", pairs);
  const bool nhwc = reads_as_nhwc(h_in);
  const at::Tensor h = nhwc ? h_in : h_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AMA_DISPATCH_RSCORE_TYPES(h.scalar_type(), "ama::pair_rscore_map (CUDA)", [&] {
    C10_CUDA_CHECK(cuda::launch_pair_rscore_map<scalar_t>(h.const_data_ptr<scalar_t>(), nhwc, pairs, h.size(1),
                                                          h.size(2) * h.size(3), r.data_ptr<float>(),
                                                          map.data_ptr<float>(), stream));
  });
  return {r, map};
}

at::Tensor shell_sample_cuda(
    int64_t n,
    int64_t d,
    double r_inner,
    double r_outer,
    bool volume,
    std::optional<at::Generator> generator,
    std::optional<at::Device> device) {
  check_shell_sample_args(n, d, r_inner, r_outer);
  const bool has_gen = generator.has_value() && generator->defined();
  at::Device target = device.value_or(has_gen ? generator->device() : at::Device(at::kCUDA));
  TORCH_CHECK_VALUE(target.is_cuda(), "shell_sample: CUDA kernel called for ", target);
  if (!target.has_index()) {
    const bool gen_indexed = has_gen && generator->device().is_cuda() && generator->device().has_index();
    target = at::Device(at::kCUDA, gen_indexed ? generator->device().index() : c10::cuda::current_device());
  }
  const c10::cuda::CUDAGuard guard(target);
  at::Tensor out = at::empty({n, d}, at::TensorOptions().dtype(at::kFloat).device(target));
  if (n == 0) {
    return out;
  }
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(target.index()));
  TORCH_CHECK_VALUE(
      gen->device() == target, "shell_sample: generator is on ", gen->device(), " but device is ", target,
      " (generator and output must be on the same device)");
  at::PhiloxCudaState philox;
  {
    // PyTorch's Note [Acquire lock when using random generators]. The increment counts 32-bit
    // values: 4 per Philox block, n rows of shell_sample_blocks_per_row(d) blocks.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(static_cast<uint64_t>(4 * n * cuda::shell_sample_blocks_per_row(d)));
  }
  C10_CUDA_CHECK(cuda::launch_shell_sample(
      out.data_ptr<float>(), n, d, ShellRadius(d, r_inner, r_outer, volume), philox, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace ama

TORCH_LIBRARY_IMPL(ama, CUDA, m) {
  m.impl("pair_rscore", &ama::pair_rscore_cuda);
  m.impl("pair_rscore_features", &ama::pair_rscore_features_cuda);
  m.impl("pair_rscore_map", &ama::pair_rscore_map_cuda);
  m.impl("shell_sample", &ama::shell_sample_cuda);
}
