"""The label-free sensitivity check: the ladder of implanted defects (every cell, inside the images,
seeded, sizes in the camera's pixels), detection rates against a known scorer, the minimum detectable
size, the warning, and the report table."""
from __future__ import annotations

import numpy as np
import pytest

from ama_stream import sensitivity
from ama_stream.calibration import Calibration, Entry, Policy
from ama_stream.defects import KINDS

GOOD = [np.full((40, 60), 128, np.uint8) for _ in range(5)]


def test_the_ladder_has_every_cell_and_is_seeded():
    cells = [(k, s, c) for k, s, c, _ in sensitivity.probes(GOOD, per_cell=2)]
    assert len(cells) == len(KINDS) * len(sensitivity.SIZES) * len(sensitivity.CONTRASTS) * 2
    a = [img for *_, img in sensitivity.probes(GOOD, seed=3, per_cell=1)]
    b = [img for *_, img in sensitivity.probes(GOOD, seed=3, per_cell=1)]
    c = [img for *_, img in sensitivity.probes(GOOD, seed=4, per_cell=1)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(img.shape == (40, 60) and img.dtype == np.uint8 for img in a)  # gray stays gray, same size


def test_sizes_are_in_the_cameras_pixels_whatever_the_images_were_fitted_to():
    """A 16 px defect on a frame shown to the model at half scale is 8 px there."""
    def changed(scale, size):
        for kind, s, c, img in sensitivity.probes([np.full((80, 120), 128, np.uint8)], [scale], per_cell=1):
            if (kind, s, c) == ("spot", size, max(sensitivity.CONTRASTS)):
                return int((img != 128).sum())

    assert changed(0.5, 16) < changed(1.0, 16) / 2


def brightness_scorer(images) -> np.ndarray:
    """A stand-in score: how far the image's most deviating pixel is from mid-gray."""
    return np.array([float(np.abs(img.astype(float) - 128).max()) for img in images])


def test_detection_rates_follow_the_threshold_and_the_warning_fires_when_nothing_is_caught():
    calibration = Calibration("m", Entry(n=100, mu=0.0, sigma=10.0), Policy("sigma", None, 3.0))  # alerts above 30
    caught = sensitivity.check(brightness_scorer, calibration, GOOD, per_cell=3)
    assert caught.false_alarms == 0.0 and caught.n_good == 5
    assert caught.rates[("spot", 16, 0.6)] == 1.0  # 0.6 x 255 = 153 grey levels away: caught
    assert caught.minimum["spot"] is not None and caught.minimum["spot"] <= 16 and caught.warning() is None
    deaf = Calibration("m", Entry(n=100, mu=0.0, sigma=1000.0), Policy("sigma", None, 3.0))  # alerts above 3000
    missed = sensitivity.check(brightness_scorer, deaf, GOOD, per_cell=2, seen_in_training=("spot", "dent"))
    assert missed.mean_rate == 0.0 and set(missed.minimum.values()) == {None}
    assert "catches no synthetic defect of 32 px or smaller" in missed.warning()
    assert missed.seen_in_training == ("spot",)
    table = missed.table()
    assert table[0].startswith("kind") and "32px" in table[0] and "(seen in training)" in table[1]
    assert len(table) == 1 + len(KINDS) * len(sensitivity.CONTRASTS) + 1
    js = missed.to_json()
    assert js["rates"]["spot"]["0.6"] == [0.0] * len(sensitivity.SIZES) and js["warning"].startswith("WARNING")


def test_seen_kinds_come_from_the_training_config():
    synthetic = {"loss": {"negatives": {"enabled": True, "mode": "synthetic", "kinds": ["spot", "blend"]}}}
    assert sensitivity.seen_kinds(synthetic) == ("spot", "blend")
    assert sensitivity.seen_kinds({"loss": {"negatives": {"enabled": True, "mode": "cube"}}}) == ()
    assert sensitivity.seen_kinds({}) == ()
    with pytest.raises(ValueError, match="needs good images"):
        list(sensitivity.probes([]))
