// The CUDA kernels' launchers: raw pointers in, a cudaError_t out. The kernel files (*.cu) include
// only this and other light headers, because nvcc parses every header once per GPU architecture;
// tensors, checks, generators and the dispatcher registration live in ops_cuda.cpp.
#pragma once

#include <ATen/cuda/PhiloxCudaState.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../ops_math.h"

namespace ama::cuda {

// h [2B, C, H, W] (NCHW contiguous, or NHWC when nhwc) -> r [B]; features [2B, C] unless null.
// Instantiated for float, c10::Half and c10::BFloat16. pairs must be >= 1 and fit an int32 grid.
template <typename scalar_t>
cudaError_t launch_pair_rscore(
    const scalar_t* h, bool nhwc, int64_t pairs, int64_t channels, int64_t hw, float* r, float* features,
    cudaStream_t stream);

// h as above -> r [B] and map [B, H*W] (sum over channels of |ReLU(x) - ReLU(y)| per position).
template <typename scalar_t>
cudaError_t launch_pair_rscore_map(
    const scalar_t* h, bool nhwc, int64_t pairs, int64_t channels, int64_t hw, float* r, float* map,
    cudaStream_t stream);

// Philox blocks (4 x 32 bits each) one row of shell_sample consumes: ceil(d / 4) for the
// coordinates, one for the radius.
constexpr int64_t shell_sample_blocks_per_row(int64_t d) {
  return (d + 3) / 4 + 1;
}

// out [n, d] float32, n >= 1, with Philox counters [offset / 4, offset / 4 + n * blocks_per_row).
cudaError_t launch_shell_sample(
    float* out, int64_t n, int64_t d, ShellRadius radius, at::PhiloxCudaState philox, cudaStream_t stream);

}  // namespace ama::cuda
