"""Industrial quality: train a model on good images only, then measure image and pixel metrics on
real defects, choosing recipes on one half of the test data and reporting the other half once.

    python benchmarks/industrial.py --config configs/own_data.yaml --normal folder:bsdata/good \
        --anomaly folder:bsdata/defect --masks folder:bsdata/masks --seeds 0,1,2 --label "patch + synthetic"
    ... --halves val,test --baseline pca --baseline autoencoder      # a reported row

The protocol's test set (held-out good images + every defect image) is split in two halves by a
hash of each file's name: `val`, on which recipes are chosen, and `test`, scored only for rows that
are reported. The split does not depend on the run seed, so every seed and recipe sees the same
halves. Per half: image AUROC/AUPR of the model's score, and with --masks pixel AUROC and AUPRO of
its anomaly maps. --baseline adds the patch PCA and the plain autoencoder (training/baselines.py)
on the same crops, tiles and halves. Rows go to benchmarks/results/industrial.jsonl, per-image
scores to OUT/<run>/scores.npz. Not a test: it measures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from ama_stream.checkpoint import load_checkpoint  # noqa: E402
from ama_stream.logs import configure_logging  # noqa: E402
from ama_stream.scoring import Scorer  # noqa: E402
from ama_stream.settings import load_settings, parse_overrides  # noqa: E402
from ama_stream.sources import parse_source, resolve_data_root, resolve_root  # noqa: E402
from benchmarks.quality import commit, seed_list  # noqa: E402
from training import pixelmaps  # noqa: E402
from training.baselines import PatchAutoencoder, PatchPCA, inspect_with  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.datasets import EvalSet, ProtocolData, build_protocol, resolve_image_shape  # noqa: E402
from training.patches import RandomCrops  # noqa: E402
from training.trainer import train  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "industrial.jsonl"
HALVES = ("val", "test")


def half_of(image_id: str) -> str:
    """'val' or 'test', from the file name alone (so the same for every seed, recipe and machine)."""
    stem = Path(image_id.split("#", 1)[0]).name
    return HALVES[hashlib.blake2b(b"industrial-halves:" + stem.encode(), digest_size=8).digest()[0] & 1]


def half_metrics(scores: np.ndarray, maps, test: EvalSet, which: np.ndarray, masks: dict | None) -> dict:
    labels = test.labels[which]
    out = {"n_good": int((labels == 0).sum()), "n_defect": int((labels == 1).sum()),
           "auroc": float(roc_auc_score(labels, scores[which])), "aupr": float(average_precision_score(labels, scores[which]))}
    if masks is not None and maps is not None:
        idx = np.flatnonzero(which)
        metrics = pixelmaps.PixelMetrics(pixelmaps.quantile_edges([maps[i] for i in idx]))
        for i in idx:
            metrics.add(maps[i].astype(np.float32), pixelmaps.read_mask(masks, test.ids[i], tuple(int(v) for v in test.shapes[i][:2])))
        out.update(metrics.result())
    return out


def measure(name: str, scores: np.ndarray, maps, test: EvalSet, halves: list[str], masks) -> dict:
    sides = np.array([half_of(i) for i in test.ids])
    return {half: half_metrics(scores, maps, test, sides == half, masks) for half in halves}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--normal", metavar="SOURCE", help="the good images (default: the config's data.normal)")
    p.add_argument("--anomaly", metavar="SOURCE", help="the defect images (default: the config's data.anomaly)")
    p.add_argument("--masks", metavar="SOURCE", help="folder:DIR of defect masks named by image stem")
    p.add_argument("--seeds", default=[0], type=seed_list)
    p.add_argument("--label", default="preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--halves", default="val", help="val (choosing recipes) or val,test (a reported row)")
    p.add_argument("--baseline", action="append", default=[], choices=["pca", "autoencoder"])
    p.add_argument("--out", default=str(REPO / "runs" / "industrial"))
    p.add_argument("--checkpoint", help="measure this trained model instead of training (its config and seed)")
    args = p.parse_args()
    halves = args.halves.split(",")
    if any(h not in HALVES for h in halves):
        p.error(f"--halves takes val or val,test, got {args.halves!r}")
    configure_logging("INFO")
    sets = [f"data.{side}={json.dumps(parse_source(text).model_dump(mode='json'))}"
            for side, text in (("normal", args.normal), ("anomaly", args.anomaly)) if text]
    if args.checkpoint:
        args.seeds = [load_checkpoint(args.checkpoint).train_config.get("seed", 0)]
    for seed in args.seeds:
        cfg = load_settings(TrainConfig, args.config, parse_overrides(sets + args.set + [f"seed={seed}"]))
        data_root = resolve_data_root(cfg.data_root)
        cfg = cfg.model_copy(update={"data": resolve_image_shape(cfg.data, data_root)})
        masks = pixelmaps.mask_index(resolve_root(parse_source(args.masks), data_root)) if args.masks else None
        data = build_protocol(cfg.data, data_root, seed)
        test = data.test
        empty = EvalSet(test.images[:0], test.labels[:0], ())
        run_dir = Path(args.out) / f"{Path(args.config).stem}-{args.label.replace(' ', '_').replace('/', '')}-seed{seed}"
        t0 = time.monotonic()
        if args.checkpoint:
            ckpt = load_checkpoint(args.checkpoint)
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            ckpt = train(cfg, out_dir=run_dir, data=ProtocolData(data.train, data.train_ids, data.val, empty))
        wall = time.monotonic() - t0
        scorer = Scorer(ckpt, device=cfg.device)
        scores, maps, _ = pixelmaps.inspect_set(scorer, test.images, test.shapes)
        row = {"date": date.today().isoformat(), "commit": commit(), "config": Path(args.config).stem,
               "label": args.label, "overrides": args.set, "seed": seed,
               "normal": str(cfg.data.normal), "anomaly": str(cfg.data.anomaly), "steps": ckpt.metrics.get("steps"), "train_wall_s": round(wall, 1),
               "ama": measure("ama", scores, maps, test, halves, masks)}
        saved = {"ids": np.array(test.ids), "labels": test.labels, "ama": scores}
        spec = ckpt.preprocess
        if args.baseline and spec.patched:
            batch = scorer.tile(test.images, test.shapes)
            crops = RandomCrops(data.train, spec.image_size, seed)
            fit = None  # per-position statistics, when the model has them, on the same training images
            if spec.frame_size:
                n_fit = min(len(data.train), cfg.train.fit_max_images)
                pick = np.sort(np.random.default_rng(cfg.seed + 3).choice(len(data.train), n_fit, replace=False))
                fit = scorer.tile(data.train[pick])
            if "pca" in args.baseline:
                pca = PatchPCA(seed=seed).fit(crops[np.arange(min(len(crops), 20000))])
                b_scores, b_maps = inspect_with(pca, batch, spec, fit)
                row["pca"], saved["pca"] = measure("pca", b_scores, b_maps, test, halves, masks), b_scores
            if "autoencoder" in args.baseline:
                t1 = time.monotonic()
                ae = PatchAutoencoder(cfg).fit(crops, int(row["steps"]))
                b_scores, b_maps = inspect_with(ae, batch, spec, fit)
                row["autoencoder"] = {**measure("autoencoder", b_scores, b_maps, test, halves, masks),
                                      "train_wall_s": round(time.monotonic() - t1, 1)}
                saved["autoencoder"] = b_scores
        np.savez(run_dir / "scores.npz", **saved)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
