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
    """Compiled R and features equal the twin's within float32 summation-order error."""
    _, c, hh, ww = h.shape
    want = pair_rscore_reference(h, return_features=True)
    got = torch.ops.ama.pair_rscore_features(h)
    assert len(got) == 2 and all(t.dtype == torch.float32 and t.device == h.device for t in got)
    # float32 sums of H*W terms, then of C terms: the error grows with C * H * W.
    tol_r = 2e-6 * max(c * hh * ww, 1)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=tol_r)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=2e-6 * max(hh * ww, 1))
    plain = torch.ops.ama.pair_rscore(h)
    assert isinstance(plain, torch.Tensor) and plain.shape == (h.shape[0] // 2,)
    torch.testing.assert_close(plain, got[0], rtol=0, atol=0)


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
    torch.testing.assert_close(ops.pair_rscore(h), torch.ops.ama.pair_rscore(h), rtol=0, atol=0)
    r, f = ops.pair_rscore(h, return_features=True)
    assert r.shape == (9,) and f.shape == (18, 16)
    torch.testing.assert_close(r, ops.pair_rscore(h), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_one_pair_stays_in_that_pair(device: str) -> None:
    require_compiled(device)
    h = make_h((4, 8, 3, 3), torch.float32, "contiguous", device)
    h[5, 2, 1, 1] = float("nan")  # row 5 is the (x, x_hat) half of pair 1
    for r in (torch.ops.ama.pair_rscore(h), pair_rscore_reference(h)):
        assert torch.isnan(r[1]) and torch.isfinite(r[[0, 2, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device: str) -> None:
    require_compiled(device)
    h = make_h((33, 64, 8, 8), torch.bfloat16, "channels_last", device)
    first = torch.ops.ama.pair_rscore_features(h)
    for a, b in zip(first, torch.ops.ama.pair_rscore_features(h)):
        assert torch.equal(a, b)


def test_twin_is_differentiable_and_public_op_uses_it_under_autograd() -> None:
    h = make_h((3, 4, 2, 2), torch.float32, "contiguous", "cpu").requires_grad_()
    r = ops.pair_rscore(h)
    assert r.grad_fn is not None
    r.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_op_returns_r_only_and_calibration_owns_z_and_log_a() -> None:
    """One owner of the score math: the op gives R; z and log A come from the Calibration."""
    import inspect

    from ama_stream.calibration import Calibration, Entry, Policy

    assert str(torch.ops.ama.pair_rscore.default._schema) == "ama::pair_rscore(Tensor h) -> Tensor"
    assert str(torch.ops.ama.pair_rscore_features.default._schema) == \
        "ama::pair_rscore_features(Tensor h) -> (Tensor r, Tensor features)"
    assert list(inspect.signature(ops.pair_rscore).parameters) == ["h", "return_features"]
    h = make_h((6, 5, 3, 3), torch.float32, "contiguous", "cpu")
    r = ops.pair_rscore(h).double().numpy()
    d = Calibration("m", Entry(n=10, mu=2.0, sigma=3.0), Policy("sigma", None, 3.0)).decide(r)
    np.testing.assert_allclose(d.z, (r - 2.0) / 3.0)
    np.testing.assert_allclose(d.log_a, -0.5 * ((r - 2.0) / 3.0) ** 2 - math.log(3.0) - 0.5 * math.log(2 * math.pi))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    require_compiled(device)
    for shape, dtype, layout in [
        ((3, 5, 3, 3), torch.float32, "contiguous"),
        ((2, 16, 4, 4), torch.bfloat16, "channels_last"),
        ((1, 7, 2, 5), torch.float16, "strided"),
    ]:
        h = make_h(shape, dtype, layout, device)
        torch.library.opcheck(torch.ops.ama.pair_rscore.default, (h,))
        torch.library.opcheck(torch.ops.ama.pair_rscore_features.default, (h,))


def test_meta_tensors_give_shapes() -> None:
    h = torch.empty(10, 6, 8, 8, device="meta")
    r, f = ops.pair_rscore(h, return_features=True)
    assert r.shape == (5,) and f.shape == (10, 6) and r.device.type == "meta" and f.device.type == "meta"
    assert ops.pair_rscore(h).shape == (5,)


@pytest.mark.slow
def test_torch_compile_fullgraph() -> None:
    require_compiled("cpu")
    h = make_h((4, 8, 8, 8), torch.float32, "contiguous", "cpu")

    def tail(h: torch.Tensor):
        return ops.pair_rscore(torch.nn.functional.leaky_relu(h, 0.2), return_features=True)

    compiled = torch.compile(tail, fullgraph=True)
    for a, b in zip(compiled(h), tail(h)):
        torch.testing.assert_close(a, b)


# --- bad input: the same clear error from the public op, the twin and the raw compiled op -----------

BAD_INPUTS = [
    (lambda: torch.zeros(4, 3, 2), ValueError, "must be 4-D"),
    (lambda: torch.zeros(4, 3, 2, 2, 1), ValueError, "must be 4-D"),
    (lambda: torch.zeros(3, 3, 2, 2), ValueError, "first dimension must be even"),
    (lambda: torch.zeros(4, 3, 2, 2, dtype=torch.float64), TypeError, "float32, float16 or bfloat16"),
    (lambda: torch.zeros(4, 3, 2, 2, dtype=torch.int32), TypeError, "float32, float16 or bfloat16"),
]


PATHS = {
    "public": ops.pair_rscore,
    "twin": pair_rscore_reference,
    "compiled": lambda h: torch.ops.ama.pair_rscore(h),
    "compiled_features": lambda h: torch.ops.ama.pair_rscore_features(h),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make, exc, message", BAD_INPUTS)
def test_bad_input_rejected_on_every_path(path: str, make, exc, message) -> None:
    if path.startswith("compiled"):
        require_compiled("cpu")
    with pytest.raises(exc, match=message):
        PATHS[path](make())


def test_bad_argument_types() -> None:
    for fn in (ops.pair_rscore, pair_rscore_reference):
        with pytest.raises(TypeError, match="h must be a tensor"):
            fn([[1.0]])
        with pytest.raises(TypeError):  # mu/sigma are gone from the op: the calibration owns them
            fn(torch.zeros(4, 3, 2, 2), 0.0, 1.0)
