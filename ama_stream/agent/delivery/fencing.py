"""The exactly-once committer: OffsetCommitter's books with its commits taken out, ordering
transactions against rebalances.

The offsets go to the broker inside each batch's transaction (txn.py, on the publish thread), so
this class sends no commit at all. A transaction begins only for a batch polled in the current epoch
(`begin_transaction`); a revocation bumps the epoch and then waits for the transaction in progress
to commit or abort before it returns (at most `revoke_wait_s`), so the partitions' next owner reads
committed offsets that match the committed records. Every batch polled before the revocation is
then dropped unpublished, and the run loop re-positions the consumer at the committed offsets
(`take_rewind`, exactly_once.py): kafka-python keeps the fetch position of a partition assigned
again, which would otherwise skip the dropped frames.
"""
from __future__ import annotations

import logging
import threading

from kafka.structs import OffsetAndMetadata, TopicPartition

from .commit import OffsetCommitter, names

log = logging.getLogger(__name__)


class TransactionalCommitter(OffsetCommitter):
    def __init__(self, consumer, on_broker_error=lambda operation, reason: None, revoke_wait_s: float = 3.0):
        super().__init__(consumer, on_broker_error)
        self.revoke_wait_s = revoke_wait_s
        self._gate = threading.Condition()
        self._in_transaction = False  # a transaction in progress (on the publish thread)
        self._rewind = False  # the consumer must be re-positioned at the committed offsets

    def commit(self, now: float | None = None) -> None:
        """Nothing to send: each batch's transaction committed its offsets."""

    def commit_final(self, timeout_ms: int = 5000) -> None:
        """Nothing to send: each batch's transaction committed its offsets."""

    # -- transactions (the publish thread) --------------------------------------------------------
    def begin_transaction(self, epoch: int) -> bool:
        """True if a batch polled at `epoch` may be published in a transaction now, and marks one in
        progress; False if a rebalance or a rewind came since (drop the batch: its frames are read
        again from the committed offsets)."""
        with self._gate:
            if self.halted or epoch < self.book.epoch():
                return False
            self._in_transaction = True
            return True

    def end_transaction(self, committed: dict[TopicPartition, int] | None = None, epoch: int = 0) -> None:
        """The transaction ended; `committed`: the offsets it committed (None: aborted), marked done
        and committed here, the only place that does in exactly-once mode."""
        with self._gate:
            if committed:
                self.book.mark_done(committed, epoch)
                self.book.mark_committed({tp: OffsetAndMetadata(o, "", -1) for tp, o in committed.items()})
            self._in_transaction = False
            self._gate.notify_all()

    def invalidate(self, reason: str) -> None:
        """(any thread but the IO thread) Drops every batch polled so far and asks the run loop to
        re-read from the committed offsets, e.g. after the broker refused a transaction's offsets for
        a stale group generation. Does not wait for a transaction in progress."""
        with self._gate:
            self.book.revoke(())  # a new epoch: every earlier batch is stale
            self._rewind = True
        log.warning("dropping the batches in flight and re-reading from the committed offsets (%s)", reason)

    # -- the run loop -----------------------------------------------------------------------------
    def take_rewind(self) -> bool:
        """True once after a rebalance or `invalidate`: the caller drops what it buffered and seeks the
        assigned partitions to their committed offsets."""
        with self._gate:
            rewind, self._rewind = self._rewind, False
            return rewind

    # -- rebalances (kafka-python's IO thread) ----------------------------------------------------
    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """The transaction in progress ends first; nothing to commit (see the module's docstring)."""
        if not revoked:
            return
        self._fence(revoked, "revoked")
        log.info("partitions revoked: %s", names(revoked))

    def lost(self, lost: set[TopicPartition]) -> None:
        self._fence(lost, "lost")
        log.warning("partitions lost (group membership expired): %s; in-flight frames dropped", names(lost))

    def _fence(self, partitions: set[TopicPartition], why: str) -> None:
        """A new epoch (earlier batches stale, the consumer to be re-positioned), then waits for the
        transaction in progress: it commits or aborts before the partitions move."""
        with self._gate:
            self.book.revoke(partitions)
            self._rewind = True
            if not self._gate.wait_for(lambda: not self._in_transaction, timeout=self.revoke_wait_s):
                log.warning("partitions %s: the transaction in progress did not end within %.1f s; letting them go "
                            "(a broker with KIP-447 fences its offsets by group generation)", why, self.revoke_wait_s)
