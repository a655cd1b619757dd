// The arithmetic both backends share, host and device alike. Light on purpose: the CUDA kernel
// files include it, and every header they include is parsed again for each GPU architecture.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace ama {

// ReLU that keeps NaN (as torch.relu does), so a broken activation shows up in the score.
template <typename T>
C10_HOST_DEVICE inline T relu_keep_nan(T v) {
  return v < T(0) ? T(0) : v;
}

// Radius of a point of the shell r_inner <= r <= r_outer in R^d, from u in (0, 1]. Two laws:
// - radial (default, the paper's "uniformly between spheres"): r = r_in + u (r_out - r_in);
// - volume (uniform over the shell's volume): r^d = r_in^d + u (r_out^d - r_in^d), i.e.
//   r = r_out * (q + u (1 - q))^(1/d) with q = (r_in / r_out)^d, in log space so that d = 512 neither
//   overflows nor underflows (q underflows to 0 harmlessly). In d >= 64 this law puts nearly every
//   point on the outer sphere.
struct ShellRadius {
  double log_r_outer;
  double q;
  double inv_d;
  double r_inner;
  double r_outer;
  bool volume;

  ShellRadius(int64_t d, double r_inner_, double r_outer_, bool volume_)
      : log_r_outer(r_outer_ > 0 ? std::log(r_outer_) : 0.0),
        q(r_inner_ > 0 ? std::exp(static_cast<double>(d) * (std::log(r_inner_) - std::log(r_outer_))) : 0.0),
        inv_d(1.0 / static_cast<double>(d)),
        r_inner(r_inner_),
        r_outer(r_outer_),
        volume(volume_) {}

  C10_HOST_DEVICE inline double operator()(double u) const {
    if (r_outer <= 0) {
      return 0.0;
    }
    const double r = volume ? ::exp(log_r_outer + ::log(q + u * (1.0 - q)) * inv_d) : r_inner + u * (r_outer - r_inner);
    return r < r_inner ? r_inner : (r > r_outer ? r_outer : r);  // rounding must not leave the shell
  }
};

}  // namespace ama
