"""Reading a calibration artifact that anyone may have written: every field checked, the content
checked against its calibration_id; the only exception raised is CalibrationError."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import read_file_bytes
from .artifact import Calibration, content_id
from .policy import CALIBRATION_FORMAT, CALIBRATION_VERSION, CalibrationError, Entry, Policy, Rule, is_number

_REL_TOL = 1e-9  # stored thresholds must match what their policy and sample imply
_TOP_KEYS = {"format", "version", "calibration_id", "model_id", "created_at", "source", "policy", "global", "cameras"}
_ENTRY_KEYS = {"n", "mu", "sigma", "threshold", "expected_fpr", "alert_r_below", "alert_r_above", "sample"}


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} (JSON allows only finite numbers)")


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=1e-12)


def _parse_entry(data: Any, where: str, policy: Policy) -> Rule:
    if not isinstance(data, dict):
        raise CalibrationError(f"{where} must be an object")
    missing = _ENTRY_KEYS - data.keys()
    unknown = data.keys() - _ENTRY_KEYS
    if missing or unknown:
        raise CalibrationError(f"{where}: " + "; ".join(
            ([f"missing {', '.join(sorted(missing))}"] if missing else []) + ([f"unknown {', '.join(sorted(unknown))}"] if unknown else [])))
    n = data["n"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise CalibrationError(f"{where}.n must be an integer >= 2, got {n!r}")
    for key in ("mu", "sigma", "threshold", "expected_fpr", "alert_r_above"):
        if not is_number(data[key]):
            raise CalibrationError(f"{where}.{key} must be a number, got {data[key]!r}")
    if data["alert_r_below"] is not None and not is_number(data["alert_r_below"]):
        raise CalibrationError(f"{where}.alert_r_below must be a number or null, got {data['alert_r_below']!r}")
    sample = data["sample"]
    if not isinstance(sample, list) or len(sample) < 2 or not all(is_number(v) for v in sample):
        raise CalibrationError(f"{where}.sample must be a list of at least 2 numbers")
    values = np.asarray(sample, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise CalibrationError(f"{where}.sample holds non-finite numbers")
    if len(values) > n:
        raise CalibrationError(f"{where}.sample holds {len(values)} scores but n is {n}")
    if np.any(np.diff(values) < 0):
        raise CalibrationError(f"{where}.sample must be sorted ascending")
    try:
        rule = Rule(Entry(n=n, mu=float(data["mu"]), sigma=float(data["sigma"]), sample=values), policy)
    except CalibrationError as exc:
        raise CalibrationError(f"{where}: {exc}") from None
    low, high = rule.alert_r_bounds()
    derived = {"threshold": rule.threshold, "expected_fpr": rule.expected_fpr, "alert_r_below": low, "alert_r_above": high}
    for key, value in derived.items():
        if not _close(data[key], value):
            raise CalibrationError(f"{where}.{key} is {data[key]!r} but its policy and sample imply {value!r}")
    return rule


MAX_CALIBRATION_BYTES = 64 * 2**20  # 1000 cameras x 20,000 sample scores is about 25 MiB of JSON


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_calibration(data: bytes, expected_model_id: str | None, origin: str = "calibration") -> Calibration:
    """Validates a calibration artifact; CalibrationError naming `origin` and the field when anything is off.

    Whatever the input (a file anyone can edit, a message anyone may publish on the control topic),
    the only exception is CalibrationError: oversize input, out-of-range numbers anywhere (also in
    free-form fields such as `source`), nesting too deep to parse, and any check below."""
    if len(data) > MAX_CALIBRATION_BYTES:
        raise CalibrationError(f"{origin}: {len(data)} bytes is larger than a calibration can be ({MAX_CALIBRATION_BYTES})")
    try:
        payload = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise CalibrationError(f"{origin}: not a calibration file (not UTF-8 text)") from None
    except RecursionError:
        raise CalibrationError(f"{origin}: JSON nested too deeply to be a calibration") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, so is _reject_constant's
        raise CalibrationError(f"{origin}: corrupt or truncated calibration JSON ({exc})") from None
    try:
        return _validated(payload, expected_model_id, origin)
    except CalibrationError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:  # anything a crafted value trips
        raise CalibrationError(f"{origin}: invalid calibration ({type(exc).__name__}: {str(exc)[:200]})") from None


def _validated(payload: Any, expected_model_id: str | None, origin: str) -> Calibration:
    if not isinstance(payload, dict) or payload.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"{origin}: not an ama-stream calibration (missing format {CALIBRATION_FORMAT!r})")
    version = payload.get("version")
    if version != CALIBRATION_VERSION:
        raise CalibrationError(f"{origin}: calibration version {version!r} is not supported "
                               f"(this ama-stream reads version {CALIBRATION_VERSION})")
    missing, unknown = _TOP_KEYS - payload.keys(), payload.keys() - _TOP_KEYS
    if missing:
        raise CalibrationError(f"{origin}: missing field(s) {', '.join(sorted(missing))}")
    if unknown:
        raise CalibrationError(f"{origin}: unknown field(s) {', '.join(sorted(unknown))}")
    model_id = payload["model_id"]
    if not isinstance(model_id, str) or not model_id:
        raise CalibrationError(f"{origin}: model_id must be a non-empty string")
    if expected_model_id is not None and model_id != expected_model_id:
        raise CalibrationError(f"{origin}: calibration is for model {model_id}, not for this checkpoint's model "
                               f"{expected_model_id}; re-run ama-stream calibrate with this checkpoint")
    for key, kind in (("calibration_id", str), ("created_at", str), ("source", dict), ("policy", dict), ("cameras", dict)):
        if not isinstance(payload[key], kind):
            raise CalibrationError(f"{origin}: {key} must be a JSON {'object' if kind is dict else 'string'}")
    policy_data = dict(payload["policy"])
    extra = policy_data.keys() - {"name", "target_fpr", "k"}
    if extra:
        raise CalibrationError(f"{origin}: policy has unknown field(s) {', '.join(sorted(extra))}")
    try:
        policy = Policy(policy_data.get("name"), policy_data.get("target_fpr"), policy_data.get("k"))
    except CalibrationError as exc:
        raise CalibrationError(f"{origin}: policy: {exc}") from None
    global_rule = _parse_entry(payload["global"], f"{origin}: global", policy)
    cameras: dict[str, Entry] = {}
    for camera, entry in payload["cameras"].items():
        if not camera:
            raise CalibrationError(f"{origin}: cameras has an empty camera id")
        cameras[camera] = _parse_entry(entry, f"{origin}: cameras[{camera!r}]", policy).entry
    expected_id = content_id({k: v for k, v in payload.items() if k != "calibration_id"})
    if payload["calibration_id"] != expected_id:
        raise CalibrationError(f"{origin}: content does not match its calibration_id {payload['calibration_id']!r} "
                               "(edited or corrupted after it was written); re-run ama-stream calibrate")
    return Calibration(model_id, global_rule.entry, policy, cameras, source=payload["source"],
                       created_at=payload["created_at"], calibration_id=expected_id)


def load_calibration(path: str | os.PathLike, expected_model_id: str | None) -> Calibration:
    """Reads and validates a calibration file (refuses one made for another model)."""
    path = Path(path)
    data = read_file_bytes(path, "calibration", CalibrationError, MAX_CALIBRATION_BYTES)
    return parse_calibration(data, expected_model_id, str(path))
