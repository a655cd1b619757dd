"""ama-stream: streaming image anomaly detection with Adversarial Mirrored AutoEncoders.

The Python API, for scoring images without Kafka:

    from ama_stream import Scorer, fit_calibration, load_calibration, load_images_from_folder

    scorer = Scorer("runs/line3/model.pt", device="auto")        # loads the checkpoint once
    good = load_images_from_folder("/data/line3/fresh-good")      # native uint8 images
    calibration = fit_calibration(scorer.score_images(good).r, scorer.model_id)
    decisions = calibration.decide(scorer.score_images(load_images_from_folder("/data/line3/today")).r)
    print(decisions.anomaly.sum(), "anomalies")

Names (imported on first use, so `import ama_stream` stays cheap for the command line):
Scorer, Scores (ama_stream.scoring); load_checkpoint, Checkpoint (ama_stream.checkpoint);
Calibration, Policy, fit_calibration, load_calibration (ama_stream.calibration);
load_images_from_folder (ama_stream.sources).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "Scorer": "scoring",
    "Scores": "scoring",
    "load_checkpoint": "checkpoint",
    "Checkpoint": "checkpoint",
    "Calibration": "calibration",
    "Policy": "calibration",
    "fit_calibration": "calibration",
    "load_calibration": "calibration",
    "load_images_from_folder": "sources",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'ama_stream' has no attribute {name!r}")
