"""Drift of live scores from their calibration, on synthetic score streams."""
import math

import numpy as np
import pytest
from scipy import stats

from ama_stream.calibration import Calibration, CalibrationFitter, Policy
from ama_stream.drift import DriftBand, DriftMonitor, Expectation

MU, SIGMA = 200.0, 20.0


def calibration(policy=Policy("two-sided", 0.01)) -> Calibration:
    fitter = CalibrationFitter()
    fitter.update(np.random.default_rng(0).normal(MU, SIGMA, 20_000))
    return fitter.finish("m", policy, {"spec": "synthetic"})[0]


def stream(monitor: DriftMonitor, cal: Calibration, r_by_camera: dict, batches: int, batch: int = 50, seed: int = 1):
    """Feeds `batches` mixed batches; r_by_camera maps camera -> (loc, scale) of its R-scores."""
    rng = np.random.default_rng(seed)
    cameras = list(r_by_camera)
    changes = []
    for _ in range(batches):
        ids = [cameras[i % len(cameras)] for i in range(batch)]
        r = np.array([rng.normal(*r_by_camera[c]) for c in ids])
        d = cal.decide(r, ids)
        changes.extend((c.camera, c.drifting) for c in monitor.observe(ids, d.z, d.anomaly))
    return changes


def test_no_drift_on_data_like_the_calibration():
    cal = calibration()
    monitor = DriftMonitor(cal)
    changes = stream(monitor, cal, {"a": (MU, SIGMA), "b": (MU, SIGMA)}, batches=600)  # 15,000 frames per camera
    assert changes == []
    for state in monitor.cameras.values():
        assert state.judged and not state.drifting
        assert state.z_mean == pytest.approx(state.expected.z_mean, abs=0.1)
        assert state.alert_rate == pytest.approx(0.01, abs=0.012)


def test_a_shifted_camera_drifts_and_the_other_does_not():
    cal = calibration()
    monitor = DriftMonitor(cal)
    changes = stream(monitor, cal, {"ok": (MU, SIGMA), "shifted": (MU + 0.8 * SIGMA, SIGMA)}, batches=100)
    assert changes == [("shifted", True)]
    state = monitor.cameras["shifted"]
    assert any(reason.startswith("mean z of normal frames +0.") for reason in state.reasons)
    assert any(reason.startswith("alert rate") for reason in state.reasons)  # the upper tail fills up too
    assert not monitor.cameras["ok"].drifting


def test_a_noisier_camera_drifts_on_spread_and_alert_rate():
    cal = calibration()
    monitor = DriftMonitor(cal)
    stream(monitor, cal, {"noisy": (MU, 3 * SIGMA)}, batches=40)
    state = monitor.cameras["noisy"]
    assert state.drifting and any(reason.startswith("spread of z") for reason in state.reasons)
    assert any(reason.startswith("alert rate") for reason in state.reasons)


def test_a_too_uniform_camera_drifts_on_spread_alone():
    cal = calibration()
    monitor = DriftMonitor(cal)
    stream(monitor, cal, {"flat": (MU, 0.4 * SIGMA)}, batches=40)
    state = monitor.cameras["flat"]
    assert state.drifting and len(state.reasons) == 1 and state.reasons[0].startswith("spread of z 0.4")


def test_drift_recovers_when_the_camera_comes_back_and_resets_with_a_new_calibration():
    cal = calibration()
    band = DriftBand(window=400, min_frames=200)
    monitor = DriftMonitor(cal, band)
    assert stream(monitor, cal, {"c": (MU + SIGMA, SIGMA)}, batches=10) == [("c", True)]
    assert stream(monitor, cal, {"c": (MU, SIGMA)}, batches=20, seed=2) == [("c", False)]  # the window refilled
    monitor.reset(calibration(Policy("upper", 0.05)))
    assert monitor.cameras == {} and monitor.calibration_id != cal.calibration_id


def test_expectations_follow_the_rule():
    fallback = Calibration.from_checkpoint(type("C", (), {"model_id": "m", "mu": 0.0, "sigma": 1.0, "n_train": 9,
                                                         "created_at": ""})())
    e = Expectation.of(fallback.rule())
    truncated = stats.truncnorm(-3, 3)
    assert e.z_mean == 0.0 and e.z_std == pytest.approx(truncated.std(), rel=1e-9)
    assert e.alert_rate == pytest.approx(math.erfc(3 / math.sqrt(2)))
    e = Expectation.of(calibration(Policy("upper", 0.05)).rule())
    assert e.alert_rate == pytest.approx(0.05, abs=1e-4)
    assert e.z_mean == pytest.approx(stats.truncnorm(-np.inf, stats.norm.ppf(0.95)).mean(), abs=0.03)


def test_camera_count_is_bounded():
    cal = calibration()
    monitor = DriftMonitor(cal, max_cameras=3)
    monitor.observe([f"cam-{i}" for i in range(5)], np.zeros(5), np.zeros(5, bool))
    assert set(monitor.cameras) == {"cam-0", "cam-1", "cam-2"} and monitor.untracked == 2


def test_fifty_thousand_long_camera_ids_leave_no_trace_past_the_bound():
    """Camera ids are outsider input: 50,000 distinct 4 KB ids must not be remembered (before: a set of
    them grew by 400 MiB for good)."""
    import sys

    monitor = DriftMonitor(calibration(), max_cameras=10)
    for batch in range(50):
        ids = [f"{batch:03d}-{i:04d}-" + "x" * 4096 for i in range(1000)]
        monitor.observe(ids, np.zeros(1000), np.zeros(1000, bool))
    assert len(monitor.cameras) == 10 and monitor.untracked == 50_000 - 10
    held = sum(sys.getsizeof(k) for k in monitor.cameras) + sys.getsizeof(monitor.__dict__)
    assert held < 10 * 5000 + 10_000  # the ten tracked ids, nothing of the other 49,990


def test_bad_bands_are_refused():
    with pytest.raises(ValueError, match="min_frames"):
        DriftBand(window=10, min_frames=20)
    with pytest.raises(ValueError, match="std_ratio"):
        DriftBand(std_ratio=(1.5, 2.0))
