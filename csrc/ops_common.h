// Host-side pieces shared by the CPU and CUDA ops: argument checks (one message text for both
// backends, mirrored by ama_stream/ops/checks.py), output allocation, the dtype dispatch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

#include "ops_math.h"

namespace ama {

// The input dtypes of pair_rscore (each accumulated in float32); no double instantiation.
#define AMA_DISPATCH_RSCORE_TYPES(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(                                       \
      TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
      AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// h must be [2B, C, H, W] of a floating type the kernels read.
inline void check_pair_rscore_args(const at::Tensor& h) {
  TORCH_CHECK_VALUE(h.dim() == 4, "pair_rscore: h must be 4-D [2B, C, H, W], got ", h.dim(), "-D shape ", h.sizes());
  TORCH_CHECK_VALUE(
      h.size(0) % 2 == 0,
      "pair_rscore: h's first dimension must be even (B (x, x) rows then B (x, x_hat) rows), got ",
      h.size(0));
  const auto dtype = h.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      "pair_rscore: h must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_shell_sample_args(int64_t n, int64_t d, double r_inner, double r_outer) {
  TORCH_CHECK_VALUE(n >= 0, "shell_sample: n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(d >= 1, "shell_sample: d must be >= 1, got ", d);
  TORCH_CHECK_VALUE(
      std::isfinite(r_inner) && std::isfinite(r_outer), "shell_sample: r_inner and r_outer must be finite, got r_inner=",
      r_inner, " r_outer=", r_outer);
  TORCH_CHECK_VALUE(r_inner >= 0, "shell_sample: r_inner must be >= 0, got ", r_inner);
  TORCH_CHECK_VALUE(
      r_inner <= r_outer, "shell_sample: r_inner must be <= r_outer, got r_inner=", r_inner, " r_outer=", r_outer);
}

// channels_last h is read in place; any other layout that is not contiguous NCHW is copied once.
inline bool reads_as_nhwc(const at::Tensor& h) {
  return !h.is_contiguous() && h.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The [B] float32 R-scores and, when asked for, the pooled features [2B, C] (else undefined).
inline std::tuple<at::Tensor, at::Tensor> allocate_pair_rscore_outputs(const at::Tensor& h, bool with_features) {
  const auto opts = h.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor features = with_features ? at::empty({h.size(0), h.size(1)}, opts) : at::Tensor();
  return {at::empty({h.size(0) / 2}, opts), features};
}

// The [B] float32 R-scores and the [B, H, W] float32 anomaly map.
inline std::tuple<at::Tensor, at::Tensor> allocate_pair_rscore_map_outputs(const at::Tensor& h) {
  const auto opts = h.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  return {at::empty({h.size(0) / 2}, opts), at::empty({h.size(0) / 2, h.size(2), h.size(3)}, opts)};
}

}  // namespace ama
