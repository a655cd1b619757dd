// CPU kernel of ama::pair_rscore_map: R and the anomaly map from one pass over h.
// For each pair b, every element of its two rows is read once and ReLU'd: it is added to its
// row's channel sum (for R = sum_c |f_x - f_y|, exactly as pair_rscore) and its absolute
// difference to the other row's element is added to that position's map value. NCHW walks
// channel by channel (the inner loop over positions vectorises), NHWC position by position (the
// inner loop over channels vectorises). Parallel over pairs; deterministic.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops_common.h"

namespace ama {
namespace {

constexpr int64_t kGrainElements = 32768;  // about ATen's usual grain size, in elements of h per chunk

template <typename scalar_t>
void pair_map_nchw(const scalar_t* x, const scalar_t* y, int64_t channels, int64_t hw, float* f, float* map) {
  std::fill(map, map + hw, 0.f);
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* xc = x + c * hw;
    const scalar_t* yc = y + c * hw;
    float sx = 0.f, sy = 0.f;
#pragma omp simd reduction(+ : sx, sy)
    for (int64_t p = 0; p < hw; ++p) {
      const float a = relu_keep_nan(static_cast<float>(xc[p]));
      const float b = relu_keep_nan(static_cast<float>(yc[p]));
      sx += a;
      sy += b;
      map[p] += std::abs(a - b);
    }
    f[c] = sx;
    f[channels + c] = sy;
  }
}

template <typename scalar_t>
void pair_map_nhwc(const scalar_t* x, const scalar_t* y, int64_t channels, int64_t hw, float* f, float* map) {
  std::fill(f, f + 2 * channels, 0.f);
  float* fx = f;
  float* fy = f + channels;
  for (int64_t p = 0; p < hw; ++p) {
    const scalar_t* xp = x + p * channels;
    const scalar_t* yp = y + p * channels;
    float m = 0.f;
#pragma omp simd reduction(+ : m)
    for (int64_t c = 0; c < channels; ++c) {
      const float a = relu_keep_nan(static_cast<float>(xp[c]));
      const float b = relu_keep_nan(static_cast<float>(yp[c]));
      fx[c] += a;
      fy[c] += b;
      m += std::abs(a - b);
    }
    map[p] = m;
  }
}

template <typename scalar_t>
void pair_rscore_map_rows(const scalar_t* h, bool nhwc, int64_t pairs, int64_t channels, int64_t hw, float* r,
                          float* map) {
  const int64_t row = channels * hw;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, 2 * row));
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> f(2 * channels);  // the pair's channel sums: (x, x) then (x, x_hat)
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* x = h + b * row;
      const scalar_t* y = h + (b + pairs) * row;
      if (nhwc) {
        pair_map_nhwc(x, y, channels, hw, f.data(), map + b * hw);
      } else {
        pair_map_nchw(x, y, channels, hw, f.data(), map + b * hw);
      }
      float dist = 0.f;
      for (int64_t c = 0; c < channels; ++c) {
        dist += std::abs(f[c] - f[channels + c]);
      }
      r[b] = dist;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pair_rscore_map_cpu(const at::Tensor& h_in) {
  check_pair_rscore_args(h_in);
  TORCH_CHECK_VALUE(h_in.device().is_cpu(), "pair_rscore_map: CPU kernel called with h on ", h_in.device());
  auto [r, map] = allocate_pair_rscore_map_outputs(h_in);
  const bool nhwc = reads_as_nhwc(h_in);
  const at::Tensor h = nhwc ? h_in : h_in.contiguous();
  AMA_DISPATCH_RSCORE_TYPES(h.scalar_type(), "ama::pair_rscore_map (CPU)", [&] {
    pair_rscore_map_rows(h.const_data_ptr<scalar_t>(), nhwc, h.size(0) / 2, h.size(1), h.size(2) * h.size(3),
                         r.data_ptr<float>(), map.data_ptr<float>());
  });
  return {r, map};
}

}  // namespace
}  // namespace ama

TORCH_LIBRARY_IMPL(ama, CPU, m) {
  m.impl("pair_rscore_map", &ama::pair_rscore_map_cpu);
}
