"""ama::shell_sample (compiled, CPU and CUDA) and its twin: the distribution, seeding and input checks.

The compiled samplers and the twin are only required to be statistically equivalent, so each is
tested on its own against the target laws -- a radius uniform between the spheres (the default, the
paper's), or uniform over the volume of the shell (volume=True) -- and against the other. (The CPU kernel happens to draw through the same generator calls as the twin; the CUDA
kernel uses its own Philox layout.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ama_stream import ops
from ops_support import DEVICES, require_compiled
from ama_stream.ops.reference import shell_sample_reference




def compiled_sampler(n, d, r_inner, r_outer, generator=None, device=None, volume=False):
    return torch.ops.ama.shell_sample(n, d, r_inner, r_outer, volume=volume, generator=generator, device=device)


SAMPLERS = {"compiled": compiled_sampler, "twin": shell_sample_reference}


def sampler(kind: str, device: str):
    if kind == "compiled":
        require_compiled(device)
    elif device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return SAMPLERS[kind]


def volume_fraction(x: torch.Tensor, d: int, r_inner: float, r_outer: float) -> np.ndarray:
    """(r^d - r_in^d) / (r_out^d - r_in^d), in log space: uniform on [0, 1] for a uniform shell."""
    log_r = torch.log(x.double().norm(dim=1)).cpu().numpy()
    q = math.exp(d * (math.log(r_inner) - math.log(r_outer))) if r_inner > 0 else 0.0
    return (np.exp(d * (log_r - math.log(r_outer))) - q) / (1.0 - q)


def radial_fraction(x: torch.Tensor, r_inner: float, r_outer: float) -> np.ndarray:
    """(r - r_in) / (r_out - r_in): uniform on [0, 1] when the radius is uniform between the spheres."""
    r = x.double().norm(dim=1).cpu().numpy()
    return (r - r_inner) / (r_outer - r_inner)




# (d, r_inner, r_outer): small and large d, a full ball, a thin shell, and radii whose d-th powers
# overflow float64 at d = 512 (22.6^512 ~ 1e693) and underflow it (0.5^512... and 0.01^512).
CASES = [(1, 0.5, 2.0), (2, 0.0, 1.0), (3, 1.0, 1.5), (16, 2.0, 4.0), (128, 10.0, 12.0),
         (512, 0.9 * math.sqrt(512), 1.1 * math.sqrt(512)), (512, 0.01, 0.02)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["compiled", "twin"])
@pytest.mark.parametrize("law", ["radial", "volume"])
@pytest.mark.parametrize("d, r_inner, r_outer", CASES)
def test_shell_law(kind: str, device: str, law: str, d: int, r_inner: float, r_outer: float) -> None:
    sample = sampler(kind, device)
    n = 4000
    gen = torch.Generator(device).manual_seed(1234 + d)
    x = sample(n, d, r_inner, r_outer, generator=gen, device=device, volume=law == "volume")
    assert x.shape == (n, d) and x.dtype == torch.float32 and x.device.type == device
    assert torch.isfinite(x).all()
    radius = x.double().norm(dim=1)
    assert (radius >= r_inner * (1 - 1e-5)).all() and (radius <= r_outer * (1 + 1e-5)).all()
    t = radial_fraction(x, r_inner, r_outer) if law == "radial" else volume_fraction(x, d, r_inner, r_outer)
    assert stats.kstest(np.clip(t, 0.0, 1.0), "uniform").pvalue > 1e-3
    # Direction: isotropic. The mean unit vector is near 0 (each coordinate has std 1/sqrt(n d)) ...
    unit = (x.double() / radius.unsqueeze(1)).cpu()
    assert unit.mean(dim=0).abs().max() < 5.0 / math.sqrt(n * d)
    # ... and a coordinate's square follows Beta(1/2, (d-1)/2) (for d = 1 it is always 1).
    if d > 1:
        assert stats.kstest(unit[:, 0].numpy() ** 2, stats.beta(0.5, (d - 1) / 2).cdf).pvalue > 1e-3
    else:
        assert torch.allclose(unit.abs(), torch.ones_like(unit))


def test_law_tests_have_power() -> None:
    """Each KS check above rejects the other law (for d > 1), so the two are told apart."""
    gen = torch.Generator().manual_seed(0)
    d, r_in, r_out, n = 8, 1.0, 2.0, 4000
    direction = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    radial = direction * (r_in + (r_out - r_in) * torch.rand(n, 1, generator=gen))
    assert stats.kstest(volume_fraction(radial, d, r_in, r_out), "uniform").pvalue < 1e-6
    volume = shell_sample_reference(n, d, r_in, r_out, generator=gen, volume=True)
    assert stats.kstest(radial_fraction(volume, r_in, r_out), "uniform").pvalue < 1e-6


@pytest.mark.parametrize("kind", ["compiled", "twin"])
def test_default_law_leaves_inward_negatives_off_the_normal_sphere(kind: str) -> None:
    """The defect the default fixes: in d = 128 an inward shell [0.5 r, r] drawn by VOLUME puts 99% of
    the points above 0.96 r, i.e. on the normal codes; the default (radial) spreads them over the shell."""
    sample = sampler(kind, "cpu")
    d = 128
    r = math.sqrt(d)
    radial = sample(4000, d, 0.5 * r, r, generator=torch.Generator().manual_seed(2)).norm(dim=1) / r
    volume = sample(4000, d, 0.5 * r, r, generator=torch.Generator().manual_seed(2), volume=True).norm(dim=1) / r
    assert float(torch.quantile(volume, 0.01)) > 0.96
    assert float(torch.quantile(radial, 0.5)) == pytest.approx(0.75, abs=0.02)
    assert float(torch.quantile(radial, 0.1)) < 0.6


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_and_twin_are_statistically_equivalent(device: str) -> None:
    require_compiled(device)
    d, r_in, r_out, n = 64, 6.0, 9.0, 4000
    for volume in (False, True):
        a = compiled_sampler(n, d, r_in, r_out, generator=torch.Generator(device).manual_seed(5), device=device,
                             volume=volume)
        b = shell_sample_reference(n, d, r_in, r_out, generator=torch.Generator(device).manual_seed(6), device=device,
                                   volume=volume)
        assert stats.ks_2samp(a.norm(dim=1).cpu().numpy(), b.norm(dim=1).cpu().numpy()).pvalue > 1e-3
        assert stats.ks_2samp(a[:, 0].cpu().numpy(), b[:, 0].cpu().numpy()).pvalue > 1e-3


def test_cpu_kernel_draws_like_the_twin() -> None:
    """On the CPU both take randn(n, d) then rand(n) from the generator: equal up to float rounding."""
    require_compiled("cpu")
    for volume in (False, True):
        a = compiled_sampler(64, 512, 20.0, 24.0, generator=torch.Generator().manual_seed(9), volume=volume)
        b = shell_sample_reference(64, 512, 20.0, 24.0, generator=torch.Generator().manual_seed(9), volume=volume)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["compiled", "twin"])
def test_seeding(kind: str, device: str) -> None:
    sample = sampler(kind, device)
    g = lambda seed: torch.Generator(device).manual_seed(seed)  # noqa: E731
    same = sample(50, 33, 1.0, 2.0, generator=g(7), device=device), sample(50, 33, 1.0, 2.0, generator=g(7), device=device)
    assert torch.equal(*same)
    assert not torch.equal(same[0], sample(50, 33, 1.0, 2.0, generator=g(8), device=device))
    gen = g(7)
    first = sample(50, 33, 1.0, 2.0, generator=gen, device=device)
    assert not torch.equal(first, sample(50, 33, 1.0, 2.0, generator=gen, device=device)), "generator must advance"
    # No generator: the device's default generator, seeded by torch.manual_seed.
    torch.manual_seed(11)
    a = sample(20, 9, 0.0, 3.0, device=device)
    torch.manual_seed(11)
    assert torch.equal(a, sample(20, 9, 0.0, 3.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_public_op_matches_compiled_draws(device: str) -> None:
    require_compiled(device)
    assert ops.backend(device) == "compiled"
    a = ops.shell_sample(30, 12, 1.0, 2.0, generator=torch.Generator(device).manual_seed(3))
    b = compiled_sampler(30, 12, 1.0, 2.0, generator=torch.Generator(device).manual_seed(3))
    assert torch.equal(a, b) and a.device.type == device


@pytest.mark.parametrize("kind", ["compiled", "twin"])
def test_edge_sizes(kind: str) -> None:
    sample = sampler(kind, "cpu")
    assert sample(0, 5, 1.0, 2.0).shape == (0, 5)
    assert torch.equal(sample(4, 3, 0.0, 0.0), torch.zeros(4, 3))
    thin = sample(100, 10, 2.0, 2.0)
    torch.testing.assert_close(thin.norm(dim=1), torch.full((100,), 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    require_compiled(device)
    # opcheck runs the op repeatedly and compares: it reseeds the default generator between runs,
    # which an explicit generator object would not get, so the check uses the default one.
    torch.library.opcheck(torch.ops.ama.shell_sample.default, (5, 4, 1.0, 2.0), {"device": torch.device(device)})
    meta = torch.ops.ama.shell_sample(5, 4, 1.0, 2.0, device="meta")
    assert meta.shape == (5, 4) and meta.device.type == "meta"


# --- bad input: the same clear error from the public op, the twin and the raw compiled op -----------

BAD_INPUTS = [
    ((-1, 3, 1.0, 2.0), ValueError, "n must be >= 0"),
    ((5, 0, 1.0, 2.0), ValueError, "d must be >= 1"),
    ((5, 3, -0.5, 2.0), ValueError, "r_inner must be >= 0"),
    ((5, 3, 3.0, 2.0), ValueError, "r_inner must be <= r_outer"),
    ((5, 3, 1.0, float("inf")), ValueError, "must be finite"),
    ((5, 3, float("nan"), 2.0), ValueError, "must be finite"),
]


PATHS = {"public": ops.shell_sample, "twin": shell_sample_reference, "compiled": compiled_sampler}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("args, exc, message", BAD_INPUTS)
def test_bad_input_rejected_on_every_path(path: str, args, exc, message) -> None:
    if path == "compiled":
        require_compiled("cpu")
    with pytest.raises(exc, match=message):
        PATHS[path](*args)


@pytest.mark.parametrize("path", PATHS)
def test_generator_on_another_device_rejected_on_every_path(path: str) -> None:
    if path == "compiled":
        require_compiled("cpu")
    with pytest.raises(ValueError, match="generator is on cpu but device is meta"):
        PATHS[path](3, 4, 1.0, 2.0, generator=torch.Generator(), device="meta")


def test_bad_argument_types() -> None:
    for fn in (ops.shell_sample, shell_sample_reference):
        with pytest.raises(TypeError, match="n must be an integer"):
            fn(2.5, 3, 1.0, 2.0)
        with pytest.raises(TypeError, match="r_outer must be a real number"):
            fn(2, 3, 1.0, "2")
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            fn(2, 3, 1.0, 2.0, generator=0)
        with pytest.raises(ValueError, match="invalid device"):
            fn(2, 3, 1.0, 2.0, device="nonsense")
