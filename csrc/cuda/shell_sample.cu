// CUDA kernel of ama::shell_sample. Counter-based Philox (ATen's header-only implementation, the
// same cipher and counter layout as cuRAND's Philox4_32_10 on subsequence 0): row i owns the counters
// base + i * blocks_per_row + q, so the samples do not depend on the launch configuration. A warp
// draws one row; lane l owns the Philox blocks l, l + 32, ... of it.
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/cuda/StatelessPhilox4x32.cuh>

#include <algorithm>

#include "launch.h"

namespace ama::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond this

// Uniform in (0, 1] from 24 random bits, so its log is finite.
__device__ __forceinline__ float unit_float(uint32_t bits) {
  return static_cast<float>((bits >> 8) + 1u) * 5.9604644775390625e-8f;  // 2^-24
}

// Uniform in (0, 1] from 53 random bits.
__device__ __forceinline__ double unit_double(uint32_t hi, uint32_t lo) {
  const uint64_t k = (static_cast<uint64_t>(hi >> 5) << 26) | (lo >> 6);
  return static_cast<double>(k + 1) * 1.1102230246251565e-16;  // 2^-53
}

// Four standard normals (Box-Muller) from one Philox block.
__device__ __forceinline__ float4 normal4(uint4 bits) {
  float s0, c0, s1, c1;
  const float r0 = sqrtf(-2.f * logf(unit_float(bits.x)));
  const float r1 = sqrtf(-2.f * logf(unit_float(bits.z)));
  sincospif(2.f * unit_float(bits.y), &s0, &c0);
  sincospif(2.f * unit_float(bits.w), &s1, &c1);
  return make_float4(r0 * c0, r0 * s0, r1 * c1, r1 * s1);
}

__global__ void shell_sample_kernel(float* out, int64_t n, int64_t d, ShellRadius radius, at::PhiloxCudaState philox) {
  const auto seeds = at::cuda::philox::unpack(philox);
  const uint64_t seed = std::get<0>(seeds);
  const uint64_t base = std::get<1>(seeds) / 4;  // offsets count 32-bit values, 4 per Philox block
  const int64_t blocks_per_row = shell_sample_blocks_per_row(d);
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; row < n;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {  // warp-uniform: the shuffles below are safe
    const uint64_t row_base = base + static_cast<uint64_t>(row) * blocks_per_row;
    float* out_row = out + row * d;
    // Pass 1: write Gaussian coordinates and sum their squares.
    float sq = 0.f;
    for (int64_t q = lane; 4 * q < d; q += kWarp) {
      const float4 g = normal4(at::cuda::philox_4x32(seed, row_base + q));
      const float v[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (4 * q + k < d) {
          out_row[4 * q + k] = v[k];
          sq += v[k] * v[k];
        }
      }
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o /= 2) {
      sq += __shfl_xor_sync(0xffffffffu, sq, o);
    }
    const uint4 ubits = at::cuda::philox_4x32(seed, row_base + blocks_per_row - 1);
    const double r = radius(unit_double(ubits.x, ubits.y));
    const float scale = static_cast<float>(r / fmax(sqrt(static_cast<double>(sq)), 1e-12));
    // Pass 2: each lane rescales exactly the coordinates it wrote.
    for (int64_t q = lane; 4 * q < d; q += kWarp) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (4 * q + k < d) {
          out_row[4 * q + k] *= scale;
        }
      }
    }
  }
}

}  // namespace

cudaError_t launch_shell_sample(
    float* out, int64_t n, int64_t d, ShellRadius radius, at::PhiloxCudaState philox, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((n + kRowsPerBlock - 1) / kRowsPerBlock, kMaxBlocks);
  shell_sample_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(out, n, d, radius, philox);
  return cudaGetLastError();
}

}  // namespace ama::cuda
