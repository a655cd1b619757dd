"""The AMA objective (paper eq. 1-4), as small pieces with their weights set once.

One game value V, which the critic D maximises and the encoder/generator (E, G) minimise:

    V =   E[D(x, x)] - E[D(x, x_hat)]                         mirrored Wasserstein (eq. 1), x_hat = G(E(x))
        + l_inter (E[D(x, x)] - E_k E[D(x_k, G(sum_i w_i E(x_i)))])   simplex interpolation
        - l_neg  (E[D(x_n, x_n)] - E[D(x_n, G(E(x_n)))])     atypical negatives x_n = G(z_neg) (eq. 2)

The negative term enters with a minus sign: E and G are pushed to reconstruct negatives badly.
As in the authors' code, where negatives are samples of the batch labelled -l_neg, each negative
weighs l_neg times a normal sample: the term's weight is l_neg * n_neg / B, not l_neg.
E/G also pay l_reg * E||E(x)||_2 (normal samples only); the critic pays the gradient penalty (on every
k-th critic step when lazy).
All critic evaluations of a step go through ONE forward pass over the concatenated pairs; the E/G
forward that builds them is one method used by both steps.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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
                     generator: torch.Generator | None = None, one_sided: bool = False) -> torch.Tensor:
    """WGAN-GP: E[(||grad D(u)||_2 - 1)^2] on u between (x, x) and (x, x_hat), per-sample norm;
    one-sided: E[max(0, ||grad D(u)||_2 - 1)^2]."""
    eps = torch.rand(real_pairs.shape[0], 1, 1, 1, generator=generator, device="cpu").to(real_pairs)
    u = (eps * real_pairs + (1 - eps) * fake_pairs).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(u).sum(), u, create_graph=True)
    excess = grad.flatten(1).norm(dim=1) - 1.0
    return (excess.clamp_min(0) if one_sided else excess).square().mean()


def _training_batchnorms(modules) -> list[_BatchNorm]:
    return [m for mod in modules for m in mod.modules()
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]


@contextmanager
def running_batchnorm(*modules: nn.Module):
    """BatchNorm layers of `modules` normalise with their running statistics and leave them unchanged
    (eval-mode BN, gradients still flow). Auxiliary passes -- decoding negatives, reconstructing them,
    decoding interpolants -- run like this, so only normal reconstructions set the statistics that
    scoring uses (the authors decode negatives with G in eval mode)."""
    layers = _training_batchnorms(modules)
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


@contextmanager
def own_batchnorm(*modules: nn.Module):
    """BatchNorm layers of `modules` normalise with the pass's own batch statistics (train mode) and
    neither read nor update their running statistics (track_running_stats off for the pass, so no
    buffer an earlier pass saved for backward is touched): the auxiliary part gets per-part
    statistics, and still only normal reconstructions set what scoring uses."""
    layers = _training_batchnorms(modules)
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@dataclass
class StepImages:
    """Everything the critic scores in one step, from one forward through E and G."""

    codes: torch.Tensor  # E(x) [B, nz]
    x_hat: torch.Tensor  # G(E(x))
    x_neg: torch.Tensor | None = None  # G(z_neg): fixed inputs, no gradient
    x_neg_hat: torch.Tensor | None = None  # G(E(x_neg))
    inter: torch.Tensor | None = None  # G(sum_i w_i E(x_i))
    perms: torch.Tensor | None = None  # the images each interpolant is paired with


class AMAObjective:
    """Builds the pairs of a step, scores them in one critic pass, returns the losses to minimise."""

    def __init__(self, cfg: LossSection, mirrored: bool):
        self.cfg = cfg
        self.mirrored = mirrored
        self.w_inter = cfg.interpolation.weight if cfg.interpolation.enabled else 0.0
        self.aux_bn = cfg.aux_bn
        # the lazy gradient penalty's clock: counts critic_loss calls; the trainer sets it from its step
        # counter before each critic step, so a resumed run keeps the schedule
        self.critic_step = 0
        self._last_gp = 0.0  # set on the first critic step, before it is first logged

    def _aux(self, *modules: nn.Module):
        """How BatchNorm behaves in an auxiliary pass of `modules` (LossSection.aux_bn)."""
        if self.aux_bn == "running":
            return running_batchnorm(*modules)
        return own_batchnorm(*modules) if self.aux_bn == "own" else nullcontext()

    def _w_neg(self, x: torch.Tensor, z_neg: torch.Tensor | None) -> float:
        return self.cfg.negatives.weight * z_neg.shape[0] / x.shape[0] if z_neg is not None else 0.0

    def forward(self, model: AMA, x: torch.Tensor, z_neg: torch.Tensor | None,
                generator: torch.Generator | None = None) -> StepImages:
        """`z_neg`: the step's negatives, latent codes [n, nz] (decoded by G) or images [n, C, S, S].
        E and G over the normal batch (train-mode BN) and the auxiliary passes (see `_aux`).
        With aux_bn "batch" (the old behaviour, kept to measure against) negatives are reconstructed in
        one joint pass with x and the decodes use, and move, their own batch statistics."""
        enc, gen = model.encoder, model.generator
        x_neg = None
        if z_neg is not None and z_neg.dim() == 4:  # pixel-space negatives (synthetic defects): images already
            x_neg = z_neg
        elif z_neg is not None:
            with torch.no_grad(), self._aux(gen):
                x_neg = gen(z_neg)  # a fixed input image: E/G must not reconstruct it
        if x_neg is not None and self.aux_bn == "batch":
            codes_all = enc(torch.cat([x, x_neg]))
            recon_all = gen(codes_all)
            b = x.shape[0]
            out = StepImages(codes_all[:b], recon_all[:b], x_neg, recon_all[b:])
        else:
            codes = enc(x)
            out = StepImages(codes, gen(codes), x_neg)
            if x_neg is not None:
                with self._aux(enc, gen):
                    out.x_neg_hat = gen(enc(x_neg))
        icfg = self.cfg.interpolation
        if icfg.enabled:
            mixed, perms = simplex_mix(out.codes, icfg.k, icfg.alpha_max, generator)
            with self._aux(gen):
                out.inter = gen(mixed)
            out.perms = perms if icfg.pair_with == "all" else perms[:1]
        return out

    def _score(self, model: AMA, x: torch.Tensor, im: StepImages, with_real: bool) -> PairScores:
        m = self.mirrored
        chunks: list[torch.Tensor] = [pair(x, im.x_hat, m)]
        if with_real:
            chunks.append(pair(x, x, m))
        if im.inter is not None:
            chunks += [pair(x[p], im.inter, m) for p in im.perms]  # perms[0] is the identity
        if im.x_neg is not None:
            chunks.append(pair(im.x_neg, im.x_neg_hat, m))
            if with_real:
                chunks.append(pair(im.x_neg, im.x_neg, m))
        out = model.discriminator(torch.cat(chunks, dim=0))
        parts = list(torch.split(out, [c.shape[0] for c in chunks]))
        scores = PairScores(recon=parts.pop(0))
        if with_real:
            scores.real = parts.pop(0)
        if im.inter is not None:
            scores.inter = torch.stack([parts.pop(0) for _ in range(len(im.perms))])
        if im.x_neg is not None:
            scores.neg_recon = parts.pop(0)
            if with_real:
                scores.neg_real = parts.pop(0)
        return scores

    def critic_loss(self, model: AMA, x: torch.Tensor, z_neg: torch.Tensor | None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """-V (+ gradient penalty); E and G are held fixed (no graph through them)."""
        with torch.no_grad():
            im = self.forward(model, x, z_neg, generator)
        scores = self._score(model, x, im, with_real=True)
        loss = -game_value(scores, self.w_inter, self._w_neg(x, z_neg))
        logs = {"wasserstein": float((scores.real.mean() - scores.recon.mean()).detach())}
        gp_cfg = self.cfg.gradient_penalty
        due = self.critic_step % gp_cfg.every == 0  # the first step, then every k-th
        self.critic_step += 1
        if gp_cfg.enabled and gp_cfg.weight > 0 and due:
            xs, x_hats = x, im.x_hat
            if gp_cfg.samples is not None and gp_cfg.samples < x.shape[0]:
                idx = torch.randperm(x.shape[0], generator=generator)[: gp_cfg.samples].to(x.device)
                xs, x_hats = x[idx], x_hats[idx]
            gp = gradient_penalty(model.discriminator, pair(xs, xs, self.mirrored), pair(xs, x_hats, self.mirrored),
                                  generator, one_sided=gp_cfg.one_sided)
            loss = loss + gp_cfg.weight * gp_cfg.every * gp
            self._last_gp = float(gp.detach())
        if gp_cfg.enabled and gp_cfg.weight > 0:
            logs["gp"] = self._last_gp  # lazy: the latest estimate, so every logged row has the column
        logs["loss_d"] = float(loss.detach())
        return loss, logs

    def autoencoder_loss(self, model: AMA, x: torch.Tensor, z_neg: torch.Tensor | None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """V restricted to the terms that depend on E and G, plus the latent regulariser."""
        im = self.forward(model, x, z_neg, generator)
        scores = self._score(model, x, im, with_real=False)
        loss = game_value(scores, self.w_inter, self._w_neg(x, z_neg))
        logs = {"d_recon": float(scores.recon.mean().detach())}
        if self.cfg.latent_reg > 0:
            reg = im.codes.norm(dim=1).mean()
            loss = loss + self.cfg.latent_reg * reg
            logs["latent_norm"] = float(reg.detach())
        logs["loss_g"] = float(loss.detach())
        return loss, logs
