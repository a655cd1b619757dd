"""Turning R-scores into decisions (z, log A, p-value, anomaly flag) under a calibration. No Kafka here.

A calibration is fitted on known-normal frames (`ama-stream calibrate`) and kept apart from the
checkpoint, in a versioned JSON artifact tied to the model by `Checkpoint.model_id`:

    cal = load_calibration(path, scorer.model_id)   # or Calibration.from_checkpoint(checkpoint)
    d = cal.decide(r_scores, camera_ids)            # Decisions, arrays of length B
    cal.calibration_id                              # carried by every record

Each entry (the global one, and optionally one per camera) holds mu and sigma of the R-scores
(z = (R - mu) / sigma, log A = the Gaussian log density, paper eq. 6) and a sorted uniform sample
of the calibration R-scores. A policy turns z into a statistic s and alerts when s > threshold:

    two-sided  s = |z|   threshold = the empirical (1 - target_fpr) quantile of s on the sample
    upper      s = z     same, but only unusually HIGH R alerts
    sigma      s = |z|   threshold = k (the classic rule)

The p-value is conformal: p = (1 + #{sample s' >= s}) / (m + 1) over the m sample scores, so on
normal data it is uniform and, for the quantile policies, anomaly <=> p <= target_fpr exactly.
The checkpoint-only fallback has no sample: it is the paper's two-sided Gaussian, |z| > 3, with
the Gaussian two-sided tail as p-value.

Artifact (JSON, schema CALIBRATION_FORMAT / CALIBRATION_VERSION):

    format, version, calibration_id   "cal-" + sha256 of the canonical content (checked on load)
    model_id                          the checkpoint it belongs to (Checkpoint.model_id)
    created_at                        ISO-8601 UTC
    source                            where the scores came from ({"spec": ..., "frames": ...})
    policy                            {"name": "two-sided"|"upper", "target_fpr": F} or {"name": "sigma", "k": K}
    global                            entry
    cameras                           {camera id: entry}; unknown cameras use the global entry
    entry = {n, mu, sigma, threshold, expected_fpr, alert_r_below, alert_r_above, sample}
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .fileio import atomic_write_bytes, read_file_bytes
from .streamstats import RunningStats

CALIBRATION_FORMAT = "ama-stream/calibration"
CALIBRATION_VERSION = 1
POLICIES = ("two-sided", "upper", "sigma")
DEFAULT_POLICY = "two-sided"
DEFAULT_TARGET_FPR = 0.001
DEFAULT_K = 3.0
DEFAULT_MAX_SAMPLE = 20_000
DEFAULT_MIN_CAMERA_FRAMES = 100
STABLE_TAIL_COUNT = 10  # a quantile threshold wants about this many sample scores beyond it
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_REL_TOL = 1e-9
_TOP_KEYS = {"format", "version", "calibration_id", "model_id", "created_at", "source", "policy", "global", "cameras"}
_ENTRY_KEYS = {"n", "mu", "sigma", "threshold", "expected_fpr", "alert_r_below", "alert_r_above", "sample"}


class CalibrationError(ValueError):
    """A calibration that cannot be used (corrupt, for another model, invalid statistics)."""


@dataclass(frozen=True)
class Decisions:
    z: np.ndarray
    log_a: np.ndarray
    p_value: np.ndarray
    anomaly: np.ndarray  # bool
    threshold: np.ndarray  # the threshold in force for each frame, on the policy's statistic (|z| or z)


def gaussian_z_log_a(r: np.ndarray, mu: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    z = (np.asarray(r, dtype=np.float64) - mu) / sigma
    return z, -0.5 * z * z - math.log(sigma) - LOG_SQRT_2PI


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_erfc = np.frompyfunc(math.erfc, 1, 1)


def gaussian_two_sided_p(z: np.ndarray) -> np.ndarray:
    """P(|Z| >= |z|) for a standard normal Z."""
    return _erfc(np.abs(np.asarray(z, dtype=np.float64)) / math.sqrt(2.0)).astype(np.float64)


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    name: str = DEFAULT_POLICY
    target_fpr: float | None = DEFAULT_TARGET_FPR  # two-sided / upper
    k: float | None = None  # sigma

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise CalibrationError(f"unknown policy {self.name!r}; use one of {', '.join(POLICIES)}")
        if self.name == "sigma":
            if not _is_number(self.k) or not (math.isfinite(self.k) and self.k > 0):
                raise CalibrationError(f"policy sigma needs k > 0, got {self.k!r}")
            if self.target_fpr is not None:
                raise CalibrationError("policy sigma takes k, not target_fpr")
        else:
            if not _is_number(self.target_fpr) or not 0.0 < self.target_fpr < 1.0:
                raise CalibrationError(f"policy {self.name} needs target_fpr in (0, 1), got {self.target_fpr!r}")
            if self.k is not None:
                raise CalibrationError(f"policy {self.name} takes target_fpr, not k")

    @classmethod
    def make(cls, name: str = DEFAULT_POLICY, target_fpr: float | None = None, k: float | None = None) -> "Policy":
        """A policy from command-line style options: the unused one may be left None."""
        if name == "sigma":
            return cls(name, None, DEFAULT_K if k is None else float(k))
        return cls(name, DEFAULT_TARGET_FPR if target_fpr is None else float(target_fpr), None)

    def statistic(self, z: np.ndarray) -> np.ndarray:
        return z if self.name == "upper" else np.abs(z)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k} if self.name == "sigma" else {"name": self.name, "target_fpr": self.target_fpr}

    def describe(self) -> str:
        if self.name == "sigma":
            return f"sigma: alert when |z| > {self.k:g}"
        side = "|z|" if self.name == "two-sided" else "z"
        return f"{self.name}: alert when {side} exceeds its empirical {1 - self.target_fpr:.6g} quantile"


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """The statistics of one camera (or of all): mu, sigma, n and a sorted sample of the R-scores."""

    n: int
    mu: float
    sigma: float
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0))  # sorted; empty: Gaussian model only

    def __post_init__(self) -> None:
        if not (_is_number(self.mu) and math.isfinite(self.mu)):
            raise CalibrationError(f"mu must be a finite number, got {self.mu!r}")
        if not (_is_number(self.sigma) and math.isfinite(self.sigma) and self.sigma > 0):
            raise CalibrationError(f"sigma must be a finite number > 0, got {self.sigma!r}")


class Rule:
    """An entry compiled under a policy: the threshold and the sorted calibration statistics."""

    def __init__(self, entry: Entry, policy: Policy):
        self.entry = entry
        self.policy = policy
        s = policy.statistic((entry.sample - entry.mu) / entry.sigma) if entry.sample.size else None
        self.scores: np.ndarray | None = None if s is None else np.sort(s)
        self.threshold, self.expected_fpr = self._threshold()

    @property
    def m(self) -> int:
        return 0 if self.scores is None else int(self.scores.size)

    def _threshold(self) -> tuple[float, float]:
        if self.policy.name == "sigma":
            k = float(self.policy.k)
            if self.scores is None:  # the Gaussian's own false-alarm rate
                return k, float(math.erfc(k / math.sqrt(2.0)))
            return k, float(np.mean(self.scores > k))
        if self.scores is None:
            raise CalibrationError(f"policy {self.policy.name} needs calibration scores, the entry has none")
        m = self.m
        # q of m+1 exchangeable scores lie strictly above the threshold: P(alert | normal) = q / (m + 1)
        q = math.floor((m + 1) * self.policy.target_fpr)
        if q == 0:  # the target is finer than the sample resolves: alert beyond everything seen
            return float(self.scores[-1]), 1.0 / (m + 1)
        return float(self.scores[m - q]), q / (m + 1)

    def p_values(self, z: np.ndarray) -> np.ndarray:
        if self.scores is None:
            return gaussian_two_sided_p(z)
        s = self.policy.statistic(z)
        at_least = self.m - np.searchsorted(self.scores, s, side="left")
        p = (1.0 + at_least) / (self.m + 1.0)
        return np.where(np.isfinite(s), p, np.nan)

    def alert_r_bounds(self) -> tuple[float | None, float]:
        """R below the first / above the second alerts (None: no lower bound)."""
        mu, sigma, t = self.entry.mu, self.entry.sigma, self.threshold
        return (None if self.policy.name == "upper" else mu - t * sigma), mu + t * sigma

    def warning(self, label: str) -> str | None:
        """Why this threshold is shaky, or None."""
        if self.policy.name == "sigma" or self.scores is None:
            return None
        fpr = self.policy.target_fpr
        wanted = math.ceil(STABLE_TAIL_COUNT / fpr)
        if self.m >= wanted:
            return None
        capped = f" (a sample of {self.m} of {self.entry.n} scores)" if self.entry.n > self.m else ""
        return (f"{label}: {self.m} calibration scores{capped} for target FPR {fpr:g}; about {wanted} are needed "
                f"for a stable threshold (expected false-alarm rate {self.expected_fpr:.3g})")


# --------------------------------------------------------------------------- the calibration


# a calibration must place the model's held-out good images within these bounds (implausible_for)
PLAUSIBLE_SHIFT_Z = 10.0
PLAUSIBLE_SPREAD = 20.0


class Calibration:
    """A decision rule for one model: a policy, a global entry and optional per-camera entries."""

    def __init__(
        self,
        model_id: str,
        global_entry: Entry,
        policy: Policy = Policy(),
        cameras: Mapping[str, Entry] | None = None,
        *,
        source: Mapping[str, Any] | None = None,
        created_at: str | None = None,
        calibration_id: str | None = None,
    ):
        self.model_id = model_id
        self.policy = policy
        self.global_entry = global_entry
        self.cameras = dict(cameras or {})
        self.source = dict(source or {})
        self.created_at = created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._global_rule = Rule(global_entry, policy)
        self._rules = {camera: Rule(entry, policy) for camera, entry in self.cameras.items()}
        self.calibration_id = calibration_id or content_id(self.to_payload(with_id=False))

    @classmethod
    def from_checkpoint(cls, checkpoint, k: float = DEFAULT_K) -> "Calibration":
        """The checkpoint's training mu/sigma with the paper's two-sided Gaussian rule |z| > k."""
        return cls(
            model_id=checkpoint.model_id,
            global_entry=Entry(n=int(checkpoint.n_train), mu=float(checkpoint.mu), sigma=float(checkpoint.sigma)),
            policy=Policy("sigma", None, float(k)),
            source={"spec": "checkpoint"},
            created_at=checkpoint.created_at or None,
            calibration_id=f"checkpoint:{checkpoint.model_id}",
        )

    # the global entry's statistics, for callers that think of one Gaussian
    @property
    def mu(self) -> float:
        return self.global_entry.mu

    @property
    def sigma(self) -> float:
        return self.global_entry.sigma

    def implausible_for(self, metrics: Mapping[str, Any]) -> str | None:
        """Why this calibration cannot belong to a model whose held-out good images scored as `metrics`
        records (holdout_r_mean / holdout_r_std, written by training), or None. An entry whose mu puts
        those images more than PLAUSIBLE_SHIFT_Z of its sigmas away, or whose sigma is more than
        PLAUSIBLE_SPREAD times off their spread, would move the false-alarm rate on them by orders of
        magnitude (mu = 1e150 silences every alert): such a calibration is refused. Models without
        those records are not checked."""
        mean, std = metrics.get("holdout_r_mean"), metrics.get("holdout_r_std")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, std)) or std <= 0:
            return None
        for name, entry in (("global", self.global_entry), *((f"camera {c!r}", e) for c, e in self.cameras.items())):
            shift = abs(mean - entry.mu) / entry.sigma
            spread = std / entry.sigma
            if not shift <= PLAUSIBLE_SHIFT_Z or not 1 / PLAUSIBLE_SPREAD <= spread <= PLAUSIBLE_SPREAD:
                return (f"its {name} entry (mu {entry.mu:.6g}, sigma {entry.sigma:.6g}) puts the model's held-out good "
                        f"images (mean {mean:.6g}, std {std:.6g}) at z = {(mean - entry.mu) / entry.sigma:.3g} with "
                        f"spread x{spread:.3g}: not a calibration of this model's scores (limits: |z| <= "
                        f"{PLAUSIBLE_SHIFT_Z}, spread within x{1 / PLAUSIBLE_SPREAD:g}-x{PLAUSIBLE_SPREAD})")
        return None

    def rule(self, camera_id: str | None = None) -> Rule:
        """The rule applied to a camera's frames: its own entry, else the global one."""
        return self._rules.get(camera_id, self._global_rule) if camera_id is not None else self._global_rule

    def decide(self, r: np.ndarray, camera_ids: Sequence[str | None] | None = None) -> Decisions:
        r = np.asarray(r, dtype=np.float64).reshape(-1)
        if camera_ids is not None and len(camera_ids) != r.size:
            raise ValueError(f"{len(camera_ids)} camera ids for {r.size} scores")
        z = np.empty(r.size)
        log_a = np.empty(r.size)
        p = np.empty(r.size)
        threshold = np.empty(r.size)
        statistic = np.empty(r.size)
        for rule, idx in self._groups(camera_ids, r.size):
            zi, log_a[idx] = gaussian_z_log_a(r[idx], rule.entry.mu, rule.entry.sigma)
            z[idx] = zi
            p[idx] = rule.p_values(zi)
            threshold[idx] = rule.threshold
            statistic[idx] = self.policy.statistic(zi)
        # a score that is not a number is never normal (NaN > threshold would say it is): the agent
        # dead-letters such frames before deciding; anyone else deciding on them sees an anomaly
        anomaly = (statistic > threshold) | ~np.isfinite(r)
        return Decisions(z=z, log_a=log_a, p_value=p, anomaly=anomaly, threshold=threshold)

    def _groups(self, camera_ids: Sequence[str | None] | None, size: int):
        if camera_ids is None or not self._rules:
            yield self._global_rule, np.arange(size)
            return
        by_rule: dict[int, tuple[Rule, list[int]]] = {}
        for i, camera in enumerate(camera_ids):
            rule = self.rule(camera)
            by_rule.setdefault(id(rule), (rule, []))[1].append(i)
        for rule, idx in by_rule.values():
            yield rule, np.asarray(idx)

    def warnings(self) -> list[str]:
        rules = [("global", self._global_rule)] + [(f"camera {c!r}", rule) for c, rule in self._rules.items()]
        return [w for label, rule in rules if (w := rule.warning(label)) is not None]

    def summary(self) -> str:
        """A few lines for people: n, mu, sigma, the threshold and the expected false-alarm rate."""
        lines = [f"calibration {self.calibration_id} for model {self.model_id}", f"  policy    {self.policy.describe()}"]
        rows = [("global", self._global_rule)] + [(f"camera {c}", rule) for c, rule in sorted(self._rules.items())]
        for label, rule in rows:
            e = rule.entry
            low, high = rule.alert_r_bounds()
            stat = "z" if self.policy.name == "upper" else "|z|"
            r_range = f"R > {high:.6g}" if low is None else f"R < {low:.6g} or R > {high:.6g}"
            lines.append(f"  {label:<9} n={e.n} mu={e.mu:.6g} sigma={e.sigma:.6g} threshold {stat} > {rule.threshold:.4f} "
                         f"({r_range}) expected false-alarm rate {rule.expected_fpr:.3g}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ the artifact

    def to_payload(self, with_id: bool = True) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "model_id": self.model_id,
            "created_at": self.created_at,
            "source": self.source,
            "policy": self.policy.to_dict(),
            "global": _entry_payload(self._global_rule),
            "cameras": {c: _entry_payload(rule) for c, rule in sorted(self._rules.items())},
        }
        if with_id:
            payload = {"calibration_id": self.calibration_id, **payload}
        return payload

    def to_json_bytes(self) -> bytes:
        if self._global_rule.scores is None:
            raise CalibrationError("a calibration without calibration scores (the checkpoint fallback) is not saved")
        payload = self.to_payload()
        # indented for people, but each sample on one line (tens of thousands of numbers)
        samples: list[str] = []

        def hide(entry: dict[str, Any]) -> dict[str, Any]:
            samples.append(json.dumps(entry["sample"], allow_nan=False))
            return {**entry, "sample": f"\0sample{len(samples) - 1}"}

        payload["global"] = hide(payload["global"])
        payload["cameras"] = {c: hide(e) for c, e in payload["cameras"].items()}
        text = json.dumps(payload, indent=1, allow_nan=False)
        for i, sample in enumerate(samples):
            token = json.dumps(f"\0sample{i}")
            if text.count(token) != 1:  # a camera id spelled like the token: give up on the layout
                return (json.dumps(self.to_payload(), allow_nan=False) + "\n").encode()
            text = text.replace(token, sample)
        return (text + "\n").encode()

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write: a watching agent sees the old file or the new one, never half of one."""
        atomic_write_bytes(path, self.to_json_bytes())


def content_id(payload_without_id: Mapping[str, Any]) -> str:
    canonical = json.dumps(payload_without_id, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "cal-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _entry_payload(rule: Rule) -> dict[str, Any]:
    low, high = rule.alert_r_bounds()
    e = rule.entry
    return {
        "n": e.n, "mu": e.mu, "sigma": e.sigma, "threshold": rule.threshold, "expected_fpr": rule.expected_fpr,
        "alert_r_below": low, "alert_r_above": high, "sample": [float(v) for v in e.sample],
    }


# --------------------------------------------------------------------------- loading


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
        if not _is_number(data[key]):
            raise CalibrationError(f"{where}.{key} must be a number, got {data[key]!r}")
    if data["alert_r_below"] is not None and not _is_number(data["alert_r_below"]):
        raise CalibrationError(f"{where}.alert_r_below must be a number or null, got {data['alert_r_below']!r}")
    sample = data["sample"]
    if not isinstance(sample, list) or len(sample) < 2 or not all(_is_number(v) for v in sample):
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


# --------------------------------------------------------------------------- fitting


class CalibrationFitter:
    """Streams R-scores (with their camera ids) into global and per-camera statistics."""

    def __init__(self, per_camera: bool = False, max_sample: int = DEFAULT_MAX_SAMPLE, seed: int = 0):
        self.per_camera = per_camera
        self.max_sample = max_sample
        self.seed = seed
        self.global_stats = RunningStats(max_sample, seed)
        self.camera_stats: dict[str, RunningStats] = {}
        self.skipped_nonfinite = 0

    def update(self, r: np.ndarray, camera_ids: Sequence[str | None] | None = None) -> None:
        r = np.asarray(r, dtype=np.float64).reshape(-1)
        if camera_ids is not None and len(camera_ids) != r.size:
            raise ValueError(f"{len(camera_ids)} camera ids for {r.size} scores")
        finite = np.isfinite(r)
        self.skipped_nonfinite += int((~finite).sum())
        self.global_stats.update(r[finite])
        if not self.per_camera or camera_ids is None:
            return
        by_camera: dict[str, list[int]] = {}
        for i in np.flatnonzero(finite):
            if camera_ids[i] is not None:
                by_camera.setdefault(camera_ids[i], []).append(int(i))
        for camera, idx in by_camera.items():
            if camera not in self.camera_stats:
                self.camera_stats[camera] = RunningStats(self.max_sample, [self.seed, len(self.camera_stats) + 1])
            self.camera_stats[camera].update(r[idx])

    @property
    def n(self) -> int:
        return self.global_stats.n

    def finish(self, model_id: str, policy: Policy, source: Mapping[str, Any],
               min_camera_frames: int = DEFAULT_MIN_CAMERA_FRAMES) -> tuple[Calibration, list[str]]:
        """The calibration, and notes on cameras left to the global entry."""
        notes: list[str] = []
        global_entry = _entry_from(self.global_stats, "the calibration data")
        cameras: dict[str, Entry] = {}
        for camera, stats in sorted(self.camera_stats.items()):
            if stats.n < min_camera_frames:
                notes.append(f"camera {camera!r}: only {stats.n} frames (< {min_camera_frames}); it uses the global entry")
                continue
            try:
                cameras[camera] = _entry_from(stats, f"camera {camera!r}")
            except CalibrationError as exc:
                notes.append(f"{exc}; it uses the global entry")
        source = {**source, "frames": self.n, "skipped_nonfinite": self.skipped_nonfinite}
        return Calibration(model_id, global_entry, policy, cameras, source=source), notes


def fit_calibration(r: np.ndarray, model_id: str, policy: Policy = Policy(),
                    source: Mapping[str, Any] | None = None, max_sample: int = DEFAULT_MAX_SAMPLE,
                    seed: int = 0) -> Calibration:
    """The calibration of R-scores of known-normal images in one call (what `ama-stream calibrate` fits).

    >>> cal = fit_calibration(scorer.score_images(good_images).r, scorer.model_id, Policy("upper", 0.01))
    >>> cal.decide(scorer.score_images(new_images).r).anomaly
    """
    fitter = CalibrationFitter(max_sample=max_sample, seed=seed)
    fitter.update(r)
    calibration, _ = fitter.finish(model_id, policy, dict(source or {"spec": "fit_calibration"}))
    return calibration


def _entry_from(stats: RunningStats, what: str) -> Entry:
    if stats.n < 2:
        raise CalibrationError(f"{what}: need at least 2 finite R-scores to calibrate, got {stats.n}")
    if not stats.std > 0:
        raise CalibrationError(f"{what}: all {stats.n} R-scores are equal ({stats.mean:g}); sigma would be 0 "
                               "(a collapsed model or identical frames)")
    return Entry(n=stats.n, mu=stats.mean, sigma=stats.std, sample=stats.sample())
