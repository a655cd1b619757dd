"""The math of the AMA objective on small tensors: signs of eq. 1-4, penalty, interpolation, negatives."""
import math

import pytest
import torch

from ama_stream.model import AMA, ModelConfig
from training.config import LossSection, NegativesSection
from training.losses import AMAObjective, PairScores, game_value, gradient_penalty, simplex_mix, simplex_weights
from training.negatives import sample_negatives, shell_radii


def _scores(b=4, k=3, n=2, requires_grad=True):
    mk = lambda *shape: torch.randn(*shape, requires_grad=requires_grad)  # noqa: E731
    return PairScores(recon=mk(b), real=mk(b), inter=mk(k, b), neg_recon=mk(n), neg_real=mk(n))


def test_game_value_terms_and_signs():
    s = _scores()
    w_inter, w_neg = 0.5, 5.0
    v = game_value(s, w_inter, w_neg)
    expected = (s.real.mean() - s.recon.mean()) + w_inter * (s.real.mean() - s.inter.mean()) \
        - w_neg * (s.neg_real.mean() - s.neg_recon.mean())
    torch.testing.assert_close(v, expected)
    v.backward()
    b, k, n = 4, 3, 2
    # E/G minimise V: lowering V means raising D(x, x_hat) (normals reconstructed well) ...
    torch.testing.assert_close(s.recon.grad, torch.full((b,), -1.0 / b))
    torch.testing.assert_close(s.inter.grad, torch.full((k, b), -w_inter / (k * b)))
    # ... and LOWERING D(x_n, G(E(x_n))): negatives must not be reconstructed well (eq. 2's minus sign).
    torch.testing.assert_close(s.neg_recon.grad, torch.full((n,), w_neg / n))
    # The critic maximises V: identity pairs up, reconstruction pairs down.
    torch.testing.assert_close(s.real.grad, torch.full((b,), (1.0 + w_inter) / b))
    torch.testing.assert_close(s.neg_real.grad, torch.full((n,), -w_neg / n))


def test_game_value_without_optional_terms():
    recon = torch.tensor([1.0, 3.0])
    assert game_value(PairScores(recon=recon), 0.5, 5.0).item() == pytest.approx(-2.0)
    real = torch.tensor([4.0, 4.0])
    assert game_value(PairScores(recon=recon, real=real), 0.5, 5.0).item() == pytest.approx(2.0)


class _Linear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, u):
        return (u.flatten(1) * self.w.flatten()).sum(dim=1)


def test_gradient_penalty_of_a_linear_critic():
    """For D(u) = <w, u> the input gradient is w everywhere, so GP = (||w|| - 1)^2."""
    w = torch.randn(2, 4, 4)
    critic = _Linear(w)
    real, fake = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4)
    gp = gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx((w.norm().item() - 1.0) ** 2, rel=1e-5)
    critic_unit = _Linear(w / w.norm())
    assert gradient_penalty(critic_unit, real, fake).item() == pytest.approx(0.0, abs=1e-8)
    # one-sided: a gradient norm under 1 costs nothing, one over 1 costs as much as two-sided
    critic_flat = _Linear(0.5 * w / w.norm())  # gradient norm 0.5 everywhere
    assert gradient_penalty(critic_flat, real, fake).item() == pytest.approx(0.25, rel=1e-5)
    assert gradient_penalty(critic_flat, real, fake, one_sided=True).item() == 0.0
    assert w.norm() > 1 and gradient_penalty(critic, real, fake, one_sided=True).item() == pytest.approx(gp.item(), rel=1e-6)
    gp.backward()  # differentiable w.r.t. the critic's parameters (create_graph)
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


def test_simplex_weights_are_convex():
    g = torch.Generator().manual_seed(0)
    w = simplex_weights(1000, 3, 0.5, g)
    assert w.shape == (1000, 3)
    assert (w >= 0).all() and (w <= 1).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(1000))
    assert w.std() > 0.05  # not degenerate


def test_simplex_mix_is_a_convex_combination_with_gradients():
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(64, 8, requires_grad=True)
    mixed, perms = simplex_mix(codes, 3, 0.5, g)
    assert perms.shape == (3, 64)
    assert torch.equal(perms[0], torch.arange(64))  # paired with its own image
    for p in perms:
        assert torch.equal(p.sort().values, torch.arange(64))
    lo = torch.stack([codes[p] for p in perms]).min(dim=0).values
    hi = torch.stack([codes[p] for p in perms]).max(dim=0).values
    assert (mixed >= lo - 1e-6).all() and (mixed <= hi + 1e-6).all()
    mixed.sum().backward()
    assert codes.grad is not None and codes.grad.abs().sum() > 0  # gradients reach the encoder


@pytest.mark.parametrize("direction", ["inward", "outward"])
def test_shell_negatives_lie_in_the_shell(direction):
    cfg = NegativesSection(mode="shell", direction=direction, radius="typical", delta=0.5)
    r_in, r_out = shell_radii(cfg, 64, None)
    expected = (4.0, 8.0) if direction == "inward" else (8.0, 12.0)
    assert (r_in, r_out) == pytest.approx(expected)
    z = sample_negatives(cfg, 2000, 64, generator=torch.Generator().manual_seed(0))
    norms = z.norm(dim=1)
    assert z.shape == (2000, 64)
    assert norms.min() >= r_in - 1e-4 and norms.max() <= r_out + 1e-4


def test_empirical_radius_uses_the_median_code_norm():
    codes = torch.randn(101, 16) * 3
    cfg = NegativesSection(mode="shell", direction="outward", radius="empirical", delta=0.25)
    r_in, r_out = shell_radii(cfg, 16, codes)
    assert r_in == pytest.approx(float(codes.norm(dim=1).median()))
    assert r_out == pytest.approx(1.25 * r_in)
    with pytest.raises(ValueError, match="needs the batch's codes"):
        sample_negatives(cfg, 4, 16, codes=None)


def test_relative_and_cube_negatives():
    g = torch.Generator().manual_seed(2)
    codes = torch.randn(32, 8) + 5
    norms = codes.norm(dim=1)
    inward = sample_negatives(NegativesSection(mode="relative", direction="inward"), 500, 8, codes, g)
    outward = sample_negatives(NegativesSection(mode="relative", direction="outward"), 500, 8, codes, g)
    assert inward.norm(dim=1).max() <= 0.5 * norms.max() + 1e-5
    assert outward.norm(dim=1).min() >= 2.0 * norms.min() - 1e-5
    cube = sample_negatives(NegativesSection(mode="cube", delta=0.1), 500, 8, codes, g)
    lo, hi = codes.min(0).values, codes.max(0).values
    assert (cube >= lo - 0.1 * (hi - lo) - 1e-5).all() and (cube <= hi + 0.1 * (hi - lo) + 1e-5).all()


def _tiny_model(mirrored=True):
    torch.manual_seed(0)
    return AMA(ModelConfig(image_size=16, channels=1, nz=8, enc_width=4, gen_width=8, disc_width=8, mirrored=mirrored))


@pytest.mark.parametrize("mirrored", [True, False])
def test_objective_steps_route_gradients_to_the_right_networks(mirrored):
    model = _tiny_model(mirrored)
    objective = AMAObjective(LossSection(), mirrored=mirrored)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    z_neg = torch.randn(2, 8) * 3
    g = torch.Generator().manual_seed(0)

    loss_d, logs_d = objective.critic_loss(model, x, z_neg, g)
    loss_d.backward()
    assert math.isfinite(loss_d.item()) and "gp" in logs_d
    assert all(p.grad is None for p in model.encoder.parameters())  # E/G are held fixed for the critic
    assert all(p.grad is None for p in model.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())

    model.zero_grad(set_to_none=True)
    loss_g, logs_g = objective.autoencoder_loss(model, x, z_neg, g)
    loss_g.backward()
    assert logs_g["latent_norm"] > 0
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())


def test_switched_off_terms_leave_the_losses():
    cfg = LossSection(gradient_penalty={"enabled": False}, interpolation={"enabled": False}, latent_reg=0.0)
    model = _tiny_model().eval()  # eval: no power-iteration or BatchNorm drift between the passes compared
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    objective = AMAObjective(cfg, mirrored=True)
    loss_d, logs_d = objective.critic_loss(model, x, None)
    assert "gp" not in logs_d
    with torch.no_grad():
        x_hat = model.reconstruct(x)
        d_real = model.discriminator(torch.cat([x, x], 1)).mean()
        d_fake = model.discriminator(torch.cat([x, x_hat], 1)).mean()
    torch.testing.assert_close(loss_d.detach(), -(d_real - d_fake), rtol=1e-4, atol=1e-5)
    _, logs_g = objective.autoencoder_loss(model, x, None)
    assert "latent_norm" not in logs_g


def test_each_negative_weighs_lambda_normal_samples():
    """As in the authors' per-sample labels: the negative term's weight is l_neg * n_neg / B."""
    objective = AMAObjective(LossSection(negatives={"weight": 5.0}), mirrored=True)
    x = torch.zeros(20, 1, 16, 16)
    assert objective._w_neg(x, torch.zeros(2, 8)) == pytest.approx(0.5)
    assert objective._w_neg(x, None) == 0.0


def test_shell_negatives_spread_between_the_spheres_not_on_the_outer_one():
    """Defect 1: the old volume law put inward negatives at 0.965-1.0 x sqrt(d), on the normal codes.
    The paper's law (radial: uniform) draws the radius uniformly between sqrt(d)(1 - delta) and sqrt(d)."""
    d = 128
    cfg = NegativesSection(mode="shell", direction="inward", radius="typical", delta=0.5)
    radii = sample_negatives(cfg, 4000, d, generator=torch.Generator().manual_seed(0)).norm(dim=1) / math.sqrt(d)
    assert float(radii.median()) == pytest.approx(0.75, abs=0.02)
    assert float(torch.quantile(radii, 0.05)) < 0.55 and float(torch.quantile(radii, 0.95)) > 0.95
    volume = NegativesSection(mode="shell", direction="inward", radius="typical", delta=0.5, radial="volume")
    radii_v = sample_negatives(volume, 4000, d, generator=torch.Generator().manual_seed(0)).norm(dim=1) / math.sqrt(d)
    assert float(torch.quantile(radii_v, 0.01)) > 0.96  # the old law, kept as an option


def _batchnorm_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def test_auxiliary_passes_leave_batchnorm_statistics_to_the_normal_batch():
    """Defect 2: decoding negatives and interpolants in train mode moved G's running statistics to
    small atypical batches. Now only the normal reconstruction G(E(x)) updates them."""
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    z_neg = torch.randn(3, 8) * 5
    reference = _tiny_model()
    with torch.no_grad():
        reference.generator(reference.encoder(x))  # one train-mode pass over the normal batch alone
    expected = {**_batchnorm_buffers(reference.encoder), **_batchnorm_buffers(reference.generator)}
    for aux_bn in ("running", "own"):
        for step in ("critic_loss", "autoencoder_loss"):
            model = _tiny_model()
            objective = AMAObjective(LossSection(aux_bn=aux_bn), mirrored=True)
            getattr(objective, step)(model, x, z_neg, torch.Generator().manual_seed(1))
            got = {**_batchnorm_buffers(model.encoder), **_batchnorm_buffers(model.generator)}
            for k, v in expected.items():
                torch.testing.assert_close(got[k], v, msg=f"{aux_bn} {step}: {k}")
            assert model.generator.training and model.encoder.training  # the train mode is restored
    old = _tiny_model()  # the old behaviour, kept as aux_bn: batch, moves them (the test can tell)
    AMAObjective(LossSection(aux_bn="batch"), mirrored=True).critic_loss(old, x, z_neg, torch.Generator().manual_seed(1))
    moved = _batchnorm_buffers(old.generator)
    assert any(not torch.allclose(moved[k], expected[k]) for k in moved)


def test_own_statistics_normalise_an_auxiliary_pass_by_its_own_batch():
    """aux_bn "own": an interpolant decode is normalised by its own batch statistics (as in train mode),
    not by the running ones (as "running" does), and the running statistics stay as they were."""
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    images = {}
    for aux_bn in ("running", "own", "batch"):
        model = _tiny_model()
        cfg = LossSection(aux_bn=aux_bn, interpolation={"enabled": True, "k": 3, "alpha_max": 0.5})
        with torch.no_grad():
            images[aux_bn] = AMAObjective(cfg, mirrored=True).forward(model, x, None, torch.Generator().manual_seed(1))
    torch.testing.assert_close(images["own"].inter, images["batch"].inter)  # the same normalisation ...
    assert not torch.allclose(images["own"].inter, images["running"].inter)  # ... unlike eval-mode BN
    torch.testing.assert_close(images["own"].x_hat, images["running"].x_hat)  # the normal pass is the same


@pytest.mark.parametrize("aux_bn", ["running", "own", "batch"])
def test_auxiliary_passes_still_train_e_and_g(aux_bn):
    """BN in the interpolation and negative passes, however it is set, still lets their gradients
    reach E and G, and the whole step backpropagates (an auxiliary pass must not modify in place a
    buffer the normal pass saved for backward)."""
    cfg = LossSection(gradient_penalty={"enabled": False}, latent_reg=0.0, aux_bn=aux_bn)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    model = _tiny_model()
    im = AMAObjective(cfg, mirrored=True).forward(model, x, torch.randn(2, 8) * 3, torch.Generator().manual_seed(0))
    (im.inter.sum() + im.x_neg_hat.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    assert im.x_neg is not None and not im.x_neg.requires_grad  # negatives are fixed inputs
    for step in ("critic_loss", "autoencoder_loss"):
        loss, _ = getattr(AMAObjective(cfg, mirrored=True), step)(_tiny_model(), x, torch.randn(2, 8) * 3,
                                                                   torch.Generator().manual_seed(0))
        loss.backward()


def test_gradient_penalty_on_a_subset_of_the_batch():
    """gradient_penalty.samples estimates the penalty on that many interpolates (the CPU presets' cost)."""
    model = _tiny_model().eval()
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    seen = []
    original = gradient_penalty

    def spy(critic, real, fake, generator=None, one_sided=False):
        seen.append(real.shape[0])
        return original(critic, real, fake, generator, one_sided)

    import training.losses as losses_module
    losses_module.gradient_penalty, saved = spy, losses_module.gradient_penalty
    try:
        for samples, expected in ((3, 3), (None, 8), (100, 8)):
            cfg = LossSection(gradient_penalty={"samples": samples}, interpolation={"enabled": False})
            _, logs = AMAObjective(cfg, mirrored=True).critic_loss(model, x, None, torch.Generator().manual_seed(0))
            assert seen[-1] == expected and logs["gp"] >= 0
    finally:
        losses_module.gradient_penalty = saved


def test_lazy_gradient_penalty_runs_every_kth_critic_step_at_k_times_the_weight(monkeypatch):
    """gradient_penalty.every = k: the penalty on critic steps 1, k+1, 2k+1, ..., weighted k * lambda, so the
    mean pull matches the penalty on every step; between them the loss is the game value alone."""
    import training.losses as losses_module
    calls = []
    monkeypatch.setattr(losses_module, "gradient_penalty",
                        lambda critic, real, fake, generator=None, one_sided=False: calls.append(1) or torch.tensor(0.25))
    model = _tiny_model().eval()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    cfg = LossSection(gradient_penalty={"every": 3, "weight": 10.0}, interpolation={"enabled": False}, latent_reg=0.0)
    objective = AMAObjective(cfg, mirrored=True)
    with torch.no_grad():
        d_real = model.discriminator(torch.cat([x, x], 1)).mean()
        d_fake = model.discriminator(torch.cat([x, model.reconstruct(x)], 1)).mean()
    penalised = []
    for _ in range(7):
        loss, logs = objective.critic_loss(model, x, None)
        penalised.append(abs(loss.item() + (d_real - d_fake).item()) > 1.0)
        assert logs["gp"] == 0.25  # every row carries the latest estimate
    assert len(calls) == 3 and penalised == [True, False, False, True, False, False, True]
    torch.testing.assert_close(loss.detach(), -(d_real - d_fake) + 3 * 10.0 * 0.25, rtol=1e-4, atol=1e-4)

