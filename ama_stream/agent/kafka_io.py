"""Building kafka-python clients from the settings, waiting for the broker with backoff.

kafka-python resolves the broker version while constructing a client; when the broker is
down the constructor raises after `bootstrap_timeout_ms` and leaves the client's network
thread running. `build_client` closes that half-built client (through kafka-python's public
`kafka_client` factory option) so a long outage with retries does not leak threads.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.net.compat import KafkaNetClient

from .settings import AgentSettings, KafkaSection, RetrySection

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_COMPRESSION = "lz4"  # the producers' compression_type unless producer.compression_type says otherwise


class Backoff:
    """initial, 2x initial, ... up to max, with +-10% jitter so agents do not retry in lockstep."""

    def __init__(self, initial_s: float, max_s: float):
        self.initial_s, self.max_s = initial_s, max(max_s, initial_s)
        self._next = initial_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay * random.uniform(0.9, 1.1)

    def reset(self) -> None:
        self._next = self.initial_s


def describe(exc: BaseException) -> str:
    """'Type: message' without kafka-python's habit of repeating the type inside the message."""
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def build_client(cls: type[T], **config: Any) -> T:
    """cls(**config); if that fails, the network client it created is closed before re-raising."""
    created: list[KafkaNetClient] = []

    def client_factory(**kwargs: Any) -> KafkaNetClient:
        client = KafkaNetClient(**kwargs)
        created.append(client)
        return client

    try:
        return cls(kafka_client=client_factory, **config)
    except BaseException:
        for client in created:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - cleanup after a failure already being raised
                log.debug("closing a half-built kafka client failed", exc_info=True)
        raise


class BrokerUnreachable(RuntimeError):
    """The broker stayed unreachable for longer than the configured patience."""


def connect_with_retry(
    make: Callable[[], T],
    what: str,
    kafka: KafkaSection,
    retry: RetrySection,
    stop: threading.Event,
    on_failure: Callable[[str], None] = lambda reason: None,
) -> T | None:
    """make() until it succeeds or `stop` is set (then None); one warning line per attempt.
    BrokerUnreachable once retry.give_up_after_s have passed without a connection."""
    backoff = Backoff(retry.initial_s, retry.max_s)
    attempt = 0
    started = time.monotonic()
    while not stop.is_set():
        attempt += 1
        try:
            client = make()
        except KafkaError as exc:
            delay = backoff.next()
            reason = describe(exc)
            waited = time.monotonic() - started
            if retry.give_up_after_s is not None and waited + delay >= retry.give_up_after_s:
                raise BrokerUnreachable(f"{what}: broker {kafka.bootstrap_servers} not reachable for {waited:.0f} s "
                                        f"({attempt} attempts, last: {reason}); giving up (--give-up-after-s "
                                        f"{retry.give_up_after_s:g})") from None
            log.warning("%s: broker %s not reachable (attempt %d, %s); retrying in %.1f s",
                        what, kafka.bootstrap_servers, attempt, reason, delay)
            on_failure(reason)
            stop.wait(delay)
            continue
        if attempt > 1:
            log.info("%s: connected to %s after %d attempts", what, kafka.bootstrap_servers, attempt)
        return client
    return None


def available_codecs() -> list[str]:
    """The compression codecs this kafka-python can read and write (gzip always; the others need
    their libraries: lz4, python-snappy, zstandard, all dependencies of ama-stream)."""
    from kafka import codec

    present = {"gzip": True, "snappy": codec.has_snappy(), "lz4": codec.has_lz4(), "zstd": codec.has_zstd()}
    return [name for name, ok in present.items() if ok]


def consumer_config(settings: AgentSettings) -> dict[str, Any]:
    cfg: dict[str, Any] = {"auto_offset_reset": "earliest", **settings.consumer}
    cfg.update(settings.kafka.client_config())
    cfg.update(
        group_id=settings.group_id,
        enable_auto_commit=False,  # offsets are committed only after the records are acknowledged
        max_poll_records=settings.batching.max_batch,
    )
    if settings.exactly_once:
        # frames of aborted transactions are skipped, and the committed offsets are read only once
        # no transaction that commits offsets of the group is pending (KIP-447 require_stable)
        cfg["isolation_level"] = "read_committed"
    cfg.setdefault("bootstrap_timeout_ms", int(settings.retry.attempt_timeout_s * 1000))
    return cfg


def producer_config(kafka: KafkaSection, producer: dict[str, Any], connect_timeout_s: float,
                    transactional_id: str | None = None) -> dict[str, Any]:
    # max_block_ms bounds how long send() waits for metadata while the broker is away (default 60 s).
    # lz4: measured as fast as no compression for score records, at about a fourteenth of the bytes
    # (docs/benchmarks.md); readers need lz4 (librdkafka and Java have it; kafka-python: the lz4 package).
    cfg: dict[str, Any] = {"max_block_ms": 10_000, "compression_type": DEFAULT_COMPRESSION, **producer}
    cfg.update(kafka.client_config())
    cfg["acks"] = "all"
    if transactional_id is not None:
        cfg["transactional_id"] = transactional_id  # implies enable_idempotence
    cfg.setdefault("bootstrap_timeout_ms", int(connect_timeout_s * 1000))
    return cfg


def make_consumer(settings: AgentSettings) -> KafkaConsumer:
    return build_client(KafkaConsumer, **consumer_config(settings))


def make_producer(kafka: KafkaSection, producer: dict[str, Any], connect_timeout_s: float,
                  transactional_id: str | None = None) -> KafkaProducer:
    """A producer; with a `transactional_id`, also initialised for transactions (init_transactions):
    the broker then aborts (or completes) what an earlier producer with that id left open and fences it."""
    client = build_client(KafkaProducer, **producer_config(kafka, producer, connect_timeout_s, transactional_id))
    if transactional_id is not None:
        try:
            client.init_transactions()
        except BaseException:
            client.close(timeout=0)
            raise
    return client


def ensure_topics(kafka: KafkaSection, partitions: dict[str, int], replication: int = 1) -> list[str]:
    """Creates the topics that do not exist yet (name -> partition count); returns the ones created."""
    admin = build_client(KafkaAdminClient, **kafka.client_config())
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, count, replication) for name, count in partitions.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # created meanwhile by someone else (or auto-created): fine
        return [t.name for t in new]
    finally:
        admin.close()
