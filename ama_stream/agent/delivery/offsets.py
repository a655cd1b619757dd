"""Which offsets may be committed: only those of frames whose records the broker acknowledged.

The OffsetCommitter's bookkeeping (commit.py; fencing.py's too). Read and written by the run loop (batches done,
commits) and the rebalance listener (what is done for revoked partitions, on kafka-python's IO
thread), hence the lock; it is held only for dictionary updates, never across broker calls.
"""
from __future__ import annotations

import threading
from typing import Iterable

from kafka.structs import OffsetAndMetadata, TopicPartition


class OffsetBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[TopicPartition, int] = {}  # next offset after the last acknowledged frame
        self._committed: dict[TopicPartition, int] = {}
        self._revocations: list[frozenset[TopicPartition]] = []

    def mark_done(self, positions: dict[TopicPartition, int], epoch: int) -> None:
        """Records acknowledged positions of frames polled at `epoch`, except for partitions revoked since."""
        with self._lock:
            gone = frozenset().union(*self._revocations[epoch:])
            for tp, offset in positions.items():
                if tp not in gone and offset > self._done.get(tp, -1):
                    self._done[tp] = offset

    def done(self, tp: TopicPartition) -> int | None:
        with self._lock:
            return self._done.get(tp)

    def uncommitted(self, only: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, OffsetAndMetadata]:
        """Done-but-not-committed offsets, in the form KafkaConsumer.commit takes."""
        with self._lock:
            keys = self._done.keys() if only is None else [tp for tp in only if tp in self._done]
            return {
                tp: OffsetAndMetadata(self._done[tp], "", -1)
                for tp in keys
                if self._done[tp] > self._committed.get(tp, -1)
            }

    def committed_total(self) -> int:
        """The sum of the committed offsets: it grows whenever any commit moves forward."""
        with self._lock:
            return sum(self._committed.values())

    def mark_committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        with self._lock:
            for tp, meta in offsets.items():
                if meta.offset > self._committed.get(tp, -1):
                    self._committed[tp] = meta.offset

    # Revocations: the offsets of frames polled before their partition was revoked are not
    # committed (the partition's new owner re-reads them from its committed offset).
    def epoch(self) -> int:
        with self._lock:
            return len(self._revocations)

    def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        with self._lock:
            gone = frozenset(partitions)
            self._revocations.append(gone)
            for tp in gone:
                self._done.pop(tp, None)
                self._committed.pop(tp, None)


class CommitProgress:
    """Readiness must fall when frames wait but commits stop moving -- a frame that cannot be
    finished, a publish path stuck in retries -- even though the broker answers every probe."""

    def __init__(self, stall_s: float, now: float):
        self.stall_s = stall_s
        self._committed: int | None = None
        self._since = now  # since when frames have waited with the commits where they are
        self._waiting = False
        self.stalled = False

    def check(self, lag: int, committed: int, now: float) -> str | None:
        """The reason the agent is stalled, or None. `lag`: unfinished work (frames not yet polled plus
        batches in flight; 0 when idle); `committed`: OffsetBook.committed_total()."""
        if lag <= 0 or committed != self._committed or not self._waiting:
            self._committed, self._since, self.stalled = committed, now, False
            self._waiting = lag > 0
            return None
        waited = now - self._since
        if waited < self.stall_s:
            return None
        self.stalled = True
        return f"no commit progress for {waited:.0f} s while work waits"
