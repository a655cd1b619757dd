"""Small file helpers shared by checkpoints and calibrations: strict reads, atomic writes."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def read_file_bytes(path: Path, what: str, error: type[Exception], max_bytes: int | None = None) -> bytes:
    """The file's bytes; a missing, directory, unreadable or oversize path raises `error` naming the
    path and `what`.

    Only a regular file is read: the path may come from a message anyone can publish (a model
    message on the control topic), and a FIFO or /dev/stdin would block the reader forever, /dev/zero
    would fill memory. It is opened non-blocking (opening a FIFO without a writer does not wait),
    checked with fstat on the descriptor read (no race with a rename), and at most `max_bytes` are read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{path}: is a directory, expected a {what} file")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: is not a regular file ({_file_kind(st.st_mode)}), expected a {what} file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{path}: {st.st_size} bytes is larger than a {what} file can be ({max_bytes})")
        # never more than the file says it holds (+1 to notice a lie): /proc and /sys files report
        # size 0 and then yield gigabytes (/proc/self/pagemap); one byte of such a file is enough to refuse it
        limit = st.st_size + 1 if max_bytes is None else min(st.st_size, max_bytes) + 1
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(limit)
        if len(data) > st.st_size:
            raise error(f"{path}: holds more than the {st.st_size} bytes its size says (a /proc or /sys file, or "
                        f"one being written); expected a {what} file")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # grew while being read
        raise error(f"{path}: more than {max_bytes} bytes, larger than a {what} file can be")
    return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


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
