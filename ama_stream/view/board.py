"""What the alert page shows, held in bounded memory: the last alerts (with their heatmaps), alert
rates per camera, the connection state, and the agent's health and drift.

Everything here came from Kafka or the agent, i.e. from outsiders: it is stored and served as data
(JSON), never as markup; the page puts every string into the document as text.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

RATE_WINDOWS_S = (60, 300)  # alert rates per camera over the last minute and five minutes
MAX_MAP_BYTES = 256 * 1024  # a heatmap bigger than this is not kept (the agent sends a few KiB)


@dataclass
class Alert:
    record: dict  # the alert record as published (schema v1 fields, region/map_max when present)
    received_at: float
    map_png: bytes | None = None

    @property
    def key(self) -> str:
        """A stable id for the page's image URLs: where the frame was read."""
        r = self.record
        return f"{r.get('topic')}:{r.get('partition')}:{r.get('offset')}"


@dataclass
class Board:
    """Thread-safe; the tail thread writes, the HTTP handlers read."""

    max_alerts: int = 200
    max_cameras: int = 500
    alerts: deque = field(default_factory=deque)
    connected: bool = False
    status: str = "starting"
    health: dict = field(default_factory=dict)
    _cameras: OrderedDict = field(default_factory=OrderedDict)  # camera -> deque of alert times (LRU)
    _maps: OrderedDict = field(default_factory=OrderedDict)  # frame_id -> PNG bytes, for alerts not seen yet
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_alert(self, record: dict, now: float | None = None) -> None:
        now = time.time() if now is None else now
        camera = str(record.get("camera_id"))[:256]
        with self._lock:
            alert = Alert(record, now, self._maps.pop(str(record.get("frame_id")), None))
            self.alerts.appendleft(alert)  # newest first
            while len(self.alerts) > self.max_alerts:
                self.alerts.pop()
            times = self._cameras.pop(camera, None) or deque()
            times.append(now)
            while times and times[0] < now - max(RATE_WINDOWS_S):
                times.popleft()
            self._cameras[camera] = times
            while len(self._cameras) > self.max_cameras:
                self._cameras.popitem(last=False)

    def add_map(self, frame_id: str, png: bytes) -> None:
        """A heatmap from the maps topic: attached to its alert if known, else kept until it arrives."""
        if len(png) > MAX_MAP_BYTES or not png.startswith(b"\x89PNG"):
            return
        with self._lock:
            for alert in self.alerts:
                if str(alert.record.get("frame_id")) == frame_id:
                    alert.map_png = png
                    return
            self._maps[frame_id] = png
            while len(self._maps) > self.max_alerts:
                self._maps.popitem(last=False)

    def find(self, key: str) -> Alert | None:
        with self._lock:
            return next((a for a in self.alerts if a.key == key), None)

    def set_connection(self, connected: bool, status: str) -> None:
        with self._lock:
            self.connected, self.status = connected, status

    def set_health(self, health: dict) -> None:
        with self._lock:
            self.health = health

    def snapshot(self, now: float | None = None) -> dict:
        """The page's state as plain data."""
        now = time.time() if now is None else now
        with self._lock:
            cameras = {}
            for camera, times in self._cameras.items():
                cameras[camera] = {f"alerts_{w}s": sum(1 for t in times if t >= now - w) for w in RATE_WINDOWS_S}
            drift = self.health.get("drift", {})
            for camera, state in drift.items():
                cameras.setdefault(camera, {f"alerts_{w}s": 0 for w in RATE_WINDOWS_S})["drift"] = state
            return {
                "connected": self.connected,
                "status": self.status,
                "health": {k: v for k, v in self.health.items() if k != "drift"},
                "cameras": cameras,
                "alerts": [{**a.record, "key": a.key, "has_map": a.map_png is not None} for a in self.alerts],
            }
