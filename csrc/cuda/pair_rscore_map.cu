// CUDA kernel of ama::pair_rscore_map: one block per pair. The block first forms the channel sums
// of both rows (a warp per channel for NCHW, a thread per channel for NHWC, as pair_rscore) and R
// from them, then the map: a thread per position summing |ReLU(x) - ReLU(y)| over the channels.
// Each reduction has a fixed order, so results are deterministic.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "launch.h"
#include "reduce.cuh"

namespace ama::cuda {
namespace {

// Element (c, p) of a row sits at c * c_stride + p * p_stride: (hw, 1) for NCHW, (1, C) for NHWC.
template <typename scalar_t>
__global__ void pair_rscore_map_kernel(const scalar_t* __restrict__ h, int64_t pairs, int64_t channels, int64_t hw,
                                       bool nhwc, float* r, float* map) {
  const int64_t b = blockIdx.x;
  const int64_t row = channels * hw;
  const scalar_t* x = h + b * row;
  const scalar_t* y = h + (b + pairs) * row;
  const int64_t c_stride = nhwc ? 1 : hw, p_stride = nhwc ? channels : 1;
  float dist = 0.f;
  if (nhwc) {  // a thread per channel: neighbouring threads read neighbouring channels
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
      float fx = 0.f, fy = 0.f;
      for (int64_t p = 0; p < hw; ++p) {
        fx += relu_keep_nan(static_cast<float>(x[c + p * p_stride]));
        fy += relu_keep_nan(static_cast<float>(y[c + p * p_stride]));
      }
      dist += fabsf(fx - fy);
    }
  } else {  // a warp per channel: its lanes read consecutive positions
    const int lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
    for (int64_t c = threadIdx.x / kWarp; c < channels; c += warps) {
      float fx = 0.f, fy = 0.f;
      for (int64_t p = lane; p < hw; p += kWarp) {
        fx += relu_keep_nan(static_cast<float>(x[c * c_stride + p]));
        fy += relu_keep_nan(static_cast<float>(y[c * c_stride + p]));
      }
      fx = warp_sum(fx);
      fy = warp_sum(fy);
      dist += lane == 0 ? fabsf(fx - fy) : 0.f;
    }
  }
  dist = block_sum(dist);
  if (threadIdx.x == 0) {
    r[b] = dist;
  }
  for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {  // the map: a thread per position
    float m = 0.f;
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t at = c * c_stride + p * p_stride;
      m += fabsf(relu_keep_nan(static_cast<float>(x[at])) - relu_keep_nan(static_cast<float>(y[at])));
    }
    map[b * hw + p] = m;
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_pair_rscore_map(const scalar_t* h, bool nhwc, int64_t pairs, int64_t channels, int64_t hw,
                                   float* r, float* map, cudaStream_t stream) {
  const int64_t wanted = std::max<int64_t>(nhwc ? channels : channels * kWarp, hw);
  const int threads = static_cast<int>(std::clamp<int64_t>((wanted + kWarp - 1) / kWarp * kWarp, kWarp, kMaxThreads));
  pair_rscore_map_kernel<scalar_t><<<static_cast<unsigned>(pairs), threads, 0, stream>>>(
      h, pairs, channels, hw, nhwc, r, map);
  return cudaGetLastError();
}

#define AMA_INSTANTIATE(T) \
  template cudaError_t launch_pair_rscore_map<T>(const T*, bool, int64_t, int64_t, int64_t, float*, float*, cudaStream_t);
AMA_INSTANTIATE(float)
AMA_INSTANTIATE(c10::Half)
AMA_INSTANTIATE(c10::BFloat16)
#undef AMA_INSTANTIATE

}  // namespace ama::cuda
