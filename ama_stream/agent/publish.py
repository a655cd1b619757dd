"""Publishing a batch's records and waiting until the broker acknowledged every one (acks=all).

A record whose send fails for a retriable reason (the broker is down, a leader moved) is sent
again after a backoff, for as long as it takes: the batch's offsets are committed only once all
its records are acknowledged, so giving up would lose frames. Only a stop request bounds the wait
(after `grace_s`); the batch then stays uncommitted and is read again by whoever owns its
partitions next.

A record the producer or broker REFUSES (too large, or any non-retriable error MAX_REFUSALS times)
is a per-frame failure, not an outage: it is replaced by its fallback -- for a score record, a
dead letter of the frame without its value; for a dead letter, itself without its value -- and a
refused fallback is given up (logged, counted). Retrying it would stall its partition forever and
republish the batch's other records on every restart.

A non-retriable failure can leave kafka-python's (idempotent) producer in a fatal state for good,
e.g. after a broker lost its producer-id state; the producer is then replaced by a new one.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Callable

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError

from .kafka_io import Backoff, describe
from .records import OutMessage
from .settings import RetrySection

log = logging.getLogger(__name__)

__all__ = ["MAX_REFUSALS", "OutMessage", "Publisher", "RetryPause", "StopGrace"]

MAX_REFUSALS = 3  # non-retriable failures of one record before its fallback takes its place


class StopGrace:
    """A stop request honoured once it is `grace_s` old (the records in flight get that long)."""

    def __init__(self, stop: threading.Event, grace_s: float):
        self.stop = stop
        self.grace_s = grace_s
        self._seen: float | None = None

    def expired(self) -> bool:
        if not self.stop.is_set():
            return False
        if self._seen is None:
            self._seen = time.monotonic()
        return time.monotonic() - self._seen > self.grace_s


class RetryPause:
    """The wait between two tries of a batch: a growing backoff, ended by a stop request once its
    grace period is over."""

    def __init__(self, retry: RetrySection, stop: threading.Event, grace_s: float):
        self.backoff = Backoff(retry.initial_s, retry.max_s)
        self.stop = stop
        self.grace = StopGrace(stop, grace_s)

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or None: stop now."""
        return None if self.grace.expired() else self.backoff.next()

    def sleep(self, delay: float) -> None:
        if self.stop.is_set():
            time.sleep(delay)  # within the grace period; stop.wait would return at once
        else:
            self.stop.wait(delay)


class Publisher:
    def __init__(
        self,
        producer: KafkaProducer,
        rebuild: Callable[[], KafkaProducer | None],
        retry: RetrySection,
        stop: threading.Event,
        on_error: Callable[[str, str], None] = lambda operation, reason: None,
        flush_timeout_s: float = 10.0,
        grace_s: float = 10.0,
        on_give_up: Callable[[str, str], None] = lambda topic, reason: None,
    ):
        self.producer = producer
        self.rebuild = rebuild  # a new connected producer, or None when stopping
        self.retry = retry
        self.stop = stop
        self.on_error = on_error
        self.flush_timeout_s = flush_timeout_s
        self.grace_s = grace_s
        self.on_give_up = on_give_up

    def _send(self, msg: OutMessage) -> tuple[OutMessage, object]:
        """(the message actually sent, producer.send's future or the exception it raised synchronously).
        A record the producer refuses as too large goes straight to its fallback."""
        try:
            return msg, self.producer.send(msg.topic, key=msg.key, value=msg.value, headers=msg.headers)
        except MessageSizeTooLargeError as exc:
            nxt = self._after_refusal(msg, exc)
            return (self._send(nxt) if nxt is not None else (msg, None))
        except KafkaError as exc:
            return msg, exc

    def _after_refusal(self, msg: OutMessage, error: BaseException) -> OutMessage | None:
        why = describe(error)
        nxt = msg.next_after_refusal(why)
        if nxt is None:
            log.error("giving up a record for topic %s that the producer/broker refuses (%s): nothing smaller to send",
                      msg.topic, why)
        else:
            log.warning("a record for topic %s is refused (%s); sending %s instead", msg.topic, why,
                        "its dead letter" if nxt.topic != msg.topic else "it without its value")
        self.on_give_up(msg.topic, why)
        return nxt

    def settle(self, msg: OutMessage, error: BaseException) -> OutMessage | None:
        """The message to send again after `error`: the same (retriable), its next refusal count, its
        fallback once refused MAX_REFUSALS times (or at once when too large), or None (given up)."""
        if getattr(error, "retriable", False):
            return msg
        msg = replace(msg, refusals=msg.refusals + 1)
        if isinstance(error, MessageSizeTooLargeError) or msg.refusals >= MAX_REFUSALS:
            return self._after_refusal(msg, error)
        return msg

    def _flush(self) -> None:
        try:
            self.producer.flush(timeout=self.flush_timeout_s)
        except KafkaTimeoutError:
            log.warning("records still unacknowledged after %.0f s; waiting", self.flush_timeout_s)

    def send(self, messages: list[OutMessage]) -> list[tuple[OutMessage, object]]:
        """Hands the messages to the producer (asynchronous); wait() collects the acknowledgements.
        Messages given up at once (refused, with nothing smaller to send) are left out."""
        return [(msg, fut) for msg, fut in map(self._send, messages) if fut is not None]

    def collect(self, sent, heartbeat) -> tuple[list[OutMessage], list[BaseException], bool]:
        """Waits for `sent`: (messages to send again, their errors, True if a stop cut the wait short)."""
        failed: list[OutMessage] = []
        errors: list[BaseException] = []
        waiting = sent
        while True:
            if any(not isinstance(fut, BaseException) and not fut.is_done for _, fut in waiting):
                self._flush()
            still = []
            for msg, fut in waiting:
                if isinstance(fut, BaseException):
                    failed.append(msg)
                    errors.append(fut)
                elif not fut.is_done:
                    still.append((msg, fut))
                elif fut.failed():
                    failed.append(msg)
                    errors.append(fut.exception)
            waiting = still
            if not waiting:
                return failed, errors, False
            # Records still in the producer's hands complete (ack or error) by its delivery timeout.
            if self.stop.is_set():
                return failed, errors, True
            heartbeat()

    def wait(self, sent: list[tuple[OutMessage, object]], heartbeat=lambda: None) -> bool:
        """True once every message is acknowledged; False only if a stop request cut the retries short."""
        pause = RetryPause(self.retry, self.stop, self.grace_s)
        total = len(sent)
        while sent:
            failed, errors, cut_short = self.collect(sent, heartbeat)
            if cut_short:
                return False
            todo = [m for m in (self.settle(m, e) for m, e in zip(failed, errors)) if m is not None]
            if not todo:
                return True
            outage = [e for e in errors if getattr(e, "retriable", False)]
            fatal = [e for e in errors
                     if not getattr(e, "retriable", False) and not isinstance(e, MessageSizeTooLargeError)]
            reason = "; ".join(sorted({describe(e) for e in errors}))
            if not outage and not fatal:  # only records refused: their fallbacks go out now, no backoff
                sent = self.send(todo)
                continue
            self.on_error("publish", reason)
            delay = pause.next_delay()
            if delay is None:
                return False
            log.warning("publishing %d of %d records failed (%s); retrying in %.1f s", len(todo), total, reason, delay)
            heartbeat()
            pause.sleep(delay)
            if fatal and not self.replace_producer(reason):
                return False
            sent = self.send(todo)
        return True

    def replace_producer(self, reason: str) -> bool:
        log.warning("replacing the producer after a non-retriable error (%s)", reason)
        old = self.producer
        try:
            old.close(timeout=0)
        except Exception as exc:  # noqa: BLE001 - the old producer is broken anyway
            log.debug("closing the failed producer: %s", exc)
        new = self.rebuild()
        if new is None:
            return False
        self.producer = new
        return True

    def publish(self, messages: list[OutMessage], heartbeat=lambda: None) -> bool:
        """send() then wait(): True once every message is acknowledged (or refused and replaced)."""
        return self.wait(self.send(messages), heartbeat=heartbeat)
