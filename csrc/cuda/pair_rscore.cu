// CUDA kernels of ama::pair_rscore / ama::pair_rscore_features: one block per pair, one pass over h
// with float32 accumulation, a fixed-order (deterministic) block reduction of |f_x - f_y|.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "launch.h"
#include "reduce.cuh"

namespace ama::cuda {
namespace {

// Contiguous [2B, C, H, W]: a warp per channel reads its H*W consecutive elements of both rows.
template <typename scalar_t>
__global__ void pair_rscore_nchw_kernel(
    const scalar_t* __restrict__ h, int64_t pairs, int64_t channels, int64_t hw, float* r, float* features) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const scalar_t* x = h + b * channels * hw;  // (x, x)
  const scalar_t* y = h + (b + pairs) * channels * hw;  // (x, x_hat)
  float dist = 0.f;  // meaningful in lane 0 of each warp
  for (int64_t c = threadIdx.x / kWarp; c < channels; c += warps) {  // warp-uniform
    float fx = 0.f, fy = 0.f;
    for (int64_t i = lane; i < hw; i += kWarp) {
      fx += relu_keep_nan(static_cast<float>(x[c * hw + i]));
      fy += relu_keep_nan(static_cast<float>(y[c * hw + i]));
    }
    fx = warp_sum(fx);
    fy = warp_sum(fy);
    if (lane == 0) {
      dist += fabsf(fx - fy);
      if (features != nullptr) {
        features[b * channels + c] = fx;
        features[(b + pairs) * channels + c] = fy;
      }
    }
  }
  dist = block_sum(lane == 0 ? dist : 0.f);
  if (threadIdx.x == 0) {
    r[b] = dist;
  }
}

// channels_last [2B, H, W, C]: a thread per channel walks the positions; neighbouring threads read
// neighbouring channels, so every load is coalesced.
template <typename scalar_t>
__global__ void pair_rscore_nhwc_kernel(
    const scalar_t* __restrict__ h, int64_t pairs, int64_t channels, int64_t hw, float* r, float* features) {
  const int64_t b = blockIdx.x;
  const scalar_t* x = h + b * channels * hw;
  const scalar_t* y = h + (b + pairs) * channels * hw;
  float dist = 0.f;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    float fx = 0.f, fy = 0.f;
    for (int64_t p = 0; p < hw; ++p) {
      fx += relu_keep_nan(static_cast<float>(x[p * channels + c]));
      fy += relu_keep_nan(static_cast<float>(y[p * channels + c]));
    }
    dist += fabsf(fx - fy);
    if (features != nullptr) {
      features[b * channels + c] = fx;
      features[(b + pairs) * channels + c] = fy;
    }
  }
  dist = block_sum(dist);
  if (threadIdx.x == 0) {
    r[b] = dist;
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_pair_rscore(
    const scalar_t* h, bool nhwc, int64_t pairs, int64_t channels, int64_t hw, float* r, float* features,
    cudaStream_t stream) {
  // NCHW: a warp per channel, up to 8 warps; NHWC: a thread per channel, rounded up to whole warps.
  const int64_t wanted = nhwc ? channels : channels * kWarp;
  const int threads = static_cast<int>(std::clamp<int64_t>((wanted + kWarp - 1) / kWarp * kWarp, kWarp, kMaxThreads));
  const auto kernel = nhwc ? pair_rscore_nhwc_kernel<scalar_t> : pair_rscore_nchw_kernel<scalar_t>;
  kernel<<<static_cast<unsigned>(pairs), threads, 0, stream>>>(h, pairs, channels, hw, r, features);
  return cudaGetLastError();
}

#define AMA_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_pair_rscore<T>(                                                                \
      const T*, bool, int64_t, int64_t, int64_t, float*, float*, cudaStream_t);
AMA_INSTANTIATE(float)
AMA_INSTANTIATE(c10::Half)
AMA_INSTANTIATE(c10::BFloat16)
#undef AMA_INSTANTIATE

}  // namespace ama::cuda
