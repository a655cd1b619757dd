"""Logging to stderr, plain or one JSON object per line."""
from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    quiet_kafka_logs()


class KafkaBurstFilter(logging.Filter):
    """One line per failure from kafka-python: the first of its WARNING/ERROR records passes, the
    rest of the burst (`interval_s`) is dropped and counted, and the next line that passes says how
    many were dropped.

    One unreachable broker makes kafka-python log ~5 lines (connect failed, connection lost,
    backoff, not ready, bootstrap failed); the agent's own line says what it does about it.
    Lower levels and other loggers pass untouched (`--log-level DEBUG` shows kafka-python's detail).
    kafka-python's ERROR lines pass as WARNING: they report what the agent handles (a broker that is
    down), and a newcomer's first screen should not open with an ERROR the agent recovers from.
    """

    def __init__(self, interval_s: float = 30.0, prefix: str = "kafka"):
        super().__init__()
        self.interval_s, self.prefix = interval_s, prefix
        self._burst_since = -1e18
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix) or record.levelno < logging.WARNING:
            return True
        now = time.monotonic()
        if now - self._burst_since < self.interval_s:
            self._dropped += 1
            return False
        self._burst_since = now
        if record.levelno >= logging.ERROR:  # connection trouble the agent retries and reports itself
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        if self._dropped:
            record.msg = f"{record.getMessage()} (and {self._dropped} more kafka-python lines of the last failure)"
            record.args = ()
            self._dropped = 0
        return True


def quiet_kafka_logs(interval_s: float = 30.0) -> None:
    """Installs KafkaBurstFilter on the root handlers, which kafka-python's records reach (idempotent)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, KafkaBurstFilter) for f in handler.filters):
            handler.addFilter(KafkaBurstFilter(interval_s))
