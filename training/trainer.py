"""The AMA training loop: d_steps critic updates per E/G update, the paper's optimisers and
schedule, atypical negatives from `start_epoch`, seeded and resumable at epoch boundaries.

Outputs in OUT/: model.pt (the checkpoint the Scorer and the agent load), metrics.json, and
train_state.pt (weights + optimiser/scheduler/RNG state, rewritten every epoch) for --resume.
With a DistContext (torchrun), the same loop runs data-parallel: see training/distributed.py.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ama_stream import feature_gaussian, sensitivity
from ama_stream.calibration import Calibration
from ama_stream.checkpoint import Checkpoint, save_checkpoint
from ama_stream.fileio import atomic_write_bytes
from ama_stream.model import AMA, pair
from ama_stream.preprocess import to_tensor
from ama_stream.progress import progress
from ama_stream.scoring import Scorer, resolve_device
from ama_stream.sources import resolve_data_root

from . import distributed as ddp
from .config import TrainConfig
from .datasets import ProtocolData, build_protocol, holdout_record, resolve_image_shape
from .evaluate import detection_metrics, fit_gaussian, full_metrics, good_only_metrics
from .losses import AMAObjective
from .negatives import needs_codes, sample_negatives, synthetic_negatives
from .patches import RandomCrops

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "ama-stream/train-state"


@dataclass
class LoopState:
    epoch: int = 0  # next epoch to run (0-based)
    step: int = 0  # E/G steps done
    best_score: float = -math.inf
    best_epoch: int = -1


def _plain(obj):
    """Config dump as JSON-safe plain data (tuples -> lists)."""
    return json.loads(json.dumps(obj, default=str))


CRITIC_TERMS = ("wasserstein", "loss_d", "d_recon", "loss_g", "gp")  # logged values on the critic's scale
GUARD_REMEDY = ("model.spectral_norm: true (or loss.gradient_penalty.enabled: true, with every: 4 to keep its cost "
                "low) keeps the critic bounded; "
                "a lower optim.lr or fewer steps (train.max_steps) also help")


class TrainingStopped(RuntimeError):
    """The guard stopped training (a loss not finite, or the critic past train.max_critic)."""


def guard_verdict(logs: dict[str, float], max_critic: float | None) -> str | None:
    """Why a step's logged values must stop training, or None when they are fine."""
    bad = sorted(k for k, v in logs.items() if not math.isfinite(v))
    if bad:
        return f"{', '.join(bad)} not finite"
    if max_critic is not None:
        over = {k: v for k, v in logs.items() if k in CRITIC_TERMS and abs(v) > max_critic}
        if over:
            return ", ".join(f"{k}={v:.3g}" for k, v in over.items()) + f" past train.max_critic {max_critic:g}"
    return None


class _NoProgress:
    """The progress calls of ranks other than 0, which report nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    def __init__(self, cfg: TrainConfig, data: ProtocolData, out_dir: str | Path | None = None,
                 dist: ddp.DistContext | None = None):
        self.cfg = cfg
        self.data = data
        self.out_dir = Path(out_dir) if out_dir else None
        self.dist = dist  # None: one process, as always
        self.is_main = dist is None or dist.is_main
        self.world_size = dist.world_size if dist else 1
        self.local_batch = ddp.per_rank_batch(cfg.train.batch_size, self.world_size)
        self.device = dist.device if dist else resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        # interpolation weights, negatives, GP; each rank its own stream (rank 0's = the single-process one)
        self.gen = torch.Generator().manual_seed(ddp.rank_seed(cfg.seed + 1, dist.rank if dist else 0))
        self.rng = np.random.default_rng(cfg.seed + 2)  # data order
        self.model_cfg = cfg.model_config_for_data()
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = AMA(self.model_cfg).to(self.device, memory_format=self.memory_format)
        o = cfg.optim
        self.opt_e = torch.optim.Adam(self.model.encoder.parameters(), lr=o.lr, betas=o.betas_e)
        self.opt_g = torch.optim.Adam(self.model.generator.parameters(), lr=o.lr, betas=o.betas_g)
        self.opt_d = torch.optim.Adam(self.model.discriminator.parameters(), lr=o.lr, betas=o.betas_d)
        self.optimizers = {"e": self.opt_e, "g": self.opt_g, "d": self.opt_d}
        self.schedulers = {
            k: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=o.milestones, gamma=o.gamma)
            for k, opt in self.optimizers.items()
        }
        loss_cfg = cfg.loss
        if dist is not None and cfg.loss.gradient_penalty.samples is not None:  # a per-step count: split it
            gp = cfg.loss.gradient_penalty
            gp = gp.model_copy(update={"samples": ddp.split_samples(gp.samples, self.world_size)})
            loss_cfg = cfg.loss.model_copy(update={"gradient_penalty": gp})
        self.objective = AMAObjective(loss_cfg, cfg.model.mirrored)
        decay = cfg.train.ema_decay
        self.average = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay else None
        self._steps: dict[str, torch.nn.Module] | None = None  # the DDP-wrapped critic and E/G steps
        self._images = 0  # images this process trained on in this run (its shards)
        self._dist_record: dict | None = None  # metrics["distributed"]: processes, backend, images per process
        if dist is not None:  # after the average's copy, which keeps plain BatchNorm
            for net in (self.model.encoder, self.model.generator):
                ddp.convert_sync_batchnorm(net, self.device)
        self.state = LoopState()
        self.best_weights: dict | None = None
        self.stopped: dict | None = None  # the guard stopped training: why, and the step restored
        self._board = None  # TensorBoard writer, made on first use (False: tensorboard not installed)
        self.train_images = data.train  # whole images (a patch model's: at their working scale, any sizes)
        self.patched = cfg.data.preprocess_spec().patched
        # what a step draws its batch from: the images, or a patch model's random crops of them
        self.batches = RandomCrops(data.train, self.model_cfg.image_size, cfg.seed) if self.patched else data.train
        self.np_rng = np.random.default_rng([cfg.seed, 5])  # synthetic negatives
        if len(self.batches) < cfg.train.batch_size:
            raise ValueError(
                f"only {len(self.batches)} training images for batch size {cfg.train.batch_size}; "
                "lower train.batch_size or add data"
            )

    # ----- schedule -------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        full = len(self.batches) // self.cfg.train.batch_size
        cap = self.cfg.train.steps_per_epoch
        return min(full, cap) if cap else full

    def total_steps(self) -> int:
        total = self.steps_per_epoch() * self.cfg.train.epochs
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def _negatives_on(self, epoch: int) -> bool:
        n = self.cfg.loss.negatives
        return n.enabled and n.weight > 0 and epoch >= n.start_epoch

    # ----- one step -------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, epoch: int, images: np.ndarray | None = None) -> dict[str, float]:
        """One critic + E/G update on the batch x; `images`: the same batch as uint8 (synthetic negatives
        are implanted into copies of some of them)."""
        z_neg = None
        if self._negatives_on(epoch):
            ncfg = self.cfg.loss.negatives
            n_neg = max(1, round(ncfg.fraction * x.shape[0]))
        if self._negatives_on(epoch) and ncfg.mode == "synthetic":
            if images is None:
                raise ValueError("synthetic negatives need the batch's uint8 images")
            z_neg = to_tensor(synthetic_negatives(ncfg, images, n_neg, self.np_rng)).to(
                x.device, memory_format=self.memory_format)
        elif self._negatives_on(epoch):
            codes = None
            if needs_codes(ncfg):
                with torch.no_grad():
                    codes = self.model.encoder(x)
            z_neg = sample_negatives(ncfg, n_neg, self.model_cfg.nz, codes, self.gen, device=x.device)
        d = self.model.discriminator
        for j in range(self.cfg.optim.d_steps):
            self.objective.critic_step = self.state.step * self.cfg.optim.d_steps + j
            self.opt_d.zero_grad(set_to_none=True)
            if self._steps is None:
                loss_d, logs_d = self.objective.critic_loss(self.model, x, z_neg, self.gen)
            else:  # DDP: gradients averaged over the ranks in backward
                loss_d, logs_d = self._steps["critic"](x, z_neg)
            loss_d.backward()
            self.opt_d.step()
        d.requires_grad_(False)  # the E/G step needs gradients through D, not for D
        try:
            self.opt_e.zero_grad(set_to_none=True)
            self.opt_g.zero_grad(set_to_none=True)
            if self._steps is None:
                loss_g, logs_g = self.objective.autoencoder_loss(self.model, x, z_neg, self.gen)
            else:
                loss_g, logs_g = self._steps["autoencoder"](x, z_neg)
            loss_g.backward()
            self.opt_e.step()
            self.opt_g.step()
        finally:
            d.requires_grad_(True)
        return {**logs_d, **logs_g}

    # ----- the loop -------------------------------------------------------------------------
    def _wrap_steps(self) -> None:
        """DistributedDataParallel over the critic step (D) and the E/G step (E and G), built once,
        after any resume: construction broadcasts rank 0's weights and buffers."""
        if self.dist is not None and self._steps is None:
            self._steps = {
                "critic": ddp.wrap(ddp.CriticStep(self.model, self.objective, self.gen), self.dist),
                "autoencoder": ddp.wrap(ddp.AutoencoderStep(self.model, self.objective, self.gen), self.dist),
            }

    def fit(self) -> Checkpoint | None:
        """Train, then (rank 0 only, in a distributed run) select/average, fit, evaluate and write.
        Ranks other than 0 return None once the training loop is done."""
        cfg = self.cfg.train
        total, per_epoch = self.total_steps(), self.steps_per_epoch()
        batch = f"batch {cfg.batch_size}"
        if self.dist:
            batch += f" ({self.world_size} processes x {self.local_batch})"
        log.info("training on %s: %d images, %s, %d steps/epoch, %d steps in all (%d done)",
                 self.device, len(self.train_images), batch, per_epoch, total, self.state.step)
        self._wrap_steps()
        t0, step0 = time.monotonic(), self.state.step
        self._started = t0
        if step0 == 0 and self.out_dir and self.is_main:
            (self.out_dir / "metrics.csv").unlink(missing_ok=True)  # a fresh run into an old folder
        bar = progress(total=total, desc="training", unit="step") if self.is_main else _NoProgress()
        bar.update(step0)
        self._last_good = (self.state.step, copy.deepcopy(self.model.state_dict()))
        try:
            self._run_epochs(bar, t0, step0, total, per_epoch)
        except TrainingStopped as exc:
            self._stop_at_last_good(str(exc))
        finally:
            bar.close()
            if self._board:
                self._board.close()
        if self.dist is not None:  # plain BatchNorm again: what follows runs on rank 0 alone
            for net in (self.model.encoder, self.model.generator):
                ddp.revert_sync_batchnorm(net)
            self._dist_record = {"processes": self.world_size, "backend": self.dist.backend,
                                 "images_per_process": ddp.all_gather_objects(self._images, self.dist)}
            if not self.is_main:
                return None
        if self.best_weights is not None:
            log.info("using the model selected at epoch %d (val AUROC-A %.4f)", self.state.best_epoch + 1,
                     self.state.best_score)
            self.model.load_state_dict(self.best_weights)
        elif self.average is not None:
            self._use_average()
        return self.finish()

    def _stop_at_last_good(self, why: str) -> None:
        """The guard tripped: one ERROR line, the weights of the last good step restored (the weight
        average and model selection are dropped: they may hold the bad steps), and the checkpoint is
        written from them (metrics "stopped"); the train command then exits with an error."""
        step, weights = self._last_good
        self.model.load_state_dict(weights)
        self.average, self.best_weights = None, None
        self.stopped = {"reason": why, "restored_step": step}
        log.error("%s; saving the model of step %d, the last good one", why, step)

    def _use_average(self, batches: int = 20) -> None:
        """Load the averaged weights, then recompute what belongs to them, not to the last weights:
        the BatchNorm statistics of E and G (a cumulative average over `batches` training batches) and
        the spectral-norm power-iteration vectors of D (a few train-mode passes)."""
        with torch.no_grad():
            for live, averaged in zip(self.model.parameters(), self.average.module.parameters()):
                live.copy_(averaged)
        norms = [m for net in (self.model.encoder, self.model.generator) for m in net.modules()
                 if isinstance(m, _BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
        bs = self.cfg.train.batch_size
        order = np.random.default_rng(self.cfg.seed + 4).permutation(len(self.batches))
        self.model.train()
        with torch.no_grad():
            for i in range(min(batches, max(1, len(order) // bs))):
                x = to_tensor(self.batches[np.sort(order[i * bs:(i + 1) * bs])]).to(
                    self.device, memory_format=self.memory_format)
                self.model.reconstruct(x)
                if i < 10:  # one power iteration per pass
                    self.model.discriminator(pair(x, x, self.model_cfg.mirrored))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        log.info("using the weight average (decay %g) over the last steps", self.cfg.train.ema_decay)

    def _run_epochs(self, bar, t0: float, step0: int, total: int, per_epoch: int) -> None:
        cfg = self.cfg.train
        while self.state.epoch < cfg.epochs and self.state.step < total:
            epoch = self.state.epoch
            self.model.train()
            order = self.rng.permutation(len(self.batches))
            for i in range(per_epoch):
                if self.state.step >= total:
                    break
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                if self.dist is not None:  # this rank's share of the global batch
                    idx = ddp.shard(idx, self.dist.rank, self.world_size)
                idx = np.sort(idx)
                images = self.batches[idx]
                x = to_tensor(images).to(self.device, non_blocking=True, memory_format=self.memory_format)
                logs = self.train_step(x, epoch, images)
                why = guard_verdict(logs, cfg.max_critic)
                if why is not None:
                    raise TrainingStopped(f"training stopped at step {self.state.step + 1}: {why}. {GUARD_REMEDY}")
                self._images += len(idx)
                if self.average is not None:
                    self.average.update_parameters(self.model)
                self.state.step += 1
                if self.state.step % cfg.log_every == 0:  # the last good weights, kept for the guard
                    self._last_good = (self.state.step, copy.deepcopy(self.model.state_dict()))
                bar.update(1)
                if self.state.step % cfg.log_every == 0 or self.state.step == total:
                    if self.dist is not None:  # the global batch's losses: the mean of the ranks' means
                        logs = ddp.mean_over_ranks(logs, self.dist)
                    if self.is_main:
                        self._log_step(epoch, logs, t0, step0, total)
            for sched in self.schedulers.values():
                sched.step()
            self.state.epoch += 1
            if self.is_main:  # the others go on and wait for it in the next step's collectives
                self._select_model(epoch)
            self.save_train_state()

    def _log_step(self, epoch: int, logs: dict[str, float], t0: float, step0: int, total: int) -> None:
        self._record(epoch, logs, time.monotonic() - t0)
        rate = (self.state.step - step0) / max(time.monotonic() - t0, 1e-9)
        eta = (total - self.state.step) / max(rate, 1e-9)
        epochs = min(self.cfg.train.epochs, math.ceil(total / max(self.steps_per_epoch(), 1)))  # max_steps may end it early
        log.info("epoch %d/%d step %d/%d %s | %.2f step/s, eta %.0fs", epoch + 1, epochs,
                 self.state.step, total, " ".join(f"{k}={v:.4g}" for k, v in logs.items()), rate, eta)

    def _select_model(self, epoch: int) -> None:
        """The paper's protocol: keep the epoch with the best validation AUROC of the A-score on labelled
        anomalies, the A-score under the mu/sigma fitted at this epoch (as the checkpoint will carry)."""
        val = self.data.val
        if val is None or int(np.sum(val.labels)) == 0 or epoch < self.cfg.train.select_from_epoch:
            return
        ckpt, _, _ = self._fitted_checkpoint(self._fit_subset())
        calibration = Calibration.from_checkpoint(ckpt)
        metrics = detection_metrics(Scorer(ckpt, device=self.device).r_scores(val.images, desc="validation"),
                                    val.labels, calibration)
        if metrics["auroc_a"] > self.state.best_score:
            self.state.best_score, self.state.best_epoch = metrics["auroc_a"], epoch
            self.best_weights = copy.deepcopy(self.model.state_dict())
        log.info("epoch %d validation AUROC-A %.4f, AUROC-R %.4f (best A %.4f at epoch %d)", epoch + 1,
                 metrics["auroc_a"], metrics["auroc_r"], self.state.best_score, self.state.best_epoch + 1)

    # ----- outputs --------------------------------------------------------------------------
    def _record(self, epoch: int, logs: dict[str, float], elapsed: float) -> None:
        """Append the logged values to OUT/metrics.csv (the report's loss curves)."""
        if not self.out_dir:
            return
        row = {"step": self.state.step, "epoch": epoch + 1, "elapsed_s": round(elapsed, 2), **logs}
        path = self.out_dir / "metrics.csv"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        exists = path.exists()
        fields = list(row)
        if exists:  # a resumed run keeps the columns it started with
            with path.open(newline="") as f:
                fields = next(csv.reader(f), None) or fields
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(row)
        board = self._tensorboard()
        if board is not None:
            for key, value in logs.items():
                board.add_scalar(key, value, self.state.step)
            board.flush()

    def _tensorboard(self):
        """A SummaryWriter on OUT/tensorboard when the optional `tensorboard` package is installed."""
        if self._board is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: metrics.csv and the report carry the same values
                self._board = False
            else:
                self._board = SummaryWriter(str(self.out_dir / "tensorboard"))
        return self._board or None

    def _checkpoint(self, mu: float, sigma: float, n: int, metrics: dict | None = None) -> Checkpoint:
        # per-position statistics are fitted on the finished model (finish()); none before
        return Checkpoint(
            model=self.model_cfg,
            preprocess=self.cfg.data.preprocess_spec(),
            state_dict={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            mu=mu,
            sigma=sigma,
            n_train=n,
            train_config=_plain(self.cfg.model_dump(mode="json")),
            metrics=metrics or {},
        )

    def _fitted_checkpoint(self, fit_images: np.ndarray) -> tuple[Checkpoint, np.ndarray, np.ndarray]:
        """The checkpoint of the current weights with what is fitted on good images: the feature Gaussian
        (score mahalanobis: on every other fit image, so mu/sigma below see distances of images it was
        not fitted on), per-position statistics (aligned patch models), then mu/sigma of the scores.
        Returns it, the images mu/sigma were fitted on and their scores."""
        ckpt = self._checkpoint(0.0, 1.0, 0)
        if self.cfg.score == "mahalanobis":
            scorer, even = Scorer(ckpt, device=self.device), fit_images[0::2]
            ckpt.feature_gaussian = feature_gaussian.fit(np.concatenate([feature_gaussian.feature_difference(
                scorer.score_fitted(even[i:i + 256], return_features=True).features) for i in range(0, len(even), 256)]))
            fit_images = fit_images[1::2]
        scorer = Scorer(ckpt, device=self.device)
        if self.cfg.data.preprocess_spec().frame_size:
            ckpt.position_stats, r_fit = fit_position_stats(scorer, fit_images, self.cfg.data.top_k)
        else:
            r_fit = scorer.r_scores(fit_images, desc="fitting mu/sigma on training images")
        ckpt.mu, ckpt.sigma = fit_gaussian(r_fit)
        ckpt.n_train = len(fit_images)
        return ckpt, fit_images, r_fit

    def _fit_subset(self) -> np.ndarray:
        n = min(len(self.train_images), self.cfg.train.fit_max_images)
        idx = np.sort(np.random.default_rng(self.cfg.seed + 3).choice(len(self.train_images), n, replace=False))
        return self.train_images[idx]

    def finish(self) -> Checkpoint:
        """Fit mu/sigma of the training R-scores (a patch model for aligned parts: first the per-position
        statistics, then mu/sigma of the image scores under them), evaluate on the test protocol, write
        outputs."""
        ckpt, fit_images, r_fit = self._fitted_checkpoint(self._fit_subset())
        mu, sigma = ckpt.mu, ckpt.sigma
        log.info("training %s-scores: mu=%.6g sigma=%.6g (n=%d)", ckpt.score_name, mu, sigma, ckpt.n_train)
        metrics: dict = {"epochs": self.state.epoch, "steps": self.state.step, "train_images": len(self.train_images),
                         "train_wall_s": round(time.monotonic() - getattr(self, "_started", time.monotonic()), 1)}
        if self.state.best_epoch >= 0 and self.best_weights is not None:
            metrics["selected_epoch"] = self.state.best_epoch + 1
        if self.stopped is not None:
            metrics["stopped"] = self.stopped
        if self._dist_record is not None:
            metrics["distributed"] = self._dist_record
        test = self.data.test
        scorer = Scorer(ckpt, device=self.device)
        calibration = Calibration.from_checkpoint(ckpt)
        r_test = scorer.r_scores(test.images, desc="scoring test images") if test is not None and len(test.labels) \
            else np.zeros(0)
        if test is not None and test.n_normal:
            metrics.update(good_only_metrics(scorer, test.images[test.labels == 0], r_test[test.labels == 0], calibration))
        if test is not None and test.n_normal and test.n_anomaly:
            metrics.update(full_metrics(r_test, test.labels, calibration, self.cfg.seed))
        if test is not None and test.ids:
            metrics.update(holdout_record(test))
        log.info("test: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        sens = self._sensitivity(scorer, calibration) if self.cfg.train.sensitivity else None
        if sens is not None:
            metrics["sensitivity"] = sens.to_json()
        ckpt.metrics = metrics
        if not self.out_dir:
            ckpt.model_id = ""
            return ckpt
        save_checkpoint(ckpt, self.out_dir / "model.pt")
        metrics_out = {**metrics, "model_id": ckpt.model_id, "mu": mu, "sigma": sigma}
        atomic_write_bytes(self.out_dir / "metrics.json", (json.dumps(metrics_out, indent=2) + "\n").encode())
        log.info("wrote %s and %s", self.out_dir / "model.pt", self.out_dir / "metrics.json")
        self._write_report(scorer, calibration, metrics_out, fit_images, r_fit, r_test)
        if sens is not None and sens.warning():
            log.warning("%s", sens.warning())  # among the run's last lines, where it is seen
        return ckpt

    def _sensitivity(self, scorer: Scorer, calibration: Calibration):
        """What the model catches at its default threshold: the synthetic-defect ladder in held-out good
        images (ama_stream.sensitivity), logged as a table."""
        test = self.data.test
        if test is None or test.n_normal == 0:
            return None
        t0 = time.monotonic()
        sens = sensitivity.check_held_out(scorer, calibration, test.images, test.labels, test.shapes, self.cfg.seed,
                                          self.cfg.model_dump(mode="json"))
        log.info("what this model will catch at its default threshold (%.0f s):\n%s", time.monotonic() - t0,
                 "\n".join(sens.table()))
        return sens

    def _write_report(self, scorer: Scorer, calibration: Calibration, metrics: dict, fit_images: np.ndarray,
                      r_fit: np.ndarray, r_test: np.ndarray) -> None:
        """OUT/report.html and its plots. The model is already saved: a failing plot costs only the report."""
        from .report import plain_summary, top_overlays, write_report  # matplotlib only here

        test = self.data.test
        if test is not None and test.n_normal:
            normal, anomaly = test.labels == 0, test.labels == 1
            images, r, label = test.images[normal], r_test[normal], "held-out normal"
            anomaly_images, r_anomaly = test.images[anomaly], r_test[anomaly]
        else:
            images, r, label = fit_images, r_fit, "training (no held-out images)"
            anomaly_images, r_anomaly = None, None
        a = lambda values: -calibration.decide(values).log_a if values is not None else None  # noqa: E731
        try:
            summary = plain_summary(metrics, self.out_dir / "model.pt", self.cfg.policy)
            overlays = None
            if test is not None and test.n_normal and test.shapes is not None:
                ids = list(test.ids) if test.ids else None
                overlays = top_overlays(scorer, [(label, test.images[m], test.shapes[m], r_test[m],
                                                  [ids[i] for i in np.flatnonzero(m)] if ids else None)
                                                 for label, m in (("good", normal), ("defect", anomaly))])
            path = write_report(self.out_dir, scorer, title=f"ama-stream train: model {scorer.model_id}",
                                metrics=metrics, normal_images=images, r_normal=r, anomaly_images=anomaly_images,
                                r_anomaly=r_anomaly, a_normal=a(r), a_anomaly=a(r_anomaly),
                                metrics_csv=self.out_dir / "metrics.csv", normal_label=label, summary=summary,
                                overlays=overlays)
            log.info("wrote the report %s", path)
        except Exception as exc:  # noqa: BLE001 -- any plotting failure; the checkpoint is safe
            log.error("could not write the report in %s: %s: %s", self.out_dir, type(exc).__name__, exc)

    # ----- resume ---------------------------------------------------------------------------
    def save_train_state(self) -> None:
        """OUT/train_state.pt, by rank 0. A distributed run adds every rank's noise-generator state
        under "dist"; the rest is the single-process format (rank 0's generator under "rng")."""
        if not self.out_dir:
            return
        gen_states = ddp.all_gather_objects(self.gen.get_state(), self.dist) if self.dist else None
        if not self.is_main:
            return
        payload = {
            "format": TRAIN_STATE_FORMAT,
            "version": 1,
            "train_config": _plain(self.cfg.model_dump(mode="json")),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "loop": {"epoch": self.state.epoch, "step": self.state.step,
                     "best_score": self.state.best_score, "best_epoch": self.state.best_epoch},
            "best_weights": self.best_weights,
            "average": self.average.state_dict() if self.average is not None else None,
            "rng": {"torch": torch.get_rng_state(), "gen": self.gen.get_state(),
                    "numpy": json.dumps(self.rng.bit_generator.state)},
        }
        if gen_states is not None:
            payload["dist"] = {"world_size": self.world_size, "gen": gen_states}
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(self.out_dir / "train_state.pt", buf.getvalue())

    def load_train_state(self, path: str | Path) -> None:
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such training state file") from None
        except Exception as exc:  # corrupt, truncated or unsafe pickle
            raise ValueError(f"{path}: not a readable training state ({type(exc).__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != TRAIN_STATE_FORMAT:
            raise ValueError(f"{path}: not an ama-stream training state (expected OUT/train_state.pt)")
        saved_model = payload["train_config"].get("model")
        if saved_model != _plain(self.cfg.model.model_dump(mode="json")):
            raise ValueError(f"{path}: saved model section {saved_model} differs from the configuration")
        self.model.load_state_dict(payload["state_dict"])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(payload["optimizers"][k])
        for k, sched in self.schedulers.items():
            sched.load_state_dict(payload["schedulers"][k])
        loop = payload["loop"]
        self.state = LoopState(loop["epoch"], loop["step"], loop["best_score"], loop["best_epoch"])
        self.best_weights = payload.get("best_weights")
        if self.average is not None and payload.get("average") is not None:
            self.average.load_state_dict(payload["average"])
        torch.set_rng_state(payload["rng"]["torch"])
        self._load_gen_state(payload)
        self.rng.bit_generator.state = json.loads(payload["rng"]["numpy"])
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)

    def _load_gen_state(self, payload: dict) -> None:
        """Rank 0 (and a single process) continue the file's main stream; other ranks their own when the
        file is from a run with as many processes, else a fresh stream seeded by (seed, rank, step)."""
        rank = self.dist.rank if self.dist else 0
        saved = payload.get("dist") or {}
        if rank == 0:
            self.gen.set_state(payload["rng"]["gen"])
        elif saved.get("world_size") == self.world_size:
            self.gen.set_state(saved["gen"][rank])
        else:
            self.gen.manual_seed(ddp.rank_seed(self.cfg.seed + 1, rank, self.state.step))
        if self.dist and self.is_main and self.world_size > 1 and saved.get("world_size") != self.world_size:
            log.info("the resumed file is from a run with %s processes: the noise streams of ranks 1-%d start afresh",
                     saved.get("world_size", 1), self.world_size - 1)


def fit_position_stats(scorer: Scorer, images, top_k: int, batch: int = 16) -> tuple[dict, np.ndarray]:
    """Per-position statistics of good images of one working size (the checkpoint's position_stats):
    mean and std of each patch position's R and of each pixel of the stitched maps; and the images'
    scores under them (the z-scores' top-k mean), for mu/sigma. Stds have a floor of 1e-3 of their
    median, so a position where every good image looks alike cannot make any change a huge z."""
    rs, maps = [], []
    with progress(total=len(images), desc="fitting per-position statistics", unit="img") as bar:
        for i in range(0, len(images), batch):
            r, m = scorer.raw_position_outputs(scorer.tile(images[i:i + batch]))
            rs.append(r)
            maps.append(m)
            bar.update(len(r))
    r, maps = np.concatenate(rs), np.concatenate(maps)

    def floored(std: np.ndarray) -> np.ndarray:
        return np.maximum(std, 1e-3 * max(float(np.median(std)), 1e-12))

    stats = {"patch_mean": r.mean(0), "patch_std": floored(r.std(0)), "map_mean": maps.mean(0),
             "map_std": floored(maps.std(0))}
    z = ((r - stats["patch_mean"]) / stats["patch_std"]).reshape(len(r), -1)
    k = min(top_k, z.shape[1])
    scores = np.sort(z, axis=1)[:, -k:].mean(axis=1)
    return {key: torch.from_numpy(v.astype(np.float32)) for key, v in stats.items()}, scores


def train(cfg: TrainConfig, out_dir: str | Path | None = None, resume: str | Path | None = None,
          data: ProtocolData | None = None, dist: ddp.DistContext | None = None) -> Checkpoint | None:
    """Load the protocol's data, train, fit mu/sigma, evaluate, write OUT/model.pt + metrics.json.
    With `dist` (a torchrun process), every rank trains its share; rank 0 returns the checkpoint and
    the others None."""
    if data is None:
        data_root = resolve_data_root(cfg.data_root)
        cfg = cfg.model_copy(update={"data": resolve_image_shape(cfg.data, data_root)})
        t0 = time.monotonic()
        data = build_protocol(cfg.data, data_root, cfg.seed)
        log.info("loaded data in %.1fs: %d train, %s test", time.monotonic() - t0, len(data.train),
                 len(data.test.labels) if data.test is not None else 0)
    elif cfg.data.shape_is_auto:  # arrays handed in: they already have the model's shape
        size, channels = int(data.train.shape[1]), int(data.train.shape[3])
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": size, "channels": channels})})
    trainer = Trainer(cfg, data, out_dir, dist=dist)
    if resume:
        trainer.load_train_state(resume)
    return trainer.fit()
