"""Baselines that AMA must beat, trained and scored on exactly the same images (benchmarks/quality.py).

- pca: reconstruction error of a scikit-learn PCA fitted on the normal training images. k is chosen
  from PCA_KS WITHOUT anomalies: the smallest k whose held-out normal images keep >= 90% of their
  variance (the usual rule of thumb), else the largest; the AUROC of every k is reported too.
- autoencoder: the same E and G as the AMA model, no critic, trained on the L2 reconstruction loss
  with the same optimiser settings, batch and step budget; the score is the per-image L2 error.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import average_precision_score, roc_auc_score

from ama_stream.model import AMA
from ama_stream.preprocess import to_tensor

from .config import TrainConfig

log = logging.getLogger(__name__)

PCA_KS = (16, 32, 64)
PCA_KEEP_VARIANCE = 0.9
PCA_MAX_FIT = 20000  # training images the PCA is fitted on (seeded subsample)


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _ranking(score: np.ndarray, labels: np.ndarray) -> dict:
    return {"auroc": float(roc_auc_score(labels, score)), "aupr": float(average_precision_score(labels, score))}


def pca_baseline(train: np.ndarray, test: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """{"auroc", "aupr", "k", "auroc_by_k"} of the PCA reconstruction error on the test images."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    n_holdout = max(1, len(train) // 10)
    holdout, fit = _flat(train[order[:n_holdout]]), _flat(train[order[n_holdout:][:PCA_MAX_FIT]])
    x_test = _flat(test)
    ks = [k for k in PCA_KS if k < min(fit.shape)]
    chosen, by_k, errors = None, {}, {}
    for k in ks:
        pca = PCA(n_components=k, random_state=seed).fit(fit)
        residual = holdout - pca.inverse_transform(pca.transform(holdout))
        kept = 1.0 - float((residual ** 2).sum() / max(((holdout - pca.mean_) ** 2).sum(), 1e-12))
        err = ((x_test - pca.inverse_transform(pca.transform(x_test))) ** 2).sum(axis=1)
        by_k[k], errors[k] = _ranking(err, labels)["auroc"], err
        if chosen is None and kept >= PCA_KEEP_VARIANCE:
            chosen = k
        log.info("pca k=%d: held-out normal variance kept %.3f, test AUROC %.4f", k, kept, by_k[k])
    chosen = chosen or ks[-1]
    return {**_ranking(errors[chosen], labels), "k": chosen, "auroc_by_k": by_k}


def autoencoder_baseline(cfg: TrainConfig, train: np.ndarray, test: np.ndarray, labels: np.ndarray,
                         steps: int) -> dict:
    """{"auroc", "aupr", "steps", "wall_s"} of a plain E+G autoencoder's L2 error."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)
    model = AMA(cfg.model_config_for_data())
    e, g = model.encoder, model.generator
    o = cfg.optim
    opt = torch.optim.Adam([{"params": e.parameters(), "betas": o.betas_e}, {"params": g.parameters(), "betas": o.betas_g}],
                           lr=o.lr)
    batch = cfg.train.batch_size
    t0 = time.monotonic()
    e.train(), g.train()
    for step in range(steps):
        idx = np.sort(rng.choice(len(train), batch, replace=False))
        x = to_tensor(train[idx])
        loss = ((g(e(x)) - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(cfg.train.log_every, 1) == 0:
            log.info("autoencoder step %d/%d l2=%.4g", step + 1, steps, float(loss.detach()))
    e.eval(), g.eval()
    errors = []
    with torch.inference_mode():
        for i in range(0, len(test), 256):
            x = to_tensor(test[i : i + 256])
            errors.append(((g(e(x)) - x) ** 2).flatten(1).sum(dim=1).numpy())
    return {**_ranking(np.concatenate(errors), labels), "steps": steps, "wall_s": round(time.monotonic() - t0, 1)}


# --- the same baselines for a patch model: fitted on random crops, scoring each tile, maps per pixel ---


class PatchPCA:
    """PCA reconstruction error of image patches: a tile's score is its summed squared error, its map
    the per-pixel squared error (summed over channels)."""

    def __init__(self, k: int = 32, seed: int = 0):
        self.k, self.seed = k, seed

    def fit(self, crops: np.ndarray) -> "PatchPCA":
        self.pca = PCA(n_components=min(self.k, *_flat(crops).shape), random_state=self.seed).fit(_flat(crops))
        return self

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = _flat(tiles)
        residual = (x - self.pca.inverse_transform(self.pca.transform(x))) ** 2
        maps = residual.reshape(tiles.shape).sum(axis=3)
        return residual.sum(axis=1), maps


class PatchAutoencoder:
    """The AMA model's E and G without the critic, trained on the L2 error of random crops with the
    same optimiser, batch and step budget; scores and maps as PatchPCA."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def fit(self, crops, steps: int) -> "PatchAutoencoder":
        """`crops`: indexable like training.patches.RandomCrops (crops[idx] -> uint8 [n, P, P, C])."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed + 2)
        model = AMA(cfg.model_config_for_data())
        self.e, self.g = model.encoder, model.generator
        o = cfg.optim
        opt = torch.optim.Adam([{"params": self.e.parameters(), "betas": o.betas_e},
                                {"params": self.g.parameters(), "betas": o.betas_g}], lr=o.lr)
        self.e.train(), self.g.train()
        for step in range(steps):
            x = to_tensor(crops[np.sort(rng.choice(len(crops), cfg.train.batch_size, replace=False))])
            loss = ((self.g(self.e(x)) - x) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % max(cfg.train.log_every, 1) == 0:
                log.info("patch autoencoder step %d/%d l2=%.4g", step + 1, steps, float(loss.detach()))
        self.e.eval(), self.g.eval()
        return self

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for i in range(0, len(tiles), 512):
            x = to_tensor(tiles[i:i + 512])
            err = ((self.g(self.e(x)) - x) ** 2).sum(dim=1)  # [n, P, P]
            scores.append(err.flatten(1).sum(dim=1).numpy())
            maps.append(err.numpy())
        return np.concatenate(scores), np.concatenate(maps)


def inspect_with(tile_scorer, batch, spec, fit_batch=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """A baseline's image scores (mean of the top_k tile scores, as the Scorer) and maps at each image's
    own size (tiles' per-pixel maps stitched as the Scorer stitches the critic's). With `fit_batch`
    (good training images of one working size) scores and maps are z-scores per position, as the
    Scorer's with per-position statistics."""
    from ama_stream.tiling import image_scores, stitch, to_native

    def raw(b):
        tile_scores, tile_maps = tile_scorer(b.tiles)
        return tile_scores, [stitch(torch.from_numpy(m), g) for m, g in zip(b.split(tile_maps), b.grids)]

    tile_scores, canvases = raw(batch)
    if fit_batch is not None:
        fit_scores, fit_maps = raw(fit_batch)
        r = np.stack([part for part in fit_batch.split(fit_scores)])
        m = torch.stack(fit_maps)
        r_mean, r_std = r.mean(0), np.maximum(r.std(0), 1e-3 * max(float(np.median(r.std(0))), 1e-12))
        m_mean, m_std = m.mean(0), m.std(0, unbiased=False).clamp_min(1e-3 * max(float(m.std(0).median()), 1e-12))
        tile_scores = np.concatenate([(part - r_mean) / r_std for part in batch.split(tile_scores)])
        canvases = [(c - m_mean) / m_std for c in canvases]
    maps = [to_native(c, g, spec) for c, g in zip(canvases, batch.grids)]
    return image_scores(tile_scores, batch, spec.top_k), maps
