"""`ama-stream evaluate`: score a test protocol with a checkpoint; ONE JSON line on stdout and a
short table for people on stderr.

Test data defaults to the protocol in the checkpoint's training config; --normal/--anomaly
replace either side (replacement anomalies are sampled as the protocol samples: to
data.anomaly_fraction of the normal count for cross, whole otherwise). A model trained on good
images only is scored on its held-out good slice -- never an image it trained on; the checkpoint
records which -- against --anomaly if given, else on its own (false-alarm rate, R-score spread).
"""
from __future__ import annotations

import argparse
import json

import logging
import sys
from pathlib import Path

from ama_stream.checkpoint import load_checkpoint
from ama_stream.fileio import atomic_write_bytes
from ama_stream.runtimes import add_runtime_options
from ama_stream.scoring import Scorer
from ama_stream.settings import SettingsError, deep_merge, load_settings, parse_overrides
from ama_stream.sources import parse_source, resolve_data_root, resolve_root

from ..config import TrainConfig
from ama_stream.calibration import Calibration

from ama_stream.preprocess import FitTally

from ..datasets import build_test_set, holdout_record
from .. import pixelmaps
from ..evaluate import full_metrics, good_only_metrics, human_table

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model.pt written by `ama-stream train`")
    p.add_argument("--config", help="training YAML whose data section defines the test protocol "
                                     "(default: the checkpoint's own training config)")
    p.add_argument("--normal", metavar="SOURCE", help="replace the normal test data, e.g. folder:/data/line3/good")
    p.add_argument("--anomaly", metavar="SOURCE", help="replace the anomalous test data, e.g. idx:mnist")
    p.add_argument("--normal-classes", help="class selection for --normal, comma separated")
    p.add_argument("--anomaly-classes", help="class selection for --anomaly, comma separated")
    p.add_argument("--data-root", help="folder that relative data roots resolve against (default: AMA_DATA_ROOT)")
    p.add_argument("--seed", type=int, help="seed of the test sampling (default: the training seed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--batch-size", type=int, default=256)
    add_runtime_options(p)
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--plots", metavar="DIR", help="write the report there: R-score densities (the paper's Fig. 4), "
                                                  "ROC and PR curves, reconstructions and report.html")
    p.add_argument("--maps", metavar="DIR", help="write each test image's anomaly map there: an 8-bit PNG "
                                                 "DIR/FOLDER/STEM.png (the image's folder name and file stem), the "
                                                 "image's size, one scale for the run (0 = least, 255 = most anomalous)")
    p.add_argument("--masks", metavar="SOURCE", help="defect masks, folder:DIR of PNGs named by the images' file "
                                                     "stems (nonzero = defect; no file = defect-free): adds pixel "
                                                     "AUROC and AUPRO to the JSON")
    p.add_argument("--sensitivity", action="store_true",
                   help="also implant synthetic defects (2-32 px) into the held-out good images and report which the "
                        "checkpoint's threshold catches, per kind and size")
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count undecodable images instead of stopping")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the training config's data section, e.g. data.limit_test=500")


def _source(text: str | None, classes: str | None, skip_corrupt: bool):
    return parse_source(text, classes, skip_corrupt) if text else None


def _check_inputs(ckpt, test, own_normals: bool) -> None:
    """Warnings a user must see: images that do not fit the model, a held-out slice that changed."""
    if test.shapes is not None:
        tally = FitTally(ckpt.preprocess).add_all(test.shapes)
        misfit = tally.message("test images")
        if misfit:
            (log.warning if tally.serious else log.info)("%s", misfit)
    recorded = ckpt.metrics.get("holdout_normal_sha256")
    if own_normals and recorded and test.ids:
        now = holdout_record(test)
        if now["holdout_normal_sha256"] != recorded:
            log.warning("the held-out normal images are not those recorded at training (%d now, %d then): files "
                        "were added to or removed from the source. Each file keeps its side of the split, so no "
                        "trained-on image is scored, but the numbers differ from the training report's",
                        now["holdout_normal_count"], ckpt.metrics.get("holdout_normal_count", 0))

def _sensitivity(scorer, calibration, test, ckpt, seed: int) -> dict:
    """The label-free check on up to 40 held-out good images, printed and returned for the JSON."""
    from ama_stream import sensitivity

    result = sensitivity.check_held_out(scorer, calibration, test.images, test.labels, test.shapes, seed,
                                        ckpt.train_config)
    print("what the checkpoint's threshold catches (synthetic defects, px of the camera's frames):\n"
          + "\n".join(result.table()) + (f"\n{result.warning()}" if result.warning() else ""), file=sys.stderr)
    return result.to_json()


def _group(label: str, test, r, which):
    """(label, images, native shapes, scores, ids) of one side of the test set, for the map overlays."""
    shapes = test.shapes[which] if test.shapes is not None else None
    return label, test.images[which], shapes, r[which], [i for i, keep in zip(test.ids, which) if keep]


def _mask_folder(text: str | None, data_root) -> dict | None:
    if text is None:
        return None
    spec = parse_source(text)
    if spec.format != "folder":
        raise SettingsError(f"--masks takes folder:DIR (mask PNGs named by the images' file stems), got {text!r}")
    return pixelmaps.mask_index(resolve_root(spec, data_root))


def _write_maps_and_pixel_metrics(maps_dir: str | None, masks: dict | None, test, maps) -> dict:
    """The 8-bit PNGs (one scale for the run) and, with masks, pixel AUROC and AUPRO."""
    out: dict = {}
    lo, hi = pixelmaps.value_range(maps)
    if maps_dir:
        pixelmaps.write_maps(maps_dir, test.ids, maps, lo, hi)
        out.update(maps=str(maps_dir), maps_scale=[lo, hi])
        log.info("wrote %d anomaly maps to %s (0 = %.4g, 255 = %.4g)", len(maps), maps_dir, lo, hi)
    if masks is not None:
        metrics = pixelmaps.PixelMetrics(pixelmaps.quantile_edges(maps))
        for image_id, shape, anomaly_map in zip(test.ids, test.shapes, maps):
            metrics.add(anomaly_map, pixelmaps.read_mask(masks, image_id, tuple(int(v) for v in shape[:2])))
        pixel = metrics.result()
        if not pixel:
            log.warning("no pixel metrics: the masks mark no defect pixel in these test images (or every pixel)")
        out.update(pixel)
    return out


def run(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    overrides = parse_overrides(args.set)
    if args.config:
        cfg = load_settings(TrainConfig, args.config, overrides)
    else:
        if not ckpt.train_config.get("data"):
            raise SettingsError(f"{args.checkpoint}: checkpoint has no training config; pass --config")
        stored = {k: v for k, v in ckpt.train_config.items() if k != "data_root"}  # paths of the training machine
        cfg = TrainConfig.model_validate(deep_merge(stored, overrides))
    seed = cfg.seed if args.seed is None else args.seed
    normal = _source(args.normal, args.normal_classes, args.skip_corrupt)
    anomaly = _source(args.anomaly, args.anomaly_classes, args.skip_corrupt)
    data = cfg.data
    if args.skip_corrupt:
        data = data.model_copy(update={side: getattr(data, side).model_copy(update={"skip_corrupt": True})
                                       for side in ("normal", "anomaly") if getattr(data, side) is not None})
    data_root = resolve_data_root(args.data_root)
    test = build_test_set(data, data_root, seed, normal=normal, anomaly=anomaly)
    _check_inputs(ckpt, test, normal is None)
    scorer = Scorer(ckpt, device=args.device, runtime=args.runtime, runtime_model=args.runtime_model)
    masks = _mask_folder(args.masks, data_root)
    maps = None
    if args.maps or masks is not None:  # the maps come from the same forward as the scores
        if test.shapes is None:
            raise SettingsError("anomaly maps need the test images' native sizes, which this source does not record")
        r, maps, _regions = pixelmaps.inspect_set(scorer, test.images, test.shapes)
    else:
        r = scorer.r_scores(test.images, batch_size=args.batch_size, desc="scoring test images")
    calibration = Calibration.from_checkpoint(ckpt)
    good = test.labels == 0
    result = good_only_metrics(scorer, test.images[good], r[good], calibration)
    if test.n_anomaly and test.n_normal:
        result.update(full_metrics(r, test.labels, calibration, seed))
    result.update(
        model_id=ckpt.model_id,
        checkpoint=str(Path(args.checkpoint)),
        protocol=cfg.data.protocol,
        normal=(normal or cfg.data.normal).model_dump(mode="json"),
        anomaly=(anomaly or cfg.data.anomaly).model_dump(mode="json") if (anomaly or cfg.data.anomaly) else None,
        seed=seed,
    )
    if maps is not None and (args.maps or masks is not None):
        result.update(_write_maps_and_pixel_metrics(args.maps, masks, test, maps))
    if args.sensitivity:
        result["sensitivity"] = _sensitivity(scorer, calibration, test, ckpt, seed)
    if args.plots:
        from ..report import top_overlays, write_report  # matplotlib only when asked

        normal, anomaly = test.labels == 0, test.labels == 1
        a = -calibration.decide(r).log_a
        report = write_report(args.plots, scorer, title=f"ama-stream evaluate: model {ckpt.model_id}", metrics=result,
                              normal_images=test.images[normal], r_normal=r[normal],
                              anomaly_images=test.images[anomaly], r_anomaly=r[anomaly],
                              a_normal=a[normal], a_anomaly=a[anomaly],
                              overlays=top_overlays(scorer, [_group("good", test, r, normal),
                                                             _group("defect", test, r, anomaly)], masks))
        result["report"] = str(report)
    line = json.dumps(result, sort_keys=True)
    if args.out:
        atomic_write_bytes(args.out, (line + "\n").encode())
    print(human_table(result, ckpt.score_label), file=sys.stderr, flush=True)
    print(line, file=sys.stdout, flush=True)
    return 0
