"""The micro-batcher: polls frames into a buffer and closes it into a batch when it is full, when
its first frame has waited `max_wait_s`, or when the `max_frames` budget is spent.

It owns the consumer's poll() and nothing else (commits are the OffsetCommitter's). The poll
timeout follows the buffer: no wait while decoded batches are waiting to be scored, until the
buffer's deadline while it holds frames, else IDLE_POLL_MS (which bounds the reaction to stop()).
"""
from __future__ import annotations

import time
from typing import Callable

from .decode import PolledBatch

IDLE_POLL_MS = 200  # longest poll while nothing is buffered or in flight


class MicroBatcher:
    def __init__(self, consumer, max_batch: int, max_wait_s: float, max_frames: int | None = None,
                 epoch: Callable[[], int] = lambda: 0, clock: Callable[[], float] = time.monotonic):
        """`consumer`: anything with KafkaConsumer.poll(timeout_ms, max_records) -> {tp: [records]};
        `epoch()`: the committer's revocation epoch, read before each poll (the rebalance callbacks
        run inside it)."""
        self.consumer = consumer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_frames = max_frames
        self.epoch = epoch
        self.clock = clock
        self.taken = 0  # frames polled so far (for max_frames)
        self.last_frame_at = clock()  # when a poll last returned frames (or the batcher was made)
        self._buffer: list = []
        self._since = 0.0  # when the first frame in the buffer was polled
        self._epoch = 0  # the epoch before the poll that returned the first frame in the buffer

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def at_limit(self) -> bool:
        """The max_frames budget is spent: no more polls."""
        return self.max_frames is not None and self.taken >= self.max_frames

    def poll(self, busy: bool = False) -> int:
        """One poll for at most what the batch and the max_frames budget have room for; `busy`:
        work is waiting elsewhere, so do not wait for frames. Returns how many frames came."""
        budget = self.max_batch - len(self._buffer)
        if self.max_frames is not None:
            budget = min(budget, self.max_frames - self.taken)
        if budget <= 0:
            return 0
        if busy:
            timeout_ms = 0
        elif self._buffer:
            timeout_ms = max(0, int((self._since + self.max_wait_s - self.clock()) * 1000))
        else:
            timeout_ms = IDLE_POLL_MS
        epoch = self.epoch()
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=budget)
        got = [rec for recs in polled.values() for rec in recs]
        if got:
            now = self.clock()
            if not self._buffer:
                self._since, self._epoch = now, epoch
            self._buffer.extend(got)
            self.taken += len(got)
            self.last_frame_at = now
        return len(got)

    def discard(self) -> int:
        """Drops the buffer (exactly-once, after a rebalance: its frames are read again); returns how
        many frames it held. They no longer count against max_frames."""
        dropped = len(self._buffer)
        self.taken -= dropped
        self._buffer = []
        return dropped

    def take(self, force: bool = False) -> PolledBatch | None:
        """The buffer as a batch if it is full, old enough, or the budget is spent (or `force`)."""
        if not self._buffer:
            return None
        due = len(self._buffer) >= self.max_batch or self.clock() >= self._since + self.max_wait_s or self.at_limit
        if not (due or force):
            return None
        batch = PolledBatch(self._buffer, self._epoch)
        self._buffer = []
        return batch
