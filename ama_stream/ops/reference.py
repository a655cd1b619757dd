"""Pure-PyTorch twins of the compiled ops: the fallback path and the test oracle."""
from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def pair_rscore_reference(h: torch.Tensor, mu: float, sigma: float):
    """h [2B, C, H, W] (first B = (x, x), last B = (x, x_hat)) -> R, z, log_a, each [B] float32."""
    f = torch.relu(h.float()).sum(dim=(2, 3))
    b = f.shape[0] // 2
    r = (f[:b] - f[b:]).abs().sum(dim=1)
    z = (r - mu) / sigma
    log_a = -0.5 * z * z - math.log(sigma) - LOG_SQRT_2PI
    return r, z, log_a


def shell_sample_reference(n: int, d: int, r_inner: float, r_outer: float, generator=None, device="cpu"):
    """n points uniform over the volume between spheres of radii r_inner <= r_outer in R^d.

    r^d is uniform on [r_in^d, r_out^d]; computed in log space so large d neither overflows nor underflows.
    """
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    direction = torch.randn(n, d, generator=generator, device=device)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if r_outer <= 0:
        return torch.zeros(n, d, device=device)
    if r_inner <= 0:
        log_r = math.log(r_outer) + torch.log(u) / d
    else:
        # r^d = r_in^d + u (r_out^d - r_in^d) = r_out^d (q + u (1 - q)), q = (r_in / r_out)^d
        log_q = d * (math.log(r_inner) - math.log(r_outer))
        q = math.exp(log_q)  # underflows harmlessly to 0 for large d
        log_r = math.log(r_outer) + torch.log(q + u * (1.0 - q)) / d
    return direction * torch.exp(log_r).float().unsqueeze(1)
