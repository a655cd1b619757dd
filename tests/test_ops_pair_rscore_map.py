"""ama::pair_rscore_map (compiled, CPU and CUDA) against its pure-PyTorch twin: R and the anomaly map
from one pass, every layout and dtype, NaN containment, opcheck, fake kernel, bad inputs."""
from __future__ import annotations

import pytest
import torch

from ama_stream import ops
from ama_stream.ops.reference import pair_rscore_map_reference, pair_rscore_reference
from ops_support import DEVICES, require_compiled
from test_ops_pair_rscore import BAD_INPUTS, LAYOUTS, SHAPES, make_h


def assert_map_matches_twin(h: torch.Tensor) -> None:
    _, c, hh, ww = h.shape
    want_r, want_map = pair_rscore_map_reference(h)
    got_r, got_map = torch.ops.ama.pair_rscore_map(h)
    assert got_r.dtype == got_map.dtype == torch.float32 and got_map.shape == (h.shape[0] // 2, hh, ww)
    assert got_map.is_contiguous() and got_r.device == got_map.device == h.device
    torch.testing.assert_close(got_r, want_r, rtol=1e-5, atol=2e-6 * max(c * hh * ww, 1))
    torch.testing.assert_close(got_map, want_map, rtol=1e-5, atol=2e-6 * max(c, 1))
    # R is exactly pair_rscore's (the same channel sums), so the map costs no second score
    torch.testing.assert_close(got_r, torch.ops.ama.pair_rscore(h), rtol=1e-6, atol=2e-6 * max(c * hh * ww, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compiled_map_matches_twin_float32(device: str, shape) -> None:
    require_compiled(device)
    for layout in LAYOUTS:
        assert_map_matches_twin(make_h(shape, torch.float32, layout, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_compiled_map_matches_twin_half_types(device: str, dtype: torch.dtype) -> None:
    require_compiled(device)
    for shape in SHAPES[::2]:
        for layout in LAYOUTS:
            assert_map_matches_twin(make_h(shape, dtype, layout, device))


def test_twin_map_is_the_per_position_feature_difference() -> None:
    h = make_h((3, 5, 4, 6), torch.float32, "contiguous", "cpu")
    r, m = pair_rscore_map_reference(h)
    a = torch.relu(h)
    for b in range(3):
        for y in range(4):
            for x in range(6):
                want = (a[b, :, y, x] - a[b + 3, :, y, x]).abs().sum()
                torch.testing.assert_close(m[b, y, x], want)
    torch.testing.assert_close(r, pair_rscore_reference(h))
    assert bool((r <= m.sum(dim=(1, 2)) + 1e-4).all())  # L1 of the pooled sums <= sum of per-position L1


@pytest.mark.parametrize("device", DEVICES)
def test_map_is_zero_where_the_pair_agrees_and_marks_the_difference(device: str) -> None:
    require_compiled(device)
    h = make_h((2, 8, 5, 5), torch.float32, "contiguous", device)
    h[2:] = h[:2]
    h[3, :, 1, 4] += 3.0  # pair 1 differs at (1, 4) only
    r, m = torch.ops.ama.pair_rscore_map(h)
    assert torch.count_nonzero(m[0]) == 0 and r[0] == 0
    hot = (m[1] > 0).nonzero().tolist()
    assert hot == [[1, 4]] and r[1] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_pair_and_position(device: str) -> None:
    require_compiled(device)
    h = make_h((4, 8, 3, 3), torch.float32, "contiguous", device)
    h[5, 2, 1, 1] = float("nan")
    for r, m in (torch.ops.ama.pair_rscore_map(h), pair_rscore_map_reference(h)):
        assert torch.isnan(r[1]) and torch.isfinite(r[[0, 2, 3]]).all()
        assert torch.isnan(m[1, 1, 1]) and int(torch.isnan(m).sum()) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_map_deterministic(device: str) -> None:
    require_compiled(device)
    h = make_h((33, 64, 8, 8), torch.bfloat16, "channels_last", device)
    first = torch.ops.ama.pair_rscore_map(h)
    for a, b in zip(first, torch.ops.ama.pair_rscore_map(h)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_public_op_uses_compiled_map_kernel(device: str) -> None:
    require_compiled(device)
    h = make_h((9, 16, 8, 8), torch.float32, "channels_last", device)
    for a, b in zip(ops.pair_rscore_map(h), torch.ops.ama.pair_rscore_map(h)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grad_h = h.detach().clone().requires_grad_()
    r, m = ops.pair_rscore_map(grad_h)  # under autograd: the differentiable twin
    assert r.grad_fn is not None and m.grad_fn is not None


@pytest.mark.parametrize("device", DEVICES)
def test_map_opcheck(device: str) -> None:
    require_compiled(device)
    assert str(torch.ops.ama.pair_rscore_map.default._schema) == \
        "ama::pair_rscore_map(Tensor h) -> (Tensor r, Tensor map)"
    for shape, dtype, layout in [((3, 5, 3, 3), torch.float32, "contiguous"),
                                 ((2, 16, 4, 4), torch.bfloat16, "channels_last"),
                                 ((1, 7, 2, 5), torch.float16, "strided")]:
        torch.library.opcheck(torch.ops.ama.pair_rscore_map.default, (make_h(shape, dtype, layout, device),))


def test_map_fake_kernel_gives_shapes() -> None:
    h = torch.empty(10, 6, 4, 7, device="meta")
    r, m = ops.pair_rscore_map(h)
    assert r.shape == (5,) and m.shape == (5, 4, 7) and m.device.type == "meta" and m.dtype == torch.float32


@pytest.mark.parametrize("make, exc, message", BAD_INPUTS)
def test_map_bad_input_rejected_on_every_path(make, exc, message) -> None:
    paths = [ops.pair_rscore_map, pair_rscore_map_reference]
    if "cpu" in ops._compiled.DEVICES:
        paths.append(lambda h: torch.ops.ama.pair_rscore_map(h))
    for path in paths:
        with pytest.raises(exc, match=message):
            path(make())
