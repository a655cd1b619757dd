// Warp and block sums with a fixed order (deterministic), shared by the pair_rscore kernels.
// Light on purpose: nvcc parses it once per GPU architecture.
#pragma once

namespace ama::cuda {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most kMaxThreads); valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) {
    partial[warp] = v;
  }
  __syncthreads();
  v = (threadIdx.x < blockDim.x / kWarp) ? partial[lane] : 0.f;
  return warp == 0 ? warp_sum(v) : 0.f;
}

}  // namespace ama::cuda
