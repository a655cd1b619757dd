"""Exactly-once delivery: each batch's records and its consumed offsets in ONE Kafka transaction.

`Transactions.publish` runs on the publish thread (outbox.py) in place of `Publisher.publish`; in
this mode it is the only owner of offset commits (the committer, fencing.py, sends none):

    begin_transaction                      (only for a batch polled in the current epoch, fencing.py)
    send the batch's records               (Publisher.send / its acknowledgement wait)
    send_offsets_to_transaction            (the next offset of each partition of the batch, with the
                                            consumer's group metadata: KIP-447 generation fencing)
    commit_transaction

A record, the offsets or the commit failing: `abort_transaction`, then the same batch goes out
again in a new transaction after a backoff (records refused as too large or invalid are replaced
by their fallbacks first, as in at-least-once), until it commits or a stop request cuts it short.
Aborted records are never seen by `read_committed` consumers, so retrying whole batches neither
loses nor repeats a frame. A producer that cannot abort (a fatal state) is replaced by a new one
with the same transactional id, whose initialisation aborts what the old one left open.

Outcomes: COMMITTED; STALE (a rebalance came since the batch was polled, or the broker refused the
offsets for a stale group generation: dropped, its frames are read again from the committed
offsets); STOPPED (a stop cut it short: aborted or left to the broker to abort, read again by the
next owner); FENCED (another producer with this transactional id took over: a second agent with
the same agent_id, or this agent's own successor; this agent stops and publishes nothing more);
UNANSWERED (the offsets, the commit or the abort got no answer within the producer's
`transaction_timeout_ms`: whether the batch committed is then unknown, so this agent stops too,
and the next start of its transactional id settles the transaction (init_transactions waits for a
commit in progress and aborts the rest). tansu 0.6.0 ends here when it fences a producer between
its offsets and its commit: it drops the connection on that EndTxn instead of answering
PRODUCER_FENCED, and kafka-python retries it forever.)
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from kafka.errors import (
    CommitFailedError,
    CorruptRecordError,
    IllegalGenerationError,
    InvalidProducerEpochError,
    InvalidRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from .fencing import TransactionalCommitter
from ..kafka_io import describe
from ..publish import Publisher, RetryPause, StopGrace
from ..records import OutMessage
from ..settings import RetrySection

log = logging.getLogger(__name__)

__all__ = ["Outcome", "ProducerFenced", "TransactionUnanswered", "TxnBatch", "Transactions"]

# errors that name one record (it would fail again as it is): its refusal count goes up
_RECORD_REFUSALS = (MessageSizeTooLargeError, InvalidRecordError, CorruptRecordError)
# the broker refused the offsets because this consumer's group generation is over (KIP-447)
_STALE_GENERATION = (CommitFailedError, IllegalGenerationError, UnknownMemberIdError)
STOP_ABORT_S = 2.0  # how long an abort may take once a stop request cut a transaction short


class Outcome(enum.Enum):
    COMMITTED = "committed"
    STALE = "stale"
    STOPPED = "stopped"
    FENCED = "fenced"
    UNANSWERED = "unanswered"

    def __bool__(self) -> bool:  # may the batches behind this one go on (Outbox.gave_up)?
        return self in (Outcome.COMMITTED, Outcome.STALE)


@dataclass
class TxnBatch:
    """What the run loop submits in exactly-once mode: the records and the batch's offsets."""

    messages: list[OutMessage]
    positions: dict[TopicPartition, int]  # per partition: the offset after the batch's last frame
    epoch: int


class ProducerFenced(RuntimeError):
    """Another producer with this agent's transactional id took over; this agent stopped."""


class TransactionUnanswered(RuntimeError):
    """The broker did not answer a transaction's commit (or offsets, or abort) in time; this agent stopped."""


class _Unanswered(Exception):
    def __init__(self, what: str, waited_s: float):
        super().__init__(f"{what}: no answer for {waited_s:.0f} s")


class _Stopped(Exception):
    """A stop request cut a wait short (past the grace period)."""

    def __init__(self, abort_tried: bool = False):
        super().__init__("stopping")
        self.abort_tried = abort_tried


def is_fenced(exc: BaseException | None) -> bool:
    """ProducerFencedError (or the INVALID_PRODUCER_EPOCH it stands for), also when kafka-python wraps
    it: "Cannot execute transactional method because we are in an error state: ... ProducerFencedError"
    names it only in the message."""
    fenced = (ProducerFencedError, InvalidProducerEpochError)
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, fenced) or "ProducerFenced" in str(exc) or "PRODUCER_FENCED" in str(exc):
            return True
        if any(isinstance(a, fenced) or a in fenced for a in getattr(exc, "args", ())):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class Transactions:
    def __init__(
        self,
        publisher: Publisher,
        committer: TransactionalCommitter,
        group_metadata: Callable[[], Any],
        retry: RetrySection,
        stop: threading.Event,
        on_error: Callable[[str, str], None] = lambda operation, reason: None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        grace_s: float = 10.0,
        poll_s: float = 0.1,
        answer_timeout_s: float = 60.0,
    ):
        """`group_metadata()`: the consumer's KafkaConsumer.group_metadata() (or its group id);
        `on_outcome(name)`: told each transaction's end (committed, aborted, dropped)."""
        self.publisher = publisher
        self.committer = committer
        self.group_metadata = group_metadata
        self.retry = retry
        self.stop = stop
        self.on_error = on_error
        self.on_outcome = on_outcome
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.answer_timeout_s = answer_timeout_s  # the producer's transaction_timeout_ms
        self.unanswered: str | None = None  # why the last UNANSWERED came

    @property
    def producer(self):
        return self.publisher.producer  # replaced by the publisher when it fails for good

    # -- one batch ---------------------------------------------------------------------------------
    def publish(self, batch: TxnBatch, heartbeat: Callable[[], None] = lambda: None) -> Outcome:
        """Publishes `batch` in a transaction with its offsets; retries (abort, new transaction) until
        it commits, turns stale, is fenced or a stop request cuts it short."""
        pause = RetryPause(self.retry, self.stop, self.grace_s)
        messages = batch.messages
        while True:
            if not self.committer.begin_transaction(batch.epoch):
                self.on_outcome("dropped")
                return Outcome.STALE
            committed = None
            try:
                messages, error = self._attempt(messages, batch.positions, heartbeat)
                if error is None:
                    committed = batch.positions
                    self.on_outcome("committed")
                    return Outcome.COMMITTED
            except _Stopped as stopped:
                if not stopped.abort_tried:
                    self._abort(heartbeat, when_stopping=True)
                self.on_outcome("aborted")
                return Outcome.STOPPED
            except _Unanswered as exc:
                self.unanswered = str(exc)
                log.error("transaction of transactional id %s: %s; whether it committed is unknown, so this agent "
                          "stops (its next start settles the transaction)", self._tid(), exc)
                self.on_outcome("unanswered")
                return Outcome.UNANSWERED
            finally:
                self.committer.end_transaction(committed, batch.epoch)
            self.on_outcome("aborted")
            if is_fenced(error):
                log.error("producer fenced: another producer with transactional id %s took over (%s); this agent "
                          "stops without committing more", self._tid(), describe(error))
                return Outcome.FENCED
            if isinstance(error, _STALE_GENERATION):
                self.committer.invalidate(f"the broker refused the transaction's offsets: {describe(error)}")
                return Outcome.STALE
            reason = describe(error)
            self.on_error("publish", reason)
            delay = pause.next_delay()
            if delay is None:
                return Outcome.STOPPED
            log.warning("transaction of %d records aborted (%s); publishing the batch again in a new transaction "
                        "in %.1f s", len(messages), reason, delay)
            heartbeat()
            pause.sleep(delay)

    def _attempt(self, messages: list[OutMessage], positions: dict[TopicPartition, int],
                 heartbeat) -> tuple[list[OutMessage], BaseException | None]:
        """One transaction: (the messages for the next attempt, None if it committed, else the error;
        the transaction is then aborted). Raises _Stopped when a stop cut a wait short."""
        producer = self.producer
        try:
            producer.begin_transaction()
        except KafkaError as exc:
            return messages, self._after_failure(exc, heartbeat)
        sent = self.publisher.send(messages)
        failed, errors, cut_short = self.publisher.collect(sent, heartbeat)
        if cut_short:
            raise _Stopped()
        if failed:
            retry = {id(m): self._settle(m, e) for m, e in zip(failed, errors)}
            # the next attempt: every message again, a refused one replaced by its fallback (or given up)
            sent_msgs = [m for m, _ in sent]
            nxt = [retry.get(id(m), m) for m in sent_msgs]
            nxt = [m for m in nxt if m is not None]
            error = next((e for e in errors if not isinstance(e, _RECORD_REFUSALS)), errors[0])
            return nxt, self._after_failure(error, heartbeat)
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in positions.items()}
        try:
            self._bounded(lambda: producer.send_offsets_to_transaction(offsets, self.group_metadata()), heartbeat,
                          what="send_offsets_to_transaction")
            self._bounded(producer.commit_transaction, heartbeat, what="commit_transaction")
        except KafkaError as exc:
            return [m for m, _ in sent], self._after_failure(exc, heartbeat)
        return [m for m, _ in sent], None

    def _settle(self, msg: OutMessage, error: BaseException) -> OutMessage | None:
        """Inside a transaction one record's error fails all the others too: only errors naming the
        record count as its refusal (then its fallback after MAX_REFUSALS, at once when too large)."""
        if isinstance(error, _RECORD_REFUSALS):
            return self.publisher.settle(msg, error)
        return msg

    def _after_failure(self, error: BaseException, heartbeat) -> BaseException:
        """Aborts the transaction after `error` (unless fenced); returns the error."""
        if not is_fenced(error):
            self._abort(heartbeat)
        return error

    def _abort(self, heartbeat, when_stopping: bool = False) -> None:
        """abort_transaction; a producer that cannot abort (fatal state) is replaced: the new one's
        init_transactions aborts the old one's transaction on the broker. When stopping, the abort
        gets STOP_ABORT_S at most; what it leaves open the broker aborts."""
        try:
            self._bounded(self.producer.abort_transaction, heartbeat,
                          grace_s=STOP_ABORT_S if when_stopping else None, what="abort_transaction")
            return
        except _Stopped:
            log.warning("stopping before the abort was answered; the broker aborts the transaction "
                        "(at the latest when this agent's transactional id starts again)")
            return
        except KafkaError as exc:
            if is_fenced(exc):
                return
            if when_stopping:
                log.warning("abort failed while stopping (%s); the broker aborts the transaction", describe(exc))
                return
            log.warning("abort failed (%s); replacing the producer", describe(exc))
        if not self.publisher.replace_producer("the transaction could not be aborted"):
            raise _Stopped(abort_tried=True)  # stopping: no new producer

    def _bounded(self, call: Callable[[], Any], heartbeat, grace_s: float | None = None, what: str = "") -> Any:
        """call() on a helper thread (kafka-python's transactional calls block without a timeout while
        the broker is away): beats the heartbeat while waiting, raises _Stopped once a stop request
        is `grace_s` (default: self.grace_s) old, _Unanswered after answer_timeout_s."""
        started = time.monotonic()
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the publish thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name="ama-txn-call", daemon=True).start()
        grace = StopGrace(self.stop, self.grace_s if grace_s is None else grace_s)
        while not done.wait(self.poll_s):
            heartbeat()
            if grace.expired():
                raise _Stopped()
            if time.monotonic() - started > self.answer_timeout_s:
                raise _Unanswered(what or getattr(call, "__name__", "call"), time.monotonic() - started)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _tid(self) -> str:
        return str(getattr(self.producer, "config", {}).get("transactional_id"))
