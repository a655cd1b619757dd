"""The Scorer's use of the fused tail and its speed options: scores equal the paper's definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ama_stream import ops
from ama_stream.checkpoint import Checkpoint
from ama_stream.model import AMA, ModelConfig, pair
from ama_stream.preprocess import PreprocessSpec
from ama_stream.calibration import Calibration
from ama_stream.scoring import Scorer, Scores


def tiny_checkpoint(channels: int = 3, mirrored: bool = True, seed: int = 0, spectral_norm: bool = True) -> Checkpoint:
    torch.manual_seed(seed)
    cfg = ModelConfig(image_size=16, channels=channels, nz=8, enc_width=8, gen_width=16, disc_width=16, mirrored=mirrored,
                      spectral_norm=spectral_norm)
    model = AMA(cfg)
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode BN is not an identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return Checkpoint(model=cfg, preprocess=PreprocessSpec(image_size=16, channels=channels),
                      state_dict=model.state_dict(), mu=20.0, sigma=5.0)


def two_pass_scores(ckpt: Checkpoint, x: torch.Tensor, mu: float, sigma: float) -> tuple[np.ndarray, ...]:
    """Paper eq. 5/6 written out: two separate critic passes, pooled features, L1, Gaussian log-density
    (and the pooled features, (x, x) rows then (x, x_hat) rows)."""
    model = ckpt.build_model("cpu")
    mirrored = ckpt.model.mirrored
    with torch.no_grad():
        x_hat = model.reconstruct(x)
        f_real = model.discriminator.features(pair(x, x, mirrored)).double()
        f_fake = model.discriminator.features(pair(x, x_hat, mirrored)).double()
    r = (f_real - f_fake).abs().sum(dim=1).numpy()
    z = (r - mu) / sigma
    return r, z, -0.5 * z**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi), torch.cat([f_real, f_fake]).numpy()


@pytest.mark.parametrize("channels, mirrored", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_scores_equal_the_definition(channels: int, mirrored: bool, channels_last: bool) -> None:
    ckpt = tiny_checkpoint(channels, mirrored)
    x = torch.rand(7, channels, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scorer = Scorer(ckpt, "cpu", channels_last=channels_last)
    got = scorer.score_tensor(x, return_features=True)
    want = two_pass_scores(ckpt, x, 20.0, 5.0)
    np.testing.assert_allclose(got.r, want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.features, want[3], rtol=1e-4, atol=1e-4)
    assert scorer.score_tensor(x).features is None
    # z and log A: the calibration's, from the Scorer's R (one owner of the score math)
    d = Calibration.from_checkpoint(ckpt).decide(got.r)
    np.testing.assert_allclose(d.z, want[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d.log_a, want[2], rtol=1e-4, atol=1e-3)


def test_scores_hold_r_only() -> None:
    """The Scorer returns R (and features when asked); z and log A are not the Scorer's."""
    import dataclasses
    import inspect

    assert [f.name for f in dataclasses.fields(Scores)] == ["r", "features"]
    assert "mu" not in inspect.signature(Scorer.score_tensor).parameters
    scorer = Scorer(tiny_checkpoint(), "cpu")
    assert not hasattr(scorer, "mu") and not hasattr(scorer, "sigma")
    empty = scorer.score_tensor(torch.zeros(0, 3, 16, 16), return_features=True)
    assert empty.r.shape == (0,) and empty.features.shape == (0, 16)


def test_scorer_feeds_the_fused_tail_its_layout() -> None:
    scorer = Scorer(tiny_checkpoint(), "cpu")
    assert scorer.channels_last, "channels_last is the CPU default (measured faster, docs/benchmarks.md)"
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    h = scorer.feature_map(x)
    assert h.shape == (10, 16, 8, 8) and h.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.pair_rscore(h), ops.pair_rscore_reference(h))


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_autocast_precisions_stay_close(precision: str) -> None:
    ckpt = tiny_checkpoint()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    exact = Scorer(ckpt, "cpu").score_tensor(x)
    half = Scorer(ckpt, "cpu", precision=precision).score_tensor(x)
    assert np.isfinite(half.r).all()
    # half-precision activations: agreement to a few percent of the score's scale
    np.testing.assert_allclose(half.r, exact.r, rtol=0.05, atol=0.05 * float(np.abs(exact.r).mean()))


def test_float16_refused_for_a_critic_without_spectral_norm() -> None:
    """Without spectral norm nothing bounds the critic (trained presets reach activations of ~1e8):
    float16 would turn such R-scores into inf, so the Scorer refuses it; bfloat16 keeps float32's range."""
    ckpt = tiny_checkpoint(spectral_norm=False)
    with torch.no_grad():  # the scale such a critic reaches in training
        ckpt.state_dict.update({k: v * 1e3 for k, v in ckpt.state_dict.items() if k.startswith("discriminator.") and
                                k.endswith("weight") and v.ndim == 4})
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    exact = Scorer(ckpt, "cpu").score_tensor(x).r
    assert np.all(exact > 65504)  # beyond float16's largest number
    with pytest.raises(ValueError, match="float16 cannot score a model trained without spectral norm.*bfloat16"):
        Scorer(ckpt, "cpu", precision="float16")
    bf16 = Scorer(ckpt, "cpu", precision="bfloat16").score_tensor(x).r
    np.testing.assert_allclose(bf16, exact, rtol=0.1)


def test_bad_precision_rejected() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        Scorer(tiny_checkpoint(), "cpu", precision="int8")


@pytest.mark.slow
def test_compiled_scorer_matches_eager() -> None:
    ckpt = tiny_checkpoint()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    eager = Scorer(ckpt, "cpu").score_tensor(x)
    compiled = Scorer(ckpt, "cpu", compile_mode="default").score_tensor(x)
    np.testing.assert_allclose(compiled.r, eager.r, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision, channels_last", [("float32", False), ("bfloat16", True)])
def test_cuda_scorer_matches_cpu(precision: str, channels_last: bool) -> None:
    ckpt = tiny_checkpoint()
    x = torch.rand(9, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    cpu = Scorer(ckpt, "cpu").score_tensor(x)
    gpu = Scorer(ckpt, "cuda", precision=precision, channels_last=channels_last).score_tensor(x)
    tol = 1e-3 if precision == "float32" else 0.05  # TF32 convolutions / bfloat16 activations
    np.testing.assert_allclose(gpu.r, cpu.r, rtol=tol, atol=tol * float(np.abs(cpu.r).mean()))
