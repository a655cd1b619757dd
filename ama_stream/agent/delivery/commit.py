"""The single owner of commits: which offsets are done, when they go to the broker, and what a
rebalance does to them.

The run loop marks a batch's positions done once the publisher handed the batch back
acknowledged, and calls `commit()` once per turn (asynchronous; the result arrives through
kafka-python's callback on the same thread, from inside a later poll or commit) and `commit_final()`
when stopping (synchronous). Offsets are committed only after the broker acknowledged every record
of the frames below them (at-least-once).

Rebalances: kafka-python 3 runs the listener on its IO thread while the run loop waits inside
poll(); it commits the offsets already done for the revoked partitions and records the revocation
in the OffsetBook. Frames already read are still scored and published (kafka-python keeps the
fetch position of a partition that is assigned again, so dropping them would lose them); their
offsets are committed only if their partition was not revoked since they were polled (the batch's
epoch), so a partition's new owner re-reads them instead (duplicates, never a gap).

The exactly-once committer (exactly_once.py) is this class with the commits taken out: there the
offsets go to the broker inside each batch's transaction.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from ..kafka_io import describe
from .offsets import OffsetBook

log = logging.getLogger(__name__)

# Commit errors that mean "the group is rebalancing", not "the broker is unreachable".
GROUP_STATE_ERRORS = (RebalanceInProgressError, CommitFailedError, IllegalGenerationError, UnknownMemberIdError)


def names(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"


class OffsetCommitter:
    """`consumer`: the KafkaConsumer (or a fake with commit/commit_async); `on_broker_error(operation,
    reason)`: told when a commit fails for another reason than a rebalance (Readiness.broker_error);
    a commit that failed goes out again at most every `resend_s`."""

    def __init__(self, consumer, on_broker_error=lambda operation, reason: None, resend_s: float = 5.0):
        self.consumer = consumer
        self.book = OffsetBook()
        self.on_broker_error = on_broker_error
        self.resend_s = resend_s
        self.halted = False  # a batch stayed unacknowledged: nothing more is committed
        self.joined = False  # the group gave this consumer its (maybe empty) share
        self.assigned_at = -float("inf")  # monotonic time of the last assignment
        self._sent: dict | None = None  # offsets of the last asynchronous commit sent
        self._resend_at = 0.0

    # -- what the run loop tells it ---------------------------------------------------------------
    def epoch(self) -> int:
        """Taken before each poll; a batch's positions are marked done against it."""
        return self.book.epoch()

    def mark_done(self, positions: dict[TopicPartition, int], epoch: int) -> None:
        """A batch polled at `epoch` is acknowledged: its positions may be committed."""
        self.book.mark_done(positions, epoch)

    def halt(self) -> None:
        """A batch stayed unacknowledged (a stop cut its publishing short): commit nothing more."""
        self.halted = True

    def done(self, tp: TopicPartition) -> int | None:
        return self.book.done(tp)

    def committed_total(self) -> int:
        return self.book.committed_total()

    # -- commits ----------------------------------------------------------------------------------
    def commit(self, now: float | None = None) -> None:
        """Commits the done offsets asynchronously; the same offsets are not sent again while
        on their way, unless `resend_s` passed (a commit that failed goes out again)."""
        now = time.monotonic() if now is None else now
        if now >= self._resend_at:
            self._sent, self._resend_at = None, now + self.resend_s
        offsets = self._uncommitted()
        if offsets and offsets != self._sent:
            self._sent = offsets
            self.consumer.commit_async(offsets, callback=self._on_commit)

    def commit_final(self, timeout_ms: int = 5000) -> None:
        """Commits the done offsets and waits for the answer (when stopping)."""
        offsets = self._uncommitted()
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, timeout_ms=timeout_ms)
        except KafkaError as exc:
            self._on_commit(offsets, exc)
            return
        self.book.mark_committed(offsets)

    def _uncommitted(self) -> dict[TopicPartition, OffsetAndMetadata]:
        if self.halted or self.consumer is None:
            return {}
        return self.book.uncommitted()

    def _on_commit(self, offsets, response) -> None:
        """kafka-python's commit callback (on the run loop's thread, from inside poll/commit)."""
        if not isinstance(response, BaseException):
            self.book.mark_committed(offsets)
        elif isinstance(response, GROUP_STATE_ERRORS):
            # The group is rebalancing: the partitions' next owner re-reads what this commit
            # covered (duplicates, never a loss); the broker itself is fine.
            log.info("commit refused during a rebalance (%s); the next owner re-reads those frames",
                     type(response).__name__)
        else:
            # Not fatal: the offsets stay uncommitted and go out again with a later commit.
            self.on_broker_error("commit", describe(response))
            log.warning("commit failed (%s); will retry with the next batch", describe(response))

    # -- rebalances (kafka-python's IO thread) ----------------------------------------------------
    def listener(self) -> AsyncConsumerRebalanceListener:
        return _Listener(self)

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """Commits what is done for the revoked partitions before the revocation completes, then
        forgets them: frames of theirs polled earlier are not committed by this consumer."""
        if not revoked:
            return
        offsets = self.book.uncommitted(revoked)
        if offsets:
            try:
                await self.consumer.commit_async(offsets)
                self.book.mark_committed(offsets)
            except KafkaError as exc:
                log.warning("commit on revocation failed (%s); their frames will be scored again by the next owner", exc)
        self.book.revoke(revoked)
        log.info("partitions revoked: %s", names(revoked))

    def lost(self, lost: set[TopicPartition]) -> None:
        self.book.revoke(lost)
        log.warning("partitions lost (group membership expired): %s; in-flight frames dropped", names(lost))

    def assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned_at = time.monotonic()  # joining the group is not idleness
        self.joined = True
        log.info("partitions assigned: %s", names(assigned))


class _Listener(AsyncConsumerRebalanceListener):
    def __init__(self, committer: OffsetCommitter):
        self.committer = committer

    async def on_partitions_revoked(self, revoked):
        await self.committer.revoked(set(revoked))

    async def on_partitions_lost(self, lost):
        self.committer.lost(set(lost))

    async def on_partitions_assigned(self, assigned):
        self.committer.assigned(set(assigned))
