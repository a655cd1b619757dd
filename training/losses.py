"""The AMA objective (paper eq. 1-4), as small pieces with their weights set once.

One game value V, which the critic D maximises and the encoder/generator (E, G) minimise:

    V =   E[D(x, x)] - E[D(x, x_hat)]                         mirrored Wasserstein (eq. 1), x_hat = G(E(x))
        + l_inter (E[D(x, x)] - E_k E[D(x_k, G(sum_i w_i E(x_i)))])   simplex interpolation
        - l_neg  (E[D(x_n, x_n)] - E[D(x_n, G(E(x_n)))])     atypical negatives x_n = G(z_neg) (eq. 2)

The negative term enters with a minus sign: E and G are pushed to reconstruct negatives badly.
As in the authors' code, where negatives are samples of the batch labelled -l_neg, each negative
weighs l_neg times a normal sample: the term's weight is l_neg * n_neg / B, not l_neg.
E/G also pay l_reg * E||E(x)||_2 (normal samples only); the critic pays the gradient penalty.
All critic evaluations of a step go through ONE forward pass over the concatenated pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ama_stream.model import AMA, pair

from .config import LossSection


@dataclass
class PairScores:
    """Critic outputs for the pairs of one step; None where a term is off or not needed."""

    recon: torch.Tensor  # D(x, x_hat)           [B]
    real: torch.Tensor | None = None  # D(x, x)  [B] (constant for E/G, skipped in their step)
    inter: torch.Tensor | None = None  # D(x_k, x_int)  [k, B]
    neg_recon: torch.Tensor | None = None  # D(x_n, G(E(x_n)))  [n]
    neg_real: torch.Tensor | None = None  # D(x_n, x_n)  [n]


def game_value(s: PairScores, w_inter: float, w_neg: float) -> torch.Tensor:
    """V for the terms present; absent terms (None) contribute nothing."""
    real = s.real.mean() if s.real is not None else 0.0
    v = real - s.recon.mean()
    if s.inter is not None:
        v = v + w_inter * (real - s.inter.mean())
    if s.neg_recon is not None:
        neg_real = s.neg_real.mean() if s.neg_real is not None else 0.0
        v = v - w_neg * (neg_real - s.neg_recon.mean())
    return v


def simplex_weights(batch: int, k: int, alpha_max: float, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, k] convex weights alpha_i / sum(alpha) with alpha_i ~ U(0, alpha_max)."""
    alpha = torch.rand(batch, k, generator=generator, device=device) * alpha_max
    alpha = alpha.clamp_min(torch.finfo(alpha.dtype).tiny)  # a zero row would divide by zero
    return alpha / alpha.sum(dim=1, keepdim=True)


def simplex_mix(codes: torch.Tensor, k: int, alpha_max: float, generator: torch.Generator | None = None):
    """Mix each code with k-1 others of the batch; returns (mixed [B, nz], perms [k, B]).

    perms[0] is the identity, so the interpolant is always paired with its own image x.
    Gradients flow into `codes` (the authors' code detached here; we treat that as a bug).
    """
    b = codes.shape[0]
    perms = [torch.arange(b, device=codes.device)]
    perms += [torch.randperm(b, generator=generator, device="cpu").to(codes.device) for _ in range(k - 1)]
    perms = torch.stack(perms)
    w = simplex_weights(b, k, alpha_max, generator, device="cpu").to(codes.device, codes.dtype)
    mixed = torch.einsum("bk,kbn->bn", w, codes[perms])
    return mixed, perms


def gradient_penalty(critic, real_pairs: torch.Tensor, fake_pairs: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: E[(||grad D(u)||_2 - 1)^2] on u between (x, x) and (x, x_hat), per-sample norm."""
    eps = torch.rand(real_pairs.shape[0], 1, 1, 1, generator=generator, device="cpu").to(real_pairs)
    u = (eps * real_pairs + (1 - eps) * fake_pairs).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(u).sum(), u, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def reconstruct_joint(model: AMA, x: torch.Tensor, x_neg: torch.Tensor | None):
    """(codes of x, x_hat, x_neg_hat): one E and one G pass over normal + negative images,
    so BatchNorm sees the same joint batch in the critic and the E/G steps."""
    both = x if x_neg is None else torch.cat([x, x_neg])
    codes_all = model.encoder(both)
    recon_all = model.generator(codes_all)
    b = x.shape[0]
    return codes_all[:b], recon_all[:b], (recon_all[b:] if x_neg is not None else None)


class AMAObjective:
    """Builds the pairs of a step, scores them in one critic pass, returns the losses to minimise."""

    def __init__(self, cfg: LossSection, mirrored: bool):
        self.cfg = cfg
        self.mirrored = mirrored
        self.w_inter = cfg.interpolation.weight if cfg.interpolation.enabled else 0.0

    def _w_neg(self, x: torch.Tensor, z_neg: torch.Tensor | None) -> float:
        return self.cfg.negatives.weight * z_neg.shape[0] / x.shape[0] if z_neg is not None else 0.0

    def _partners(self, perms: torch.Tensor) -> torch.Tensor:
        """The sources each interpolant is paired with: its own image, or all k sources."""
        return perms if self.cfg.interpolation.pair_with == "all" else perms[:1]

    def _score(self, model: AMA, x, x_hat, inter_images, perms, x_neg, x_neg_hat, with_real: bool) -> PairScores:
        m = self.mirrored
        chunks: list[torch.Tensor] = [pair(x, x_hat, m)]
        if with_real:
            chunks.append(pair(x, x, m))
        if inter_images is not None:
            chunks += [pair(x[p], inter_images, m) for p in perms]  # perms[0] is the identity
        if x_neg is not None:
            chunks.append(pair(x_neg, x_neg_hat, m))
            if with_real:
                chunks.append(pair(x_neg, x_neg, m))
        out = model.discriminator(torch.cat(chunks, dim=0))
        sizes = [c.shape[0] for c in chunks]
        parts = list(torch.split(out, sizes))
        scores = PairScores(recon=parts.pop(0))
        if with_real:
            scores.real = parts.pop(0)
        if inter_images is not None:
            scores.inter = torch.stack([parts.pop(0) for _ in range(len(perms))])
        if x_neg is not None:
            scores.neg_recon = parts.pop(0)
            if with_real:
                scores.neg_real = parts.pop(0)
        return scores

    def critic_loss(self, model: AMA, x: torch.Tensor, z_neg: torch.Tensor | None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """-V (+ gradient penalty); E and G are held fixed (no graph through them)."""
        icfg = self.cfg.interpolation
        with torch.no_grad():
            x_neg = model.generator(z_neg) if z_neg is not None else None
            codes, x_hat, x_neg_hat = reconstruct_joint(model, x, x_neg)
            inter_images, perms = None, None
            if icfg.enabled:
                mixed, perms = simplex_mix(codes, icfg.k, icfg.alpha_max, generator)
                inter_images = model.generator(mixed)
                perms = self._partners(perms)
        scores = self._score(model, x, x_hat, inter_images, perms, x_neg, x_neg_hat, with_real=True)
        value = game_value(scores, self.w_inter, self._w_neg(x, z_neg))
        loss = -value
        logs = {"wasserstein": float((scores.real.mean() - scores.recon.mean()).detach())}
        gp_cfg = self.cfg.gradient_penalty
        if gp_cfg.enabled and gp_cfg.weight > 0:
            gp = gradient_penalty(model.discriminator, pair(x, x, self.mirrored), pair(x, x_hat, self.mirrored), generator)
            loss = loss + gp_cfg.weight * gp
            logs["gp"] = float(gp.detach())
        logs["loss_d"] = float(loss.detach())
        return loss, logs

    def autoencoder_loss(self, model: AMA, x: torch.Tensor, z_neg: torch.Tensor | None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """V restricted to the terms that depend on E and G, plus the latent regulariser."""
        icfg = self.cfg.interpolation
        x_neg = None
        if z_neg is not None:
            with torch.no_grad():
                x_neg = model.generator(z_neg)  # a fixed input image: E/G must not reconstruct it
        codes, x_hat, x_neg_hat = reconstruct_joint(model, x, x_neg)
        inter_images, perms = None, None
        if icfg.enabled:
            mixed, perms = simplex_mix(codes, icfg.k, icfg.alpha_max, generator)
            inter_images = model.generator(mixed)
            perms = self._partners(perms)
        scores = self._score(model, x, x_hat, inter_images, perms, x_neg, x_neg_hat, with_real=False)
        loss = game_value(scores, self.w_inter, self._w_neg(x, z_neg))
        logs = {"d_recon": float(scores.recon.mean().detach())}
        if self.cfg.latent_reg > 0:
            reg = codes.norm(dim=1).mean()
            loss = loss + self.cfg.latent_reg * reg
            logs["latent_norm"] = float(reg.detach())
        logs["loss_g"] = float(loss.detach())
        return loss, logs
