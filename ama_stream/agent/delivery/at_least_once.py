"""At-least-once (the default): a batch's records are published and acknowledged, then its offsets
are done; the OffsetCommitter (commit.py) commits done offsets, out of order across partitions, once
per loop turn and at the stop. A crash between the acknowledgement and the commit re-reads the
batch: duplicates, never a gap."""
from __future__ import annotations

import logging
from typing import Callable

from ..outbox import Finished, Outbox
from ..publish import Publisher
from .commit import OffsetCommitter

log = logging.getLogger(__name__)


class AtLeastOnce:
    def __init__(self, on_broker_error: Callable[[str, str], None], resend_s: float):
        self.committer = OffsetCommitter(None, on_broker_error, resend_s)
        self.failure: RuntimeError | None = None  # never set: at-least-once always stops cleanly

    def open(self, publisher: Publisher, group_metadata: Callable[[], object], heartbeat: Callable[[], None]) -> Outbox:
        """The publish thread: each batch's records, sent and acknowledged (Publisher.publish)."""
        return Outbox(lambda messages: publisher.publish(messages, heartbeat=heartbeat))

    def payload(self, messages: list, batch) -> list:
        """What the publish thread gets for a batch: its records."""
        return messages

    def reposition(self, consumer, batcher) -> None:
        """After each poll: nothing to do (rebalances are handled in the committer's listener)."""

    def settle(self, done: Finished, batch, batcher) -> bool:
        """A batch back from the publish thread: acknowledged -> its offsets are done (True); not
        acknowledged (a stop cut it short) -> nothing more is committed, its frames are read again."""
        if not done.ok:
            log.warning("stopping with %d frames unacknowledged; they stay uncommitted and will be read again",
                        batch.size)
            self.committer.halt()
            return False
        self.committer.mark_done(batch.positions, batch.epoch)
        return True

    def commit(self) -> None:
        self.committer.commit()

    def commit_final(self) -> None:
        self.committer.commit_final()
