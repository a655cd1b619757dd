"""The calibration artifact: round trip, strict validation on load, per-camera entries."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ama_stream.calibration import (
    CALIBRATION_VERSION,
    CalibrationError,
    CalibrationFitter,
    Policy,
    content_id,
    load_calibration,
)

MODEL = "0123456789abcdef"


def make_calibration(per_camera: bool = False, policy: Policy = Policy("two-sided", 0.01)):
    rng = np.random.default_rng(0)
    fitter = CalibrationFitter(per_camera=per_camera, max_sample=3000)
    for _ in range(5):
        r = np.concatenate([rng.normal(100.0, 10.0, 800), rng.normal(300.0, 5.0, 400)])
        fitter.update(r, ["cam-a"] * 800 + ["cam-b"] * 400)
    calibration, notes = fitter.finish(MODEL, policy, {"spec": "synthetic"}, min_camera_frames=100)
    assert notes == []
    return calibration


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "calibration.json"
    make_calibration(per_camera=True).save(path)
    return path


def rewrite(path: Path, edit, keep_id: bool = True) -> None:
    """Edits the JSON; with keep_id the calibration_id is recomputed so only the edit is wrong."""
    payload = json.loads(path.read_text())
    edit(payload)
    if keep_id:
        payload["calibration_id"] = content_id({k: v for k, v in payload.items() if k != "calibration_id"})
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize("policy", [Policy("two-sided", 0.01), Policy("upper", 0.05), Policy.make("sigma", k=2.0)])
def test_round_trip_gives_identical_decisions_and_id(tmp_path, policy):
    calibration = make_calibration(per_camera=True, policy=policy)
    path = tmp_path / "c.json"
    calibration.save(path)
    loaded = load_calibration(path, MODEL)
    assert loaded.calibration_id == calibration.calibration_id and loaded.calibration_id.startswith("cal-")
    assert loaded.policy == policy and set(loaded.cameras) == {"cam-a", "cam-b"}
    r = np.random.default_rng(1).normal(150.0, 100.0, 2000)
    cameras = ["cam-a", "cam-b", None, "cam-z"] * 500
    a, b = calibration.decide(r, cameras), loaded.decide(r, cameras)
    for field in ("z", "log_a", "p_value", "anomaly", "threshold"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_the_file_says_what_it_is(saved):
    payload = json.loads(saved.read_text())
    assert payload["format"] == "ama-stream/calibration" and payload["version"] == CALIBRATION_VERSION
    assert payload["model_id"] == MODEL and payload["policy"] == {"name": "two-sided", "target_fpr": 0.01}
    assert payload["source"] == {"spec": "synthetic", "frames": 6000, "skipped_nonfinite": 0}
    g = payload["global"]
    assert g["n"] == 6000 and len(g["sample"]) == 3000 and g["sigma"] > 0
    assert g["alert_r_above"] == pytest.approx(g["mu"] + g["threshold"] * g["sigma"])
    assert payload["created_at"].endswith("+00:00")


def test_per_camera_entries_apply_to_their_cameras_only():
    calibration = make_calibration(per_camera=True)
    a, b, g = calibration.cameras["cam-a"], calibration.cameras["cam-b"], calibration.global_entry
    assert a.mu == pytest.approx(100.0, abs=1.0) and b.mu == pytest.approx(300.0, abs=1.0)
    r = np.array([100.0, 100.0, 100.0, 100.0, 300.0])
    d = calibration.decide(r, ["cam-a", "cam-b", "cam-unknown", None, "cam-b"])
    assert np.allclose(d.z, [(100 - a.mu) / a.sigma, (100 - b.mu) / b.sigma, (100 - g.mu) / g.sigma,
                             (100 - g.mu) / g.sigma, (300 - b.mu) / b.sigma])
    assert list(d.anomaly) == [False, True, False, False, False]  # 100 is normal for cam-a, 40 sigma off for cam-b
    assert d.threshold[0] == calibration.rule("cam-a").threshold != calibration.rule("cam-b").threshold
    assert d.threshold[2] == d.threshold[3] == calibration.rule().threshold
    without = calibration.decide(r)  # no camera ids: the global entry for everything
    assert np.allclose(without.z, (r - g.mu) / g.sigma)


def test_cameras_with_too_few_frames_fall_back_to_the_global_entry():
    fitter = CalibrationFitter(per_camera=True)
    rng = np.random.default_rng(3)
    fitter.update(rng.normal(0, 1, 1000), ["big"] * 950 + ["small"] * 50)
    calibration, notes = fitter.finish(MODEL, Policy("two-sided", 0.01), {"spec": "x"}, min_camera_frames=100)
    assert set(calibration.cameras) == {"big"}
    assert notes == ["camera 'small': only 50 frames (< 100); it uses the global entry"]


# --------------------------------------------------------------------------- refusals


def test_refuses_a_calibration_for_another_model(saved):
    with pytest.raises(CalibrationError, match=f"{saved}: calibration is for model {MODEL}, not for this checkpoint's model ffff"):
        load_calibration(saved, "ffff")


@pytest.mark.parametrize("where", ["global", "cam-b"])
@pytest.mark.parametrize("sigma", [0.0, -2.0])
def test_refuses_sigma_not_positive(saved, where, sigma):
    def edit(p):
        (p["global"] if where == "global" else p["cameras"][where])["sigma"] = sigma
    rewrite(saved, edit)
    with pytest.raises(CalibrationError, match=r"sigma must be a finite number > 0"):
        load_calibration(saved, MODEL)


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -2])
def test_refuses_a_truncated_file(saved, cut):
    data = saved.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    saved.write_bytes(data[:end])
    with pytest.raises(CalibrationError, match=f"{saved}: corrupt or truncated calibration JSON"):
        load_calibration(saved, MODEL)


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00garbage", "not UTF-8"),
    (b"[1, 2, 3]", "not an ama-stream calibration"),
    (b'{"format": "something/else"}', "not an ama-stream calibration"),
])
def test_refuses_a_corrupt_or_foreign_file(saved, content, message):
    saved.write_bytes(content)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(saved, MODEL)


def test_refuses_non_finite_numbers(saved):
    saved.write_text(saved.read_text().replace('"mu": ', '"mu": NaN, "_old_mu": ', 1))
    with pytest.raises(CalibrationError, match="non-finite number NaN"):
        load_calibration(saved, MODEL)


def test_refuses_infinite_numbers_spelled_as_overflow(saved):
    text = saved.read_text()
    start = text.index('"sample": [') + len('"sample": [')
    end = text.index(",", start)
    saved.write_text(text[:start] + "-1e400" + text[end:])  # valid JSON syntax, parsed as -inf
    with pytest.raises(CalibrationError, match="number -1e400 is out of range"):
        load_calibration(saved, MODEL)


def test_refuses_an_unknown_schema_version(saved):
    rewrite(saved, lambda p: p.__setitem__("version", CALIBRATION_VERSION + 1))
    with pytest.raises(CalibrationError, match=f"version {CALIBRATION_VERSION + 1} is not supported"):
        load_calibration(saved, MODEL)


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["policy"].__setitem__("name", "median"), "unknown policy 'median'"),
    (lambda p: p["policy"].__setitem__("target_fpr", 0), r"target_fpr in \(0, 1\)"),
    (lambda p: p["global"].__setitem__("threshold", 9.0), "global.threshold is 9.0 but its policy and sample imply"),
    (lambda p: p["global"].__setitem__("n", 1), "global.n must be an integer >= 2"),
    (lambda p: p["global"]["sample"].reverse(), "sample must be sorted"),
    (lambda p: p["global"].pop("mu"), "global: missing mu"),
    (lambda p: p.__setitem__("extra", 1), "unknown field"),
    (lambda p: p["cameras"].__setitem__("", p["global"]), "empty camera id"),
])
def test_refuses_invalid_fields_naming_them(saved, edit, message):
    rewrite(saved, edit)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(saved, MODEL)


def test_refuses_content_edited_after_writing(saved):
    rewrite(saved, lambda p: p["source"].__setitem__("spec", "folder:/somewhere/else"), keep_id=False)
    with pytest.raises(CalibrationError, match="content does not match its calibration_id"):
        load_calibration(saved, MODEL)


def test_refuses_missing_files_and_directories(tmp_path):
    with pytest.raises(CalibrationError, match="no such calibration file"):
        load_calibration(tmp_path / "nope.json", MODEL)
    with pytest.raises(CalibrationError, match="is a directory"):
        load_calibration(tmp_path, MODEL)


def test_an_interrupted_save_leaves_the_old_file_intact(saved, monkeypatch):
    before = saved.read_bytes()
    replacement = make_calibration(policy=Policy("upper", 0.05))

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        replacement.save(saved)
    assert saved.read_bytes() == before and not list(saved.parent.glob(".*.tmp"))
    assert load_calibration(saved, MODEL).policy == Policy("two-sided", 0.01)


def test_crafted_input_is_a_calibration_error_naming_its_origin(tmp_path):
    """A file or control-topic message anyone may write: every refusal is CalibrationError with the
    origin, never an exception the agent does not expect (it used to exit on these)."""
    from ama_stream.calibration import parse_calibration

    good = make_calibration().to_json_bytes().decode()
    crafted = good.replace('"source":{', '"source":{"x":1e999,', 1) if '"source":{' in good else None
    if crafted is None:  # pretty-printed JSON
        crafted = good.replace('"source": {', '"source": {"x": 1e999, ', 1)
    assert crafted != good
    cases = {
        "huge number": crafted.encode(),
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "oversize": b" " * (64 * 2**20 + 1),
        "wrong types": good.replace('"cameras"', '"cameras_"').encode(),
    }
    for name, data in cases.items():
        with pytest.raises(CalibrationError, match="^line3.json: "):
            parse_calibration(data, MODEL, "line3.json")
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_bytes(data)
        with pytest.raises(CalibrationError, match=str(path)):
            load_calibration(path, MODEL)
