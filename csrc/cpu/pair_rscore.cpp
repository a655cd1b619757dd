// CPU kernel of ama::pair_rscore / ama::pair_rscore_features (R-scores only; z and log A belong to
// ama_stream.calibration).
// One pass over h: each element is read once, ReLU'd and summed over H*W in float32 into the
// row's channel sums f [C]; the pair's two rows then give R = sum_c |f_x - f_y|. No [2B, C, H, W]
// temporary is written. Parallel over pairs. The row sums have an AVX2/F16C version (chosen at
// run time when ATen itself runs AVX2 or better, so ATEN_CPU_CAPABILITY=default turns it off) and
// a portable version the compiler vectorises for the baseline ISA.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../ops_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AMA_HAVE_AVX2_PATH 1
#define AMA_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace ama {
namespace {

// Pairs per parallel chunk: about 32k elements of h, ATen's usual grain size.
constexpr int64_t kGrainElements = 32768;

// f[c] = sum over the row's H*W positions of ReLU(x), for one row of h (NCHW or NHWC order).
template <typename scalar_t>
using RowSums = void (*)(const scalar_t* x, int64_t channels, int64_t hw, float* f);

template <typename scalar_t>
void row_sums_nchw_portable(const scalar_t* x, int64_t channels, int64_t hw, float* f) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* p = x + c * hw;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < hw; ++i) {
      s += relu_keep_nan(static_cast<float>(p[i]));
    }
    f[c] = s;
  }
}

template <typename scalar_t>
void row_sums_nhwc_portable(const scalar_t* x, int64_t channels, int64_t hw, float* f) {
  std::fill(f, f + channels, 0.f);
  for (int64_t p = 0; p < hw; ++p) {
    const scalar_t* xp = x + p * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      f[c] += relu_keep_nan(static_cast<float>(xp[c]));
    }
  }
}

#ifdef AMA_HAVE_AVX2_PATH
// Eight elements as float32.
AMA_AVX2 inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
AMA_AVX2 inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
AMA_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// max(0, v) returns v when v is NaN (MAXPS returns its second operand), as torch.relu does.
AMA_AVX2 inline __m256 relu8(__m256 v) {
  return _mm256_max_ps(_mm256_setzero_ps(), v);
}
AMA_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename scalar_t>
AMA_AVX2 void row_sums_nchw_avx2(const scalar_t* x, int64_t channels, int64_t hw, float* f) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* p = x + c * hw;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  // two chains hide the add latency
    int64_t i = 0;
    for (; i + 16 <= hw; i += 16) {
      a0 = _mm256_add_ps(a0, relu8(load8(p + i)));
      a1 = _mm256_add_ps(a1, relu8(load8(p + i + 8)));
    }
    for (; i + 8 <= hw; i += 8) {
      a0 = _mm256_add_ps(a0, relu8(load8(p + i)));
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; i < hw; ++i) {
      s += relu_keep_nan(static_cast<float>(p[i]));
    }
    f[c] = s;
  }
}

template <typename scalar_t>
AMA_AVX2 void row_sums_nhwc_avx2(const scalar_t* x, int64_t channels, int64_t hw, float* f) {
  std::memset(f, 0, sizeof(float) * channels);
  for (int64_t p = 0; p < hw; ++p) {
    const scalar_t* xp = x + p * channels;
    int64_t c = 0;
    for (; c + 8 <= channels; c += 8) {
      _mm256_storeu_ps(f + c, _mm256_add_ps(_mm256_loadu_ps(f + c), relu8(load8(xp + c))));
    }
    for (; c < channels; ++c) {
      f[c] += relu_keep_nan(static_cast<float>(xp[c]));
    }
  }
}
#endif

bool use_avx2() {
#ifdef AMA_HAVE_AVX2_PATH
  static const bool ok = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

template <typename scalar_t>
RowSums<scalar_t> pick_row_sums(bool nhwc) {
#ifdef AMA_HAVE_AVX2_PATH
  if (use_avx2()) {
    return nhwc ? row_sums_nhwc_avx2<scalar_t> : row_sums_nchw_avx2<scalar_t>;
  }
#endif
  return nhwc ? row_sums_nhwc_portable<scalar_t> : row_sums_nchw_portable<scalar_t>;
}

template <typename scalar_t>
void pair_rscore_rows(
    const scalar_t* h, bool nhwc, int64_t pairs, int64_t channels, int64_t hw, float* r, float* features) {
  const RowSums<scalar_t> row_sums = pick_row_sums<scalar_t>(nhwc);
  const int64_t row = channels * hw;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, 2 * row));
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(features == nullptr ? 2 * channels : 0);
    for (int64_t b = begin; b < end; ++b) {
      // Write the channel sums straight into the features output when it is wanted.
      float* fx = features != nullptr ? features + b * channels : scratch.data();
      float* fy = features != nullptr ? features + (b + pairs) * channels : scratch.data() + channels;
      row_sums(h + b * row, channels, hw, fx);  // (x, x)
      row_sums(h + (b + pairs) * row, channels, hw, fy);  // (x, x_hat)
      float dist = 0.f;
#pragma omp simd reduction(+ : dist)
      for (int64_t c = 0; c < channels; ++c) {
        dist += std::abs(fx[c] - fy[c]);
      }
      r[b] = dist;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pair_rscore_impl(const at::Tensor& h_in, bool with_features) {
  check_pair_rscore_args(h_in);
  TORCH_CHECK_VALUE(h_in.device().is_cpu(), "pair_rscore: CPU kernel called with h on ", h_in.device());
  auto [r, features] = allocate_pair_rscore_outputs(h_in, with_features);
  const bool nhwc = reads_as_nhwc(h_in);
  const at::Tensor h = nhwc ? h_in : h_in.contiguous();
  float* f = with_features ? features.data_ptr<float>() : nullptr;
  AMA_DISPATCH_RSCORE_TYPES(h.scalar_type(), "ama::pair_rscore (CPU)", [&] {
    pair_rscore_rows(
        h.const_data_ptr<scalar_t>(), nhwc, h.size(0) / 2, h.size(1), h.size(2) * h.size(3), r.data_ptr<float>(), f);
  });
  return {r, features};
}

at::Tensor pair_rscore_cpu(const at::Tensor& h) {
  return std::get<0>(pair_rscore_impl(h, /*with_features=*/false));
}

std::tuple<at::Tensor, at::Tensor> pair_rscore_features_cpu(const at::Tensor& h) {
  return pair_rscore_impl(h, /*with_features=*/true);
}

}  // namespace
}  // namespace ama

TORCH_LIBRARY_IMPL(ama, CPU, m) {
  m.impl("pair_rscore", &ama::pair_rscore_cpu);
  m.impl("pair_rscore_features", &ama::pair_rscore_features_cpu);
}
