"""The AMA networks as plain nn.Modules: Encoder E, Generator G, Discriminator D.

Architecture follows the paper (its SNGAN ResNets, resolved against the
authors' code). Image size is any power of two >= 16; each doubling beyond 32 adds one
down block to E and D and one up block to G. This module imports only torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


@dataclass(frozen=True)
class ModelConfig:
    """Constructor arguments of the three networks; stored in every checkpoint."""

    image_size: int = 32
    channels: int = 1
    nz: int = 128
    enc_width: int = 64  # E channels: w, 2w, 4w, ... (64/128/256 in the paper)
    gen_width: int = 256  # G channels in every ResBlock
    disc_width: int = 128  # D channels; also the size of the penultimate features f
    spectral_norm: bool = True  # on every D layer (1-Lipschitz critic)
    mirrored: bool = True  # D sees stacked pairs (2C channels); False = the ablation on single images
    gen_shortcut: str = "conv"  # G's up-block shortcut: "conv" (learned 1x1, the authors' SNGAN) or "identity"
    init: str = "xavier"  # "xavier" (the authors' SNGAN init of G and D) or "default" (PyTorch's)

    def __post_init__(self) -> None:
        if self.gen_shortcut not in ("conv", "identity"):
            raise ValueError(f"gen_shortcut must be 'conv' or 'identity', got {self.gen_shortcut!r}")
        if self.init not in ("xavier", "default"):
            raise ValueError(f"init must be 'xavier' or 'default', got {self.init!r}")
        if self.image_size < 16 or self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 16, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("nz", "enc_width", "gen_width", "disc_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def levels(self) -> int:
        """Number of 2x resolution steps between 4x4 and the image size."""
        return int(math.log2(self.image_size)) - 2

    @property
    def disc_in_channels(self) -> int:
        return 2 * self.channels if self.mirrored else self.channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        # checkpoints written before a key existed were built the old way
        return cls(**{**LEGACY_MODEL_KEYS, **data})


# Values of keys added after the first checkpoint format, as the networks were built before them.
LEGACY_MODEL_KEYS = {"gen_shortcut": "identity", "init": "default"}


def _xavier(module: nn.Module, gain: float, enabled: bool) -> nn.Module:
    """The authors' SNGAN init (xavier-uniform weights, zero bias); applied before spectral norm wraps it."""
    if enabled:
        nn.init.xavier_uniform_(module.weight, gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return module


class Encoder(nn.Module):
    """x [B, C, S, S] -> code [B, nz]. Strided 4x4 convs with BN + LeakyReLU, no output activation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.channels
        for i in range(cfg.levels):  # S -> 4
            c_out = cfg.enc_width * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, cfg.nz, 4, stride=1, padding=0, bias=False))  # 4x4 -> 1x1
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class _UpBlock(nn.Module):
    """SNGAN generator ResBlock: BN-ReLU-up-conv3-BN-ReLU-conv3; shortcut: upsample, then a learned
    1x1 conv (the authors' code) or nothing."""

    def __init__(self, ch: int, shortcut_conv: bool, xavier: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv1 = _xavier(nn.Conv2d(ch, ch, 3, padding=1), math.sqrt(2), xavier)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv2 = _xavier(nn.Conv2d(ch, ch, 3, padding=1), math.sqrt(2), xavier)
        self.shortcut = _xavier(nn.Conv2d(ch, ch, 1), 1.0, xavier) if shortcut_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        s = F.interpolate(x, scale_factor=2)
        return h + (self.shortcut(s) if self.shortcut is not None else s)


class Generator(nn.Module):
    """code [B, nz] -> image [B, C, S, S] in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.width = cfg.gen_width
        xavier = cfg.init == "xavier"
        self.dense = _xavier(nn.Linear(cfg.nz, 4 * 4 * cfg.gen_width), 1.0, xavier)
        self.blocks = nn.Sequential(
            *[_UpBlock(cfg.gen_width, cfg.gen_shortcut == "conv", xavier) for _ in range(cfg.levels)]
        )
        self.out = nn.Sequential(
            nn.BatchNorm2d(cfg.gen_width),
            nn.ReLU(),
            _xavier(nn.Conv2d(cfg.gen_width, cfg.channels, 3, padding=1), 1.0, xavier),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dense(z).view(z.shape[0], self.width, 4, 4)
        return self.out(self.blocks(h))


class _DownBlock(nn.Module):
    """SNGAN discriminator ResBlock. `first` is the optimized block (no leading ReLU, pool then 1x1 shortcut)."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, first: bool, sn, xavier: bool):
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = sn(_xavier(nn.Conv2d(c_in, c_out, 3, padding=1), math.sqrt(2), xavier))
        self.conv2 = sn(_xavier(nn.Conv2d(c_out, c_out, 3, padding=1), math.sqrt(2), xavier))
        needs_proj = c_in != c_out or downsample
        self.shortcut = sn(_xavier(nn.Conv2d(c_in, c_out, 1), 1.0, xavier)) if needs_proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        s = x
        if self.first:  # optimized block: pool before the projection (cheaper, as in SNGAN)
            s = F.avg_pool2d(s, 2) if self.downsample else s
            s = self.shortcut(s) if self.shortcut is not None else s
        else:
            s = self.shortcut(s) if self.shortcut is not None else s
            s = F.avg_pool2d(s, 2) if self.downsample else s
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + s


class Discriminator(nn.Module):
    """Critic on stacked pairs [B, 2C, S, S] (or single images when not mirrored).

    `feature_map` returns the last block's activation h [B, W, 8, 8] (before the final ReLU);
    `pool` turns it into the penultimate features f = sum_hw ReLU(h) [B, W]; `head` is the
    bias-free linear critic output. forward = head(pool(feature_map(x))).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sn = _spectral_norm if cfg.spectral_norm else (lambda m: m)
        w, xavier = cfg.disc_width, cfg.init == "xavier"
        n_down = max(cfg.levels - 2, 0)  # total downsamples = S / 8, the first block does one
        blocks = [_DownBlock(cfg.disc_in_channels, w, downsample=True, first=True, sn=sn, xavier=xavier)]
        blocks += [_DownBlock(w, w, downsample=True, first=False, sn=sn, xavier=xavier) for _ in range(n_down)]
        blocks += [_DownBlock(w, w, downsample=False, first=False, sn=sn, xavier=xavier) for _ in range(2)]
        self.blocks = nn.Sequential(*blocks)
        self.linear = sn(_xavier(nn.Linear(w, 1, bias=False), 1.0, xavier))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    @staticmethod
    def pool(h: torch.Tensor) -> torch.Tensor:
        return F.relu(h).sum(dim=(2, 3))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f).squeeze(-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def pair(x: torch.Tensor, y: torch.Tensor, mirrored: bool) -> torch.Tensor:
    """The critic's input for the pair (x, y): stacked on channels, or y alone in the ablation."""
    return torch.cat([x, y], dim=1) if mirrored else y


def stacked_pairs(x: torch.Tensor, x_hat: torch.Tensor, mirrored: bool) -> torch.Tensor:
    """[2B, ...]: first B rows are (x, x), last B rows (x, x_hat); one critic pass scores both."""
    return torch.cat([pair(x, x, mirrored), pair(x, x_hat, mirrored)], dim=0)


class AMA(nn.Module):
    """The three networks together, so one state_dict / .to() / .eval() covers them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(self.encoder(x))

    def critic_map(self, x: torch.Tensor) -> torch.Tensor:
        """The scoring forward, the one place it is written (Scorer, export graph, evaluation): the
        critic's activation h [2B, W, h, w] for the stacked pairs (x, x) and (x, G(E(x))). R and the
        anomaly map are reductions of it (ama_stream.ops.pair_rscore / pair_rscore_map)."""
        return self.discriminator.feature_map(stacked_pairs(x, self.reconstruct(x), self.cfg.mirrored))


def bake_spectral_norm(module: nn.Module) -> None:
    """Replace spectral-norm parametrizations by their current (eval) value: same outputs, less work
    (for inference: the Scorer and the exported graph)."""
    from torch.nn.utils import parametrize

    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
