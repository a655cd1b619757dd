"""Shapes, switches and the R-score of the AMA networks."""
import math

import pytest
import torch

from ama_stream.model import AMA, Discriminator, Generator, ModelConfig, pair, stacked_pairs
from ama_stream.ops import pair_rscore_reference


def small(**kw) -> ModelConfig:
    base = dict(image_size=32, channels=1, nz=16, enc_width=8, gen_width=16, disc_width=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_for_sizes_and_channels(size, channels):
    cfg = small(image_size=size, channels=channels)
    model = AMA(cfg).eval()
    x = torch.rand(4, channels, size, size) * 2 - 1
    with torch.no_grad():
        code = model.encoder(x)
        x_hat = model.generator(code)
        h = model.discriminator.feature_map(stacked_pairs(x, x_hat, True))
        logits = model.discriminator(pair(x, x_hat, True))
    assert code.shape == (4, cfg.nz)
    assert x_hat.shape == x.shape
    assert x_hat.abs().max() <= 1.0  # tanh output
    assert h.shape == (8, cfg.disc_width, 8, 8)  # critic always ends at 8x8
    assert logits.shape == (4,)


def test_mirrored_switch_changes_critic_input_channels():
    mirrored = Discriminator(small(mirrored=True))
    single = Discriminator(small(mirrored=False))
    assert mirrored.blocks[0].conv1.in_channels == 2
    assert single.blocks[0].conv1.in_channels == 1
    x, y = torch.zeros(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    assert pair(x, y, mirrored=False) is y
    assert pair(x, y, mirrored=True).shape == (2, 2, 32, 32)


def test_spectral_norm_switch():
    with_sn = Discriminator(small(spectral_norm=True))
    without = Discriminator(small(spectral_norm=False))
    assert any("parametrizations" in k for k in with_sn.state_dict())
    assert not any("parametrizations" in k for k in without.state_dict())


def test_spectral_norm_bounds_layer_gain():
    d = Discriminator(small(spectral_norm=True)).train()
    x = torch.randn(8, 16)
    for _ in range(30):  # power iterations converge
        d.linear(x)
    w = d.linear.weight
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, rel=1e-3)


def test_rscore_equals_two_pass_computation():
    """One critic pass over the stacked 2B batch equals scoring (x, x) and (x, x_hat) separately."""
    torch.manual_seed(0)
    cfg = small()
    model = AMA(cfg).eval()
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        x_hat = model.reconstruct(x)
        h = model.discriminator.feature_map(stacked_pairs(x, x_hat, True))
        r = pair_rscore_reference(h)
        f_real = model.discriminator.features(pair(x, x, True))
        f_fake = model.discriminator.features(pair(x, x_hat, True))
    explicit = (f_real - f_fake).abs().sum(dim=1)
    torch.testing.assert_close(r, explicit, rtol=1e-5, atol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        ModelConfig(image_size=48)
    with pytest.raises(ValueError, match="channels"):
        ModelConfig(channels=2)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"image_size": 32, "depth": 3})


def test_generator_blocks_follow_the_authors_sngan():
    """Defect 4: the authors' generator blocks have a learned 1x1 shortcut conv and xavier init."""
    g = Generator(small())
    blocks = list(g.blocks)
    assert blocks and all(isinstance(b.shortcut, torch.nn.Conv2d) and b.shortcut.kernel_size == (1, 1) for b in blocks)
    conv = blocks[0].conv1  # xavier-uniform with gain sqrt(2): |w| <= sqrt(2) sqrt(6 / (fan_in + fan_out))
    fan = conv.in_channels * 9 + conv.out_channels * 9
    bound = math.sqrt(2) * math.sqrt(6 / fan)
    assert conv.weight.abs().max() <= bound + 1e-6 and conv.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(conv.bias) == 0
    plain = Generator(small(gen_shortcut="identity", init="default"))
    assert all(b.shortcut is None for b in plain.blocks)
    assert plain.blocks[0].conv1.weight.abs().max() <= 1 / math.sqrt(conv.in_channels * 9) + 1e-6  # PyTorch's init
    x = torch.randn(3, small().nz)
    assert g(x).shape == plain(x).shape


def test_xavier_init_reaches_the_spectrally_normed_critic():
    d = Discriminator(small())
    w = d.blocks[1].conv1.parametrizations.weight.original
    bound = math.sqrt(2) * math.sqrt(6 / (w.shape[1] * 9 + w.shape[0] * 9))
    assert w.abs().max() <= bound + 1e-6 and w.abs().max() > 0.9 * bound


def test_checkpoints_from_before_the_new_keys_rebuild_the_old_networks():
    old = {k: v for k, v in small().to_dict().items() if k not in ("gen_shortcut", "init")}
    cfg = ModelConfig.from_dict(old)
    assert cfg.gen_shortcut == "identity" and cfg.init == "default"
    with pytest.raises(ValueError, match="gen_shortcut"):
        ModelConfig(gen_shortcut="dense")
