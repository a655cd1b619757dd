"""Which score generalises across kinds of outliers? One trained whole-image model, five scores, chosen
on validation sets only; the protocol's test anomalies are scored once per reported row.

    python benchmarks/score_variants.py runs/fmnist/model.pt [--n 2000]

Scores (higher = more anomalous), all from the forward the Scorer already runs:
- `r`: the R-score;
- `a`: the paper's two-sided A-score, |z| of R under the checkpoint's mu/sigma;
- `r_complexity`: R minus what the image's complexity predicts (Serra et al. 2020, "Input complexity and
  out-of-distribution detection": a likelihood-type score corrected by the input's compressed length).
  Complexity L = PNG-compressed bits per pixel of the model input; R ~ a + b L is fitted by least
  squares on training normals, and the score is the residual;
- `maha_features`: Mahalanobis distance of the critic feature difference f(x, x) - f(x, G(E(x))) (the
  vector whose L1 norm is R), mean and Ledoit-Wolf covariance fitted on training normals;
- `maha_codes`: the same on the encoder's codes E(x).

Normal images: the normal source's held-out split is halved by index (even: validation, odd: test).
Validation anomalies (recipes are chosen here): the anomaly source's TRAIN split, plus far-OOD sets built
from what is offline: CIFAR-10 in gray, the validation normals rotated 90 degrees and flipped upside
down, uniform noise, constant images, ELPV cells. Test anomalies: the anomaly source's test split.
Rows go to benchmarks/results/score_variants.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sklearn.metrics import roc_auc_score  # noqa: E402

from ama_stream import feature_gaussian  # noqa: E402
from ama_stream.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from ama_stream.logs import configure_logging  # noqa: E402
from ama_stream.preprocess import to_tensor  # noqa: E402
from ama_stream.scoring import Scorer  # noqa: E402
from ama_stream.source_spec import SourceSpec, resolve_data_root  # noqa: E402
from ama_stream.sources import load_images  # noqa: E402
from benchmarks.quality import commit  # noqa: E402
from training.config import TrainConfig  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "score_variants.jsonl"
SCORES = ("r", "a", "r_complexity", "maha_features", "maha_codes")  # simplest first
TIE = 0.005  # validation means closer than this are a tie: the simpler score is chosen


def complexity(images: np.ndarray) -> np.ndarray:
    """PNG-compressed bits per pixel of each uint8 [N, S, S, C] image."""
    out = np.empty(len(images))
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG", compress_level=9)
        out[i] = 8.0 * len(buf.getvalue()) / (img.shape[0] * img.shape[1])
    return out


class ScoreBank:
    """Every score of a set of fitted images, from one Scorer pass and one encoder pass."""

    def __init__(self, ckpt: Checkpoint, fit_images: np.ndarray):
        # "r" is always R: a checkpoint trained with score mahalanobis carries its own Gaussian (and
        # mu/sigma of its distance); maha_features re-fits one here on the same footing as the others
        own_gaussian = ckpt.feature_gaussian is not None
        self.scorer = Scorer(dataclasses.replace(ckpt, feature_gaussian=None), "cpu")
        self.model = ckpt.build_model().eval()
        raw = self._raw(fit_images)
        self.mu, self.sigma = (float(raw["r"].mean()), float(raw["r"].std())) if own_gaussian else (ckpt.mu, ckpt.sigma)
        design = np.stack([np.ones(len(raw["r"])), raw["L"]], axis=1)
        self.coef, *_ = np.linalg.lstsq(design, raw["r"], rcond=None)
        self.gauss = {k: feature_gaussian.fit(raw[k]) for k in ("d", "codes")}

    def _raw(self, images: np.ndarray) -> dict[str, np.ndarray]:
        scores = self.scorer.score_images(images, return_features=True)
        f = scores.features
        n = len(images)
        with torch.no_grad():
            codes = torch.cat([self.model.encoder(to_tensor(images[i:i + 512])) for i in range(0, n, 512)])
        return {"r": scores.r, "d": feature_gaussian.feature_difference(f).astype(np.float64),
                "codes": codes.numpy().astype(np.float64), "L": complexity(images)}

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raw = self._raw(images)
        out = {"r": raw["r"], "a": np.abs((raw["r"] - self.mu) / self.sigma),
               "r_complexity": raw["r"] - (self.coef[0] + self.coef[1] * raw["L"])}
        for key, name in (("d", "maha_features"), ("codes", "maha_codes")):
            out[name] = feature_gaussian.mahalanobis(torch.from_numpy(raw[key]), self.gauss[key]).numpy()
        return out


def fitted(spec_kwargs: dict, image_spec, data_root, n: int, seed: int) -> np.ndarray:
    images = load_images(SourceSpec(**spec_kwargs), data_root, image_spec, seed).images
    if len(images) > n:
        images = images[np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))]
    return images


def validation_sets(cfg: TrainConfig, image_spec, data_root, normal_val: np.ndarray, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 7)
    s, c = image_spec.image_size, image_spec.channels
    anomaly = cfg.data.anomaly
    return {
        f"{anomaly.root}-train": fitted({"format": anomaly.format, "root": anomaly.root, "split": "train"},
                                        image_spec, data_root, n, seed),
        "cifar10-gray": fitted({"format": "folder", "root": "cifar10-jpeg/test"}, image_spec, data_root, n, seed),
        "rotated-normals": np.ascontiguousarray(np.rot90(normal_val, 1, axes=(1, 2))),
        "flipped-normals": np.ascontiguousarray(normal_val[:, ::-1]),
        "noise": rng.integers(0, 256, (n // 4, s, s, c), dtype=np.uint8),
        "constant": np.repeat(np.linspace(0, 255, 64).astype(np.uint8), s * s * c).reshape(64, s, s, c),
        "elpv": fitted({"format": "elpv", "root": "elpv"}, image_spec, data_root, n // 4, seed),
    }


def auroc(normal: np.ndarray, anomaly: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
    return float(roc_auc_score(labels, np.r_[normal, anomaly]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--n", type=int, default=2000, help="images per validation set (noise and ELPV: a quarter)")
    p.add_argument("--fit", type=int, default=2000, help="training normals the corrections are fitted on")
    p.add_argument("--data-root")
    args = p.parse_args()
    configure_logging("WARNING")
    ckpt = load_checkpoint(args.checkpoint)
    cfg = TrainConfig.model_validate({k: v for k, v in ckpt.train_config.items() if k != "data_root"})
    data_root = resolve_data_root(args.data_root)
    image_spec = ckpt.preprocess
    normal = cfg.data.normal
    train_normals = fitted({"format": normal.format, "root": normal.root, "split": "train"}, image_spec, data_root,
                           args.fit, cfg.seed + 11)
    held_out = load_images(SourceSpec(format=normal.format, root=normal.root, split="test"), data_root,
                           image_spec, cfg.seed).images
    normal_val, normal_test = held_out[0::2], held_out[1::2]
    bank = ScoreBank(ckpt, train_normals)
    val_normal_scores = bank.scores(normal_val)
    val = {}
    for name, images in validation_sets(cfg, image_spec, data_root, normal_val, args.n, cfg.seed).items():
        got = bank.scores(images)
        val[name] = {k: auroc(val_normal_scores[k], got[k]) for k in SCORES}
    mean_val = {k: float(np.mean([v[k] for v in val.values()])) for k in SCORES}
    worst_val = {k: float(np.min([v[k] for v in val.values()])) for k in SCORES}
    test_anomalies = fitted({"format": cfg.data.anomaly.format, "root": cfg.data.anomaly.root, "split": "test"},
                            image_spec, data_root, len(normal_test) // 5, cfg.seed)
    test_normal_scores, test_scores = bank.scores(normal_test), bank.scores(test_anomalies)
    test = {k: auroc(test_normal_scores[k], test_scores[k]) for k in SCORES}
    best = max(mean_val.values())  # within TIE of the best mean, the simplest score (SCORES is in that order)
    chosen = next(k for k in SCORES if mean_val[k] >= best - TIE)
    row = {"date": date.today().isoformat(), "commit": commit(), "checkpoint": str(args.checkpoint),
           "model_id": ckpt.model_id, "steps": ckpt.metrics.get("steps"), "validation": val,
           "validation_mean": mean_val, "validation_worst": worst_val, "chosen_on_validation": chosen,
           "test": test, "n_test_normal": len(normal_test), "n_test_anomaly": len(test_anomalies),
           "complexity_fit": [float(c) for c in bank.coef]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    header = f"{'set':<18}" + "".join(f"{k:>15}" for k in SCORES)
    print(header)
    for name, v in val.items():
        print(f"{name:<18}" + "".join(f"{v[k]:>15.4f}" for k in SCORES))
    print(f"{'val mean':<18}" + "".join(f"{mean_val[k]:>15.4f}" for k in SCORES))
    print(f"{'val worst':<18}" + "".join(f"{worst_val[k]:>15.4f}" for k in SCORES))
    print(f"{'TEST (once)':<18}" + "".join(f"{test[k]:>15.4f}" for k in SCORES))
    print(f"chosen on validation: {chosen}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
