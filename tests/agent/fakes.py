"""Stand-ins for kafka-python's consumer and producer and for the Scorer, for the agent's stages
and its whole loop without a broker."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata, TopicPartition

from ama_stream.agent.frames import PNG, encode_frame
from ama_stream.preprocess import PreprocessSpec, to_tensor
from ama_stream.tiling import TileBatch


def record(topic="frames", partition=0, offset=0, value=b"", headers=(), key=b"cam-0") -> ConsumerRecord:
    return ConsumerRecord(topic, partition, -1, offset, 0, 0, key, value, list(headers), None, 0, 0, 0)


def png(level: int, size: int = 28) -> bytes:
    """A flat gray frame: the fake scorer's R is its brightness."""
    return encode_frame(np.full((size, size), level, dtype=np.uint8), PNG)


class FakeScorer:
    """The Scorer's face as the agent uses it: spec, device, model_id, r_scores. R = mean pixel in
    [-1, 1] plus `offset`; `fail(inputs)` may raise to make a batch (or a frame) fail. Like the
    Scorer, it refuses inputs of another size or channel count than its spec."""

    def __init__(self, fail: Callable[[torch.Tensor], None] | None = None, nan_above: float | None = None,
                 model_id: str = "fake-model", spec: PreprocessSpec = PreprocessSpec(32, 1), offset: float = 0.0):
        self.spec = spec
        self.device = torch.device("cpu")
        self.model_id = model_id
        self.checkpoint = SimpleNamespace(model_id=self.model_id)
        self.fail = fail
        self.nan_above = nan_above
        self.offset = offset
        self.calls: list[int] = []

    def r_scores(self, x, batch_size: int = 256, desc=None) -> np.ndarray:
        if isinstance(x, TileBatch):  # the agent's decoded batches: whole-image inputs, one per frame
            x = to_tensor(x.tiles)
        self.calls.append(len(x))
        expected = (self.spec.channels, self.spec.image_size, self.spec.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(x.shape)}")
        if self.fail is not None:
            self.fail(x)
        r = x.double().mean(dim=(1, 2, 3)).numpy() + self.offset
        if self.nan_above is not None:
            r = np.where(r > self.nan_above, np.nan, r)
        return r


class Future:
    """A producer future the test settles: is_done / failed() / exception, as kafka-python's."""

    def __init__(self, message):
        self.message = message
        self.is_done = False
        self.exception: BaseException | None = None

    def succeed(self) -> None:
        self.is_done = True

    def fail(self, error: BaseException) -> None:
        self.is_done, self.exception = True, error

    def failed(self) -> bool:
        return self.exception is not None


class FakeProducer:
    """send() returns a pending Future; flush() calls `on_flush(producer)`, which settles futures
    (by default: acknowledges all pending ones) or raises KafkaTimeoutError."""

    def __init__(self, on_flush: Callable[["FakeProducer"], None] | None = None):
        self.futures: list[Future] = []
        self.acked: list[tuple[str, bytes | None, bytes | None, list]] = []  # (topic, key, value, headers)
        self.flushes = 0
        self.on_flush = on_flush or (lambda p: p.ack(p.pending()))
        self.closed = False

    def send(self, topic, key=None, value=None, headers=None):
        fut = Future((topic, key, value, list(headers or [])))
        self.futures.append(fut)
        return fut

    def pending(self) -> list[Future]:
        return [f for f in self.futures if not f.is_done]

    def ack(self, futures) -> None:
        for f in futures:
            f.succeed()
            self.acked.append(f.message)

    def flush(self, timeout=None):
        self.flushes += 1
        self.on_flush(self)

    def close(self, timeout=None):
        self.closed = True


class FakeConsumer:
    """A consumer group of one over fixed per-partition record lists. The rebalance listener runs
    inside poll() (as kafka-python 3 runs it on its IO thread while poll waits); `before_poll(n,
    consumer)` may revoke and reassign partitions before the n-th poll. Every commit is checked
    against `acked(tp, offset)`: committing past a frame whose records are not acknowledged fails
    the test (at-least-once)."""

    def __init__(self, records: dict[TopicPartition, list], acked: Callable[[TopicPartition, int], bool],
                 before_poll: Callable[[int, "FakeConsumer"], None] | None = None):
        self.records = records
        self.acked = acked
        self.before_poll = before_poll or (lambda n, c: None)
        self.position_of = {tp: 0 for tp in records}
        self.assigned: set[TopicPartition] = set()
        self.listener = None
        self.polls = 0
        self.committed: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.revoked_commits: list[dict[TopicPartition, int]] = []  # commits naming a partition not assigned
        self.paused: set[TopicPartition] = set()  # pause()d: poll() returns nothing of theirs
        self.events: list[tuple] = []  # ("poll", n, tp, first offset, count), and subclasses' own
        self.closed = False

    def subscribe(self, topics, listener=None):
        self.listener = listener

    def _listen(self, event: str, partitions) -> None:
        asyncio.run(getattr(self.listener, event)(set(partitions)))

    def revoke(self, partitions) -> None:
        self._listen("on_partitions_revoked", partitions)
        self.assigned -= set(partitions)

    def assign(self, partitions) -> None:
        self.assigned |= set(partitions)
        for tp in partitions:  # a (re)assigned partition is read from its committed offset
            self.position_of[tp] = self.committed.get(tp, 0)
        self._listen("on_partitions_assigned", partitions)

    def poll(self, timeout_ms=0, max_records=None):
        self.polls += 1
        if self.polls == 1:
            self.assign(self.records)
        self.before_poll(self.polls, self)
        out, budget = {}, max_records or 1 << 30
        share = -(-budget // max(1, len(self.assigned)))  # spread over the partitions, as fetches are
        for tp in sorted(self.assigned - self.paused):
            pos = self.position_of[tp]
            got = self.records[tp][pos : pos + min(share, budget)]
            if got:
                out[tp] = got
                self.events.append(("poll", self.polls, tp, pos, len(got)))
                self.position_of[tp] = pos + len(got)
                budget -= len(got)
        return out

    def _commit(self, offsets) -> None:
        plain = {tp: meta.offset for tp, meta in offsets.items()}
        if any(tp not in self.assigned for tp in plain):
            self.revoked_commits.append(plain)
        for tp, offset in plain.items():
            for o in range(self.committed.get(tp, 0), offset):
                assert self.acked(tp, o), f"committed {tp} past frame {o} whose records are not acknowledged"
            self.committed[tp] = max(self.committed.get(tp, 0), offset)
        self.commits.append(plain)

    def commit_async(self, offsets, callback=None):
        self._commit(offsets)
        if callback is not None:
            callback(offsets, None)
            return None

        async def done():
            return None
        return done()

    def commit(self, offsets=None, timeout_ms=None):
        self._commit(offsets)

    def assignment(self):
        return set(self.assigned)

    def pause(self, *partitions):
        assert all(tp in self.assigned for tp in partitions), "pause() of a partition not assigned"
        self.paused |= set(partitions)
        self.events.append(("pause", *sorted(partitions)))

    def resume(self, *partitions):
        self.paused -= set(partitions)
        self.events.append(("resume", *sorted(partitions)))

    def end_offsets(self, partitions, timeout_ms=None):
        return {tp: len(self.records[tp]) for tp in partitions}

    def position(self, tp, timeout_ms=None):
        return self.position_of[tp]

    def close(self, autocommit=False, timeout_ms=None):
        self.closed = True


def offsets(**by_partition) -> dict[TopicPartition, OffsetAndMetadata]:
    """offsets(p0=10) -> {TopicPartition('t', 0): OffsetAndMetadata(10, '', -1)}"""
    return {TopicPartition("t", int(k[1:])): OffsetAndMetadata(v, "", -1) for k, v in by_partition.items()}
