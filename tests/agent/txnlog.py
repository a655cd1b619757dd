"""Reading a topic's log as the broker stores it: every record batch with its producer id and epoch,
and the commit/abort markers, captured from the raw FetchResponses kafka-python receives.

Two uses: `read_log` tells for each record whether its transaction committed or aborted (from the
markers, whatever the broker says in `aborted_transactions`), so a test can check exactly-once at
the level of the transactions even on a broker that does not filter aborted records; and
`FetchCapture` records a consumer's Fetch exchanges (the request's isolation level; the response's
high watermark, last stable offset, aborted_transactions and batches) as evidence of what a broker
answers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from kafka import KafkaConsumer
from kafka.record import MemoryRecords
from kafka.structs import TopicPartition


@dataclass
class Batch:
    partition: int
    base_offset: int
    last_offset: int
    producer_id: int
    producer_epoch: int
    transactional: bool
    control: bool
    abort: bool | None  # control batches: True for an abort marker, False for a commit marker
    records: list[tuple[int, bytes | None, list]]  # (offset, value, headers) of a data batch

    def brief(self) -> str:
        what = ("ABORT marker" if self.abort else "COMMIT marker") if self.control else \
            f"data {[v for _, v, _ in self.records][:3]}"
        return (f"[{self.base_offset}-{self.last_offset}] pid={self.producer_id} epoch={self.producer_epoch} "
                f"{'txn ' if self.transactional else ''}{what}")


@dataclass
class Exchange:
    """One partition of one Fetch: what was asked and what came back."""

    api_version: int
    isolation_level: int  # of the request: 0 READ_UNCOMMITTED, 1 READ_COMMITTED
    partition: int
    fetch_offset: int
    high_watermark: int
    last_stable_offset: int
    aborted_transactions: list[tuple[int, int]] | None  # (producer_id, first_offset)
    batches: list[Batch]

    def brief(self) -> str:
        return (f"FetchRequest v{self.api_version} isolation_level={self.isolation_level} partition "
                f"{self.partition} fetch_offset={self.fetch_offset} -> high_watermark={self.high_watermark} "
                f"last_stable_offset={self.last_stable_offset} aborted_transactions={self.aborted_transactions} "
                f"batches: " + "; ".join(b.brief() for b in self.batches))


def _batches(partition: int, raw: bytes | None) -> list[Batch]:
    out: list[Batch] = []
    if not raw:
        return out
    records = MemoryRecords(raw)
    batch = records.next_batch()
    while batch is not None:
        if batch.magic == 2:
            if batch.is_control_batch:
                marker = next(iter(batch))
                out.append(Batch(partition, batch.base_offset, batch.last_offset, batch.producer_id,
                                 batch.producer_epoch, batch.is_transactional, True, bool(marker.abort), []))
            else:
                out.append(Batch(partition, batch.base_offset, batch.last_offset, batch.producer_id,
                                 batch.producer_epoch, batch.is_transactional, False, None,
                                 [(r.offset, r.value, list(r.headers)) for r in batch]))
        batch = records.next_batch()
    return out


class FetchCapture:
    """Hooks one consumer's fetcher (kafka-python 3.0.12 internals: Fetcher._create_fetch_requests
    and _handle_fetch_response) to keep every Fetch exchange for `topic`."""

    def __init__(self, consumer: KafkaConsumer, topic: str):
        self.topic = topic
        self.exchanges: list[Exchange] = []
        fetcher = consumer._fetcher
        self._isolation: dict[int, int] = {}  # node -> isolation level of the request in flight
        create, handle = fetcher._create_fetch_requests, fetcher._handle_fetch_response

        def create_requests():
            requests = create()
            for node_id, (request, _offsets) in requests.items():
                self._isolation[node_id] = int(request.isolation_level)
            return requests

        def handle_response(node_id, fetch_offsets, send_time, response):
            for topic_data in response.responses:
                if topic_data.topic != topic:
                    continue
                for p in topic_data.partitions:
                    aborted = p.aborted_transactions
                    self.exchanges.append(Exchange(
                        response.API_VERSION, self._isolation.get(node_id, -1), p.partition_index,
                        fetch_offsets.get(TopicPartition(topic, p.partition_index), -1), p.high_watermark,
                        p.last_stable_offset,
                        None if aborted is None else [(a.producer_id, a.first_offset) for a in aborted],
                        _batches(p.partition_index, p.records)))
            return handle(node_id, fetch_offsets, send_time, response)

        fetcher._create_fetch_requests = create_requests
        fetcher._handle_fetch_response = handle_response

    def batches(self) -> list[Batch]:
        """Every batch seen, once, in log order per partition."""
        seen: dict[tuple[int, int], Batch] = {}
        for ex in self.exchanges:
            for b in ex.batches:
                seen.setdefault((b.partition, b.base_offset), b)
        return [seen[k] for k in sorted(seen)]


def read_to_end(consumer: KafkaConsumer, parts: list[TopicPartition], timeout: float) -> list:
    """Polls until each partition's position reached its high watermark (as the fetches report it:
    for a read_committed consumer this needs every transaction there to have ended)."""
    out: list = []
    deadline = time.monotonic() + timeout
    while True:
        for records in consumer.poll(timeout_ms=200).values():
            out.extend(records)
        marks = {tp: consumer.highwater(tp) for tp in parts}
        if all(hw is not None and consumer.position(tp) >= hw for tp, hw in marks.items()):
            return out
        if time.monotonic() > deadline:
            positions = {tp.partition: consumer.position(tp) for tp in parts}
            pytest.fail(f"timed out reading {parts[0].topic}: positions {positions}, high watermarks "
                        f"{ {tp.partition: hw for tp, hw in marks.items()} } (a transaction left open?)")


@dataclass
class Record:
    partition: int
    offset: int
    value: bytes | None
    headers: dict[str, bytes]
    producer_id: int
    producer_epoch: int
    state: str  # committed, aborted, open (no marker yet), plain (not transactional)


@dataclass
class Log:
    records: list[Record] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)

    def state(self, name: str) -> list[Record]:
        return [r for r in self.records if r.state == name]


def read_log(bootstrap: str, topic: str, timeout: float = 60.0) -> Log:
    """The whole topic as stored, each record with the outcome of its transaction, decided by the
    markers: a transactional batch belongs to the transaction its producer's next marker ends."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level="read_uncommitted")
    try:
        capture = FetchCapture(consumer, topic)
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        read_to_end(consumer, parts, timeout)
        batches = capture.batches()
    finally:
        consumer.close()
    log = Log(batches=batches)
    for i, b in enumerate(batches):
        if b.control:
            continue
        state = "plain"
        if b.transactional:
            marker = next((m for m in batches[i + 1:] if m.control and m.partition == b.partition
                           and m.producer_id == b.producer_id), None)
            state = "open" if marker is None else ("aborted" if marker.abort else "committed")
        for offset, value, headers in b.records:
            log.records.append(Record(b.partition, offset, value, {k: v for k, v in headers}, b.producer_id,
                                      b.producer_epoch, state))
    return log
