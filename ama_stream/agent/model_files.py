"""The agent's calibration file and (with `model_reload`) its checkpoint file, watched for new
versions by their (device, inode, size, mtime) signature."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ama_stream.calibration import Calibration, CalibrationError, load_calibration

from .model_state import ModelRequest, Update


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ModelFiles:
    """The agent's calibration file and, with `model_reload`, its checkpoint file: watched for new versions.

    A changed calibration alone is an Update for the model in force. A checkpoint that differs from
    the one the model in force was loaded from is a ModelRequest for the pair on disk (also when
    the change seen is the calibration's: after a refused pair, the second file of the pair
    arriving retries it). A refused request is not retried until one of the files changes again."""

    def __init__(self, checkpoint: str | os.PathLike | None, calibration: str | os.PathLike | None,
                 check_every_s: float):
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None  # None: not watched
        self.calibration = Path(calibration) if calibration is not None else None
        self.check_every_s = check_every_s
        self._seen = self.signatures()  # before reading: a change after it is seen by the next check
        self._model = self._seen[1]  # the checkpoint version the model in force came from
        self._next_check = time.monotonic() + check_every_s

    def signatures(self) -> tuple:
        """(calibration, checkpoint) signatures. The calibration is looked at first: a pair swapped
        in one step (a directory symlink) between the two looks like a new checkpoint with the old
        calibration, and the switch, seeing the files changed while they loaded, loads them again."""
        return (_signature(self.calibration) if self.calibration is not None else None,
                _signature(self.checkpoint) if self.checkpoint is not None else None)

    def initial_calibration(self, model_id: str) -> Calibration | None:
        """The calibration file at start-up (errors are fatal then), or None without one."""
        return load_calibration(self.calibration, model_id) if self.calibration is not None else None

    def check(self, now: float, model_id: str) -> Update | ModelRequest | None:
        if now < self._next_check:
            return None
        self._next_check = now + self.check_every_s
        seen = self.signatures()
        if seen == self._seen:
            return None
        self._seen = seen
        if self.checkpoint is not None and seen[1] != self._model:
            return ModelRequest("file", str(self.checkpoint), self.checkpoint, self.calibration, signature=seen)
        if self.calibration is None:
            return None
        path = self.calibration
        if seen[0] is None:
            return Update("file", str(path), None, f"{path}: the calibration file is gone or unreadable")
        try:
            return Update("file", str(path), load_calibration(path, model_id))
        except CalibrationError as exc:
            return Update("file", str(path), None, str(exc))

    def model_loaded(self, signature: tuple) -> None:
        """The pair seen with `signature` is now in force."""
        self._model = signature[1]
