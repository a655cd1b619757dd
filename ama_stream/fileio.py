"""Small file helpers shared by checkpoints and calibrations: strict reads, atomic writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def read_file_bytes(path: Path, what: str, error: type[Exception]) -> bytes:
    """The file's bytes; a missing, directory or unreadable path raises `error` naming the path and `what`."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None


def _current_umask() -> int:
    """The process umask. Linux shows it in /proc (read-only, thread-safe); elsewhere it can only
    be read by setting it, briefly."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder + fsync + rename.

    Readers (e.g. an agent watching the file) see the old content or the new one, never a mix. The
    file gets the mode a plain open() would give it (0666 less the umask, so 0644 by default):
    mkstemp's 0600 would hide model.pt from a service running as another user.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
