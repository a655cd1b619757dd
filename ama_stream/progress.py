"""Progress that never goes silent: a tqdm bar with ETA on a terminal, and elsewhere (CI, a service
log, a pipe) a plain log line at least every REPORT_EVERY_S seconds.

    with progress(total=n, desc="scoring test images", unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("ama_stream.progress")

REPORT_EVERY_S = 10.0


class _LogProgress:
    """The tqdm calls we use (update, set_postfix_str, close, context manager), as log lines."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= REPORT_EVERY_S:
            self.last = now
            self._report(now)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:  # noqa: ARG002 - tqdm's signature
        self.postfix = text

    def _report(self, now: float) -> None:
        rate = self.n / max(now - self.started, 1e-9)
        if self.total:
            eta = (self.total - self.n) / max(rate, 1e-9)
            log.info("%s: %d/%d %s (%.1f %s/s, eta %.0fs)%s", self.desc, self.n, self.total, self.unit, rate,
                     self.unit, eta, f" {self.postfix}" if self.postfix else "")
        else:
            log.info("%s: %d %s (%.1f %s/s)", self.desc, self.n, self.unit, rate, self.unit)

    def close(self) -> None:
        if self.n and time.monotonic() - self.started >= REPORT_EVERY_S:
            self._report(time.monotonic())

    def __enter__(self) -> "_LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress reporter with tqdm's update()/close(): a bar on a terminal, log lines elsewhere."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
    return _LogProgress(total, desc, unit)
