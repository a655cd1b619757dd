"""ama::pair_rscore (compiled, CPU and CUDA) against its pure-PyTorch twin, and its input checks."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ama_stream import ops
from ops_support import DEVICES, require_compiled
from ama_stream.ops.reference import pair_rscore_reference

LAYOUTS = ["contiguous", "channels_last", "strided"]

# Edge shapes [B, C, H, W] (B pairs, so h is [2B, C, H, W]) cover B = 1..513, C = 1..256, H, W = 1..16,
# tails of the 8-wide vector loops (C, H*W not multiples of 8) and the paper's [B, 128, 8, 8].
EDGE_SHAPES = [
    (1, 1, 1, 1), (1, 1, 16, 16), (1, 256, 1, 1), (2, 3, 5, 7), (513, 4, 3, 3), (17, 256, 8, 8),
    (3, 129, 16, 16), (64, 128, 8, 8), (5, 9, 1, 13), (7, 33, 2, 2), (0, 8, 4, 4), (4, 0, 4, 4),
]


def _random_shapes(count: int, seed: int = 0, max_elements: int = 1 << 20) -> list[tuple[int, int, int, int]]:
    """Log-uniform B and C, uniform H and W, each h at most max_elements (B shrunk to fit)."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(count):
        c = int(round(math.exp(rng.uniform(0, math.log(256)))))
        hh, ww = rng.randint(1, 16), rng.randint(1, 16)
        b = int(round(math.exp(rng.uniform(0, math.log(513)))))
        b = max(1, min(b, max_elements // (2 * c * hh * ww)))
        shapes.append((b, c, hh, ww))
    return shapes


SHAPES = EDGE_SHAPES + _random_shapes(14)



def make_h(shape: tuple[int, int, int, int], dtype: torch.dtype, layout: str, device: str, seed: int = 0) -> torch.Tensor:
    b, c, hh, ww = shape
    gen = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other channel of a wider tensor: neither contiguous nor channels_last
        h = torch.randn(2 * b, 2 * c, hh, ww, generator=gen)[:, ::2]
    else:
        h = torch.randn(2 * b, c, hh, ww, generator=gen)
    h = h.to(device=device, dtype=dtype)
    return h.to(memory_format=torch.channels_last) if layout == "channels_last" else h


def assert_matches_twin(h: torch.Tensor) -> None:
    """Compiled R, z, log A and features equal the twin's within float32 summation-order error."""
    _, c, hh, ww = h.shape
    r_twin, _, _, f_twin = pair_rscore_reference(h, 0.0, 1.0, return_features=True)
    mu = float(r_twin.mean()) if r_twin.numel() else 0.0
    sigma = float(r_twin.std()) + 1.0 if r_twin.numel() > 1 else 1.0
    want = pair_rscore_reference(h, mu, sigma, return_features=True)
    got = torch.ops.ama.pair_rscore_features(h, mu, sigma)
    assert all(t.dtype == torch.float32 and t.device == h.device for t in got)
    # float32 sums of H*W terms, then of C terms: the error grows with C * H * W.
    tol_r = 2e-6 * max(c * hh * ww, 1)
    max_z = float(want[1].abs().max()) if want[1].numel() else 0.0
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=tol_r)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=tol_r / sigma)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=(max_z + 1) * tol_r / sigma)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=2e-6 * max(hh * ww, 1))
    plain = torch.ops.ama.pair_rscore(h, mu, sigma)
    for a, b in zip(plain, got[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compiled_matches_twin_float32(device: str, shape) -> None:
    require_compiled(device)
    for layout in LAYOUTS:
        assert_matches_twin(make_h(shape, torch.float32, layout, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_compiled_matches_twin_half_types(device: str, dtype: torch.dtype) -> None:
    require_compiled(device)
    for shape in SHAPES[::2]:
        for layout in LAYOUTS:
            assert_matches_twin(make_h(shape, dtype, layout, device))


@pytest.mark.parametrize("device", DEVICES)
def test_public_op_uses_compiled_kernel_and_agrees(device: str) -> None:
    require_compiled(device)
    h = make_h((9, 16, 8, 8), torch.float32, "contiguous", device)
    assert ops.backend(device) == "compiled"
    for a, b in zip(ops.pair_rscore(h, 3.0, 2.0), torch.ops.ama.pair_rscore(h, 3.0, 2.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    r, z, log_a, f = ops.pair_rscore(h, 3.0, 2.0, return_features=True)
    assert f.shape == (18, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_one_pair_stays_in_that_pair(device: str) -> None:
    require_compiled(device)
    h = make_h((4, 8, 3, 3), torch.float32, "contiguous", device)
    h[5, 2, 1, 1] = float("nan")  # row 5 is the (x, x_hat) half of pair 1
    for r, _, _ in (torch.ops.ama.pair_rscore(h, 0.0, 1.0), pair_rscore_reference(h, 0.0, 1.0)):
        assert torch.isnan(r[1]) and torch.isfinite(r[[0, 2, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device: str) -> None:
    require_compiled(device)
    h = make_h((33, 64, 8, 8), torch.bfloat16, "channels_last", device)
    first = torch.ops.ama.pair_rscore(h, 1.0, 2.0)
    for a, b in zip(first, torch.ops.ama.pair_rscore(h, 1.0, 2.0)):
        assert torch.equal(a, b)


def test_twin_is_differentiable_and_public_op_uses_it_under_autograd() -> None:
    h = make_h((3, 4, 2, 2), torch.float32, "contiguous", "cpu").requires_grad_()
    r, z, log_a = ops.pair_rscore(h, 1.0, 2.0)
    assert r.grad_fn is not None
    log_a.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_mu_sigma_accept_numpy_and_cpu_tensors() -> None:
    h = make_h((2, 3, 2, 2), torch.float32, "contiguous", "cpu")
    want = ops.pair_rscore(h, 1.5, 2.0)
    for mu, sigma in ((np.float64(1.5), np.float32(2.0)), (torch.tensor(1.5), torch.tensor([2.0]))):
        for a, b in zip(ops.pair_rscore(h, mu, sigma), want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    require_compiled(device)
    for shape, dtype, layout in [
        ((3, 5, 3, 3), torch.float32, "contiguous"),
        ((2, 16, 4, 4), torch.bfloat16, "channels_last"),
        ((1, 7, 2, 5), torch.float16, "strided"),
    ]:
        h = make_h(shape, dtype, layout, device)
        torch.library.opcheck(torch.ops.ama.pair_rscore.default, (h, 0.5, 2.0))
        torch.library.opcheck(torch.ops.ama.pair_rscore_features.default, (h, 0.5, 2.0))


def test_meta_tensors_give_shapes() -> None:
    h = torch.empty(10, 6, 8, 8, device="meta")
    r, z, log_a, f = ops.pair_rscore(h, 0.0, 1.0, return_features=True)
    assert r.shape == z.shape == log_a.shape == (5,) and f.shape == (10, 6) and r.device.type == "meta"


@pytest.mark.slow
def test_torch_compile_fullgraph() -> None:
    require_compiled("cpu")
    h = make_h((4, 8, 8, 8), torch.float32, "contiguous", "cpu")

    def tail(h: torch.Tensor):
        return ops.pair_rscore(torch.nn.functional.leaky_relu(h, 0.2), 1.0, 2.0)

    compiled = torch.compile(tail, fullgraph=True)
    for a, b in zip(compiled(h), tail(h)):
        torch.testing.assert_close(a, b)


# --- bad input: the same clear error from the public op, the twin and the raw compiled op -----------

BAD_INPUTS = [
    (lambda: torch.zeros(4, 3, 2), 0.0, 1.0, ValueError, "must be 4-D"),
    (lambda: torch.zeros(4, 3, 2, 2, 1), 0.0, 1.0, ValueError, "must be 4-D"),
    (lambda: torch.zeros(3, 3, 2, 2), 0.0, 1.0, ValueError, "first dimension must be even"),
    (lambda: torch.zeros(4, 3, 2, 2, dtype=torch.float64), 0.0, 1.0, TypeError, "float32, float16 or bfloat16"),
    (lambda: torch.zeros(4, 3, 2, 2, dtype=torch.int32), 0.0, 1.0, TypeError, "float32, float16 or bfloat16"),
    (lambda: torch.zeros(4, 3, 2, 2), 0.0, 0.0, ValueError, "sigma must be > 0"),
    (lambda: torch.zeros(4, 3, 2, 2), 0.0, -1.0, ValueError, "sigma must be > 0"),
    (lambda: torch.zeros(4, 3, 2, 2), float("nan"), 1.0, ValueError, "must be finite"),
    (lambda: torch.zeros(4, 3, 2, 2), 0.0, float("inf"), ValueError, "must be finite"),
    (lambda: torch.zeros(4, 3, 2, 2), float("-inf"), 1.0, ValueError, "must be finite"),
]


PATHS = {
    "public": ops.pair_rscore,
    "twin": pair_rscore_reference,
    "compiled": lambda h, mu, sigma: torch.ops.ama.pair_rscore(h, mu, sigma),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make, mu, sigma, exc, message", BAD_INPUTS)
def test_bad_input_rejected_on_every_path(path: str, make, mu, sigma, exc, message) -> None:
    if path == "compiled":
        require_compiled("cpu")
    with pytest.raises(exc, match=message):
        PATHS[path](make(), mu, sigma)


def test_bad_scalar_types_and_devices() -> None:
    h = torch.zeros(4, 3, 2, 2)
    for fn in (ops.pair_rscore, pair_rscore_reference):
        with pytest.raises(ValueError, match="mu is on meta but h is on cpu"):
            fn(h, torch.tensor(0.0, device="meta"), 1.0)
        with pytest.raises(ValueError, match="sigma must be a number"):
            fn(h, 0.0, torch.ones(2))
        with pytest.raises(TypeError, match="mu must be a real number"):
            fn(h, "0.0", 1.0)
        with pytest.raises(TypeError, match="h must be a tensor"):
            fn([[1.0]], 0.0, 1.0)
