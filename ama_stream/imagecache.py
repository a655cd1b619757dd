"""On-disk cache of decoded-and-fitted image stacks, so a folder source is decoded once.

Decoding CIFAR-10's 50000 JPEGs takes 10-30 s on two shared cores; reading the fitted stack back
takes about a second. An entry is keyed by the files' paths, sizes and modification times and by the
caller's parameters (model size, channels, a digest of the decoding code), so a changed file, another
model size or edited decoding code is a miss. Entries are
plain .npz files (read with allow_pickle=False), written atomically; an unreadable or inconsistent
entry is deleted and rebuilt. The folder holds at most MAX_BYTES: least recently used entries go first.

Location: $AMA_CACHE_DIR, else $XDG_CACHE_HOME/ama-stream/images, else ~/.cache/ama-stream/images.
AMA_CACHE_DIR=off (or 0, none, empty) turns the cache off.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "AMA_CACHE_DIR"
FORMAT_VERSION = 2  # 2: per-item native shapes stored too
MAX_BYTES = 4 * 2**30


def cache_dir() -> Path | None:
    """The cache folder, or None when the cache is turned off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ama-stream" / "images"


def entry_key(files: Sequence[str], params: dict[str, Any]) -> str | None:
    """A digest of the files' identities and the parameters; None when a file cannot be stat'ed
    (the decoder then reports the file by name)."""
    digest = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "params": params}, sort_keys=True).encode())
    for name in files:
        try:
            st = os.stat(name)
        except OSError:
            return None
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load(key: str, n_items: int, image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(fitted images of the kept items, kept mask over the items, native shapes [kept, 3] of the
    kept items), or None on a miss."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            images, kept, shapes = entry["images"], entry["kept"], entry["shapes"]
        if kept.dtype != bool or kept.shape != (n_items,):
            raise ValueError(f"kept mask {kept.dtype} {kept.shape} does not cover {n_items} items")
        if images.dtype != np.uint8 or images.shape != (int(kept.sum()), *image_shape):
            raise ValueError(f"images {images.dtype} {images.shape} do not match {int(kept.sum())} x {image_shape}")
        if shapes.shape != (len(images), 3):
            raise ValueError(f"native shapes {shapes.shape} do not cover {len(images)} images")
        os.utime(path)  # least recently used entries are pruned first
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with an entry, rebuild it
        log.warning("ignoring unreadable image cache entry %s (%s); decoding again", path, exc)
        path.unlink(missing_ok=True)
        return None
    return images, kept, shapes


def store(key: str, images: np.ndarray, kept: np.ndarray, shapes: np.ndarray) -> None:
    """Write an entry atomically; a cache that cannot be written only costs speed."""
    folder = cache_dir()
    if folder is None:
        return
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, kept=kept, shapes=shapes)
        os.replace(tmp, folder / f"{key}.npz")
        tmp = None
        _prune(folder)
    except OSError as exc:
        log.warning("cannot write the image cache in %s (%s); continuing without it", folder, exc)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _prune(folder: Path) -> None:
    entries = []
    for path in folder.glob("*.npz"):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= MAX_BYTES:
            break
        path.unlink(missing_ok=True)
        total -= size
