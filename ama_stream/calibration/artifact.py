"""The calibration in memory: a policy with a global entry and per-camera entries, deciding a batch
of R-scores, and its canonical JSON payload (what `save` writes and `calibration_id` hashes)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from ..fileio import atomic_write_bytes
from .policy import (CALIBRATION_FORMAT, CALIBRATION_VERSION, DEFAULT_K, CalibrationError, Decisions, Entry, Policy,
                     Rule, gaussian_z_log_a)

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
