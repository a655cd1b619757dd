"""Exactly-once (`delivery: exactly-once`): each batch's records and its offsets in one Kafka
transaction (txn.py), the one owner of commits in this mode; the committer (fencing.py) only keeps
the books and orders transactions against rebalances. After a rebalance (or offsets refused for a
stale group generation) everything polled before it is dropped and the consumer is re-positioned at
the committed offsets (`reposition`). A fenced producer (another agent with this transactional id)
or an unanswered transaction stops the agent (`failure`)."""
from __future__ import annotations

import logging
from typing import Callable

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from ..kafka_io import describe
from ..outbox import Finished, Outbox
from ..publish import Publisher
from ..settings import AgentSettings
from .commit import names
from .fencing import TransactionalCommitter
from .txn import Outcome, ProducerFenced, TransactionUnanswered, Transactions, TxnBatch

log = logging.getLogger(__name__)

# how long one committed-offset fetch may hold up the loop (then retried next turn)
OFFSET_FETCH_TIMEOUT_MS = 5000


def revoke_wait_s(settings: AgentSettings) -> float:
    """How long a revocation waits for the transaction in progress: it holds up the consumer's
    heartbeats, so a third of the session timeout, at most 10 s."""
    session_ms = settings.consumer.get("session_timeout_ms", KafkaConsumer.DEFAULT_CONFIG["session_timeout_ms"])
    return min(10.0, session_ms / 3000)


class ExactlyOnce:
    def __init__(self, settings: AgentSettings, on_broker_error: Callable[[str, str], None],
                 on_outcome: Callable[[str], None], stop: Callable[[], None], stopping):
        """`on_outcome(result)`: each transaction's result (the metric); `stop()`: ends the agent (a
        fenced or unanswered transaction); `stopping`: the agent's stop Event."""
        self.settings = settings
        self.on_broker_error = on_broker_error
        self.on_outcome = on_outcome
        self.stop = stop
        self.stopping = stopping
        self.committer = TransactionalCommitter(None, on_broker_error, revoke_wait_s(settings))
        self.transactions: Transactions | None = None
        self.failure: RuntimeError | None = None  # why the agent stopped on its own (raised by Agent.run)
        self._rewinding: set = set()  # partitions paused until re-positioned at their committed offset
        self._rewind_failing = False  # fetching a committed offset failed (logged once per streak)

    def open(self, publisher: Publisher, group_metadata: Callable[[], object], heartbeat: Callable[[], None]) -> Outbox:
        """The publish thread: each batch in one transaction (Transactions.publish)."""
        s = self.settings
        self.transactions = Transactions(
            publisher, self.committer, group_metadata, s.retry, self.stopping,
            on_error=self.on_broker_error, on_outcome=self.on_outcome,
            answer_timeout_s=s.producer.get("transaction_timeout_ms",
                                            KafkaProducer.DEFAULT_CONFIG["transaction_timeout_ms"]) / 1000)
        return Outbox(lambda batch: self.transactions.publish(batch, heartbeat=heartbeat))

    def payload(self, messages: list, batch) -> TxnBatch:
        """What the publish thread gets for a batch: its records with its offsets and epoch."""
        return TxnBatch(messages, batch.positions, batch.epoch)

    def settle(self, done: Finished, batch, batcher) -> bool:
        """A batch back from the publish thread: True if its transaction committed (its offsets were
        marked done by the committer, on the publish thread); otherwise its frames are read again."""
        outcome = done.outcome
        if outcome is Outcome.COMMITTED:
            return True
        if outcome is Outcome.STALE:
            batcher.taken -= batch.size  # dropped after a rebalance: read again, counted again
            return False
        self.committer.halt()
        s = self.settings
        if outcome is Outcome.FENCED:
            self.failure = ProducerFenced(
                f"fenced: another producer with transactional id {s.transactional_id} took over (a second agent "
                f"with the same agent_id in group {s.group_id}, or this agent's successor); stopped without "
                "committing more. Give every agent of a group its own --agent-id")
            self.stop()
        elif outcome is Outcome.UNANSWERED:
            self.failure = TransactionUnanswered(
                f"transactional id {s.transactional_id}: {self.transactions.unanswered} (producer "
                "transaction_timeout_ms); stopped, since whether the batch committed is unknown: the next start "
                "with this agent_id settles it (on tansu 0.6.0 this is also how a fenced agent ends)")
            self.stop()
        else:
            log.warning("stopping with %d frames in a transaction that did not commit; they stay uncommitted and "
                        "will be read again", batch.size)
        return False

    def commit(self) -> None:
        """Nothing: each batch's transaction committed its offsets."""

    def commit_final(self) -> None:
        """Nothing: each batch's transaction committed its offsets."""

    def reposition(self, consumer, batcher) -> None:
        """After each poll: after a rebalance (or offsets refused for a stale group generation),
        everything polled before it is dropped, and the assigned partitions are read again from their
        committed offsets (kafka-python keeps the position of a partition assigned again).

        A new rewind pauses the partitions first, so nothing is polled from one before it is
        re-positioned. The committed offset is fetched with a timeout (without one kafka-python
        retries a retriable error, e.g. the broker away or UNSTABLE_OFFSET_COMMIT while a transaction
        commits offsets of the group, for ever on this thread); when that fails, the partitions left
        stay paused and pending, and the next loop turn tries again."""
        fresh = self.committer.take_rewind()
        if not fresh and not self._rewinding:
            return
        assigned = consumer.assignment()
        dropped = 0
        if fresh:
            dropped = batcher.discard()
            self._rewinding = set(assigned)
            if assigned:
                consumer.pause(*assigned)
        self._rewinding &= assigned  # one revoked meanwhile is its next owner's (a new rebalance starts afresh)
        moved = []
        for tp in sorted(self._rewinding):
            try:
                committed = consumer.committed(tp, timeout_ms=OFFSET_FETCH_TIMEOUT_MS)
            except KafkaError as exc:
                self.on_broker_error("offset fetch", describe(exc))
                if not self._rewind_failing:
                    log.warning("fetching the committed offset of %s[%d] failed (%s); partitions %s stay paused "
                                "and are re-positioned once it can be fetched", tp.topic, tp.partition, describe(exc),
                                names(self._rewinding))
                self._rewind_failing = True
                break  # the broker is likely away for the others too: next turn
            if committed is not None:
                consumer.seek(tp, committed)
            else:  # never committed: from the beginning (settings refuse auto_offset_reset latest here)
                consumer.seek_to_beginning(tp)
            consumer.resume(tp)
            self._rewinding.discard(tp)
            moved.append(f"{tp.topic}[{tp.partition}]@{committed if committed is not None else 'beginning'}")
        if not self._rewinding:
            self._rewind_failing = False
        if fresh or moved:
            log.info("re-reading from the committed offsets: %s (%d buffered frames dropped)%s",
                     ", ".join(moved) or "no partitions re-positioned yet", dropped,
                     f"; still paused: {names(self._rewinding)}" if self._rewinding else "")
