"""Delivery without Kafka: the publisher against a producer that fails, times out and acknowledges
out of order; the outbox that hands acknowledged batches back to the run loop; the committer
through a rebalance in the middle of a batch; and the whole run loop on fakes, with every commit
checked against the acknowledgements (at-least-once)."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from kafka.errors import (
    InvalidRecordError,
    KafkaConnectionError,
    KafkaTimeoutError,
    RebalanceInProgressError,
)
from kafka.structs import TopicPartition

from ama_stream.agent import runner as runner_module
from ama_stream.agent.delivery.commit import OffsetCommitter
from ama_stream.agent.outbox import Outbox
from ama_stream.agent.publish import OutMessage, Publisher
from ama_stream.agent.runner import Agent
from ama_stream.agent.settings import AgentSettings, RetrySection
from ama_stream.calibration import Policy, fit_calibration
from ama_stream.settings import load_settings

from .fakes import FakeConsumer, FakeProducer, FakeScorer, offsets, png, record

RETRY = RetrySection(initial_s=0.01, max_s=0.02)


def _messages(n):
    return [OutMessage("scores", b"cam", b"r%d" % i, []) for i in range(n)]


def _publisher(producer, stop=None, rebuild=None, errors=None):
    errors = [] if errors is None else errors
    return Publisher(producer, rebuild or (lambda: producer), RETRY, stop or threading.Event(),
                     on_error=lambda op, why: errors.append((op, why)), flush_timeout_s=0.01)


# -- Publisher ---------------------------------------------------------------------------------------

def test_acks_out_of_order_complete_the_batch_once_all_arrive():
    def reverse_one_at_a_time(p):  # each flush acknowledges only the newest pending record
        p.ack(p.pending()[-1:])

    producer = FakeProducer(reverse_one_at_a_time)
    beats = []
    assert _publisher(producer).publish(_messages(4), heartbeat=lambda: beats.append(1))
    assert [v for _, _, v, _ in producer.acked] == [b"r3", b"r2", b"r1", b"r0"]
    assert len(producer.futures) == 4 and producer.flushes == 4  # nothing sent twice
    assert beats  # liveness while waiting


def test_a_flush_that_times_out_keeps_waiting_without_resending():
    def slow(p):
        if p.flushes <= 3:
            raise KafkaTimeoutError("flush timed out")
        p.ack(p.pending())

    producer = FakeProducer(slow)
    assert _publisher(producer).publish(_messages(3))
    assert len(producer.futures) == 3 and len(producer.acked) == 3


def test_records_that_time_out_or_fail_retriably_are_sent_again_until_acknowledged():
    def flaky(p):
        for f in p.pending():
            if len(p.futures) <= 3:  # the first sends all time out in the producer
                f.fail(KafkaTimeoutError("expired in the accumulator"))
            elif f.message[2] == b"r1" and len(p.futures) <= 5:
                f.fail(KafkaConnectionError("down"))
            else:
                p.ack([f])

    producer, errors = FakeProducer(flaky), []
    assert _publisher(producer, errors=errors).publish(_messages(3))
    assert sorted(v for _, _, v, _ in producer.acked) == [b"r0", b"r1", b"r2"]
    assert len(producer.futures) > 3 and errors and all(op == "publish" for op, _ in errors)


def test_a_stop_cuts_the_wait_for_acks_short_and_reports_the_batch_unacknowledged():
    stop = threading.Event()
    producer = FakeProducer(lambda p: stop.set())  # never acknowledges; the operator stops the agent
    assert not _publisher(producer, stop=stop).publish(_messages(2))
    assert producer.acked == []


def test_a_producer_that_cannot_be_rebuilt_during_a_stop_gives_up():
    producer = FakeProducer(lambda p: [f.fail(InvalidRecordError("fatal")) for f in p.pending()])
    stop = threading.Event()
    pub = _publisher(producer, stop=stop, rebuild=lambda: stop.set())  # rebuild returns None: stopping
    assert not pub.publish(_messages(1))


# -- Outbox ------------------------------------------------------------------------------------------

def _drain(outbox, n, timeout=10.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(outbox.acknowledged())
        time.sleep(0.005)
    return out


def test_the_outbox_hands_acknowledged_batches_back_in_order_to_the_caller_thread():
    publish_threads = []

    def publish(messages):
        publish_threads.append(threading.current_thread().name)
        time.sleep(0.01 * len(messages))
        return True

    outbox = Outbox(publish)
    try:
        for i in range(4):
            outbox.submit(f"batch-{i}", _messages(4 - i))
        done = _drain(outbox, 4)
        assert [d.item for d in done] == ["batch-0", "batch-1", "batch-2", "batch-3"]
        assert all(d.ok and d.publish_s > 0 for d in done)
        assert set(publish_threads) == {"ama-publish"} and outbox.idle()
    finally:
        outbox.close()


def test_an_unacknowledged_batch_comes_back_not_ok_and_the_ones_behind_it_are_dropped():
    results = iter([True, False, True])
    outbox = Outbox(lambda messages: next(results))
    try:
        for i in range(3):
            outbox.submit(i, _messages(1))
        outbox.wait_idle()
        done = list(outbox.acknowledged())
        assert [(d.item, d.ok) for d in done] == [(0, True), (1, False)] and outbox.gave_up and outbox.idle()
    finally:
        outbox.close()


def test_an_error_on_the_publish_thread_is_raised_on_the_loop():
    def boom(messages):
        raise ValueError("bug")

    outbox = Outbox(boom)
    try:
        outbox.submit(0, _messages(1))
        outbox._queue.join()
        with pytest.raises(RuntimeError, match="publishing failed unexpectedly: ValueError: bug"):
            list(outbox.acknowledged())
    finally:
        outbox.close()


# -- OffsetCommitter ---------------------------------------------------------------------------------

class CommitConsumer:
    """commit_async with a callback answers later (as kafka-python does inside poll); without one
    (the rebalance listener) it returns an awaitable."""

    def __init__(self, fail_revocation_commit=False):
        self.sent: list[dict] = []
        self.callbacks: list = []
        self.sync: list[dict] = []
        self.fail_revocation_commit = fail_revocation_commit

    def commit_async(self, offsets, callback=None):
        self.sent.append({tp.partition: m.offset for tp, m in offsets.items()})
        if callback is not None:
            self.callbacks.append((callback, offsets))
            return None

        async def answer():
            if self.fail_revocation_commit:
                raise KafkaConnectionError("down")
        return answer()

    def answer(self, response=None):
        for callback, offsets in self.callbacks:
            callback(offsets, response)
        self.callbacks.clear()

    def commit(self, offsets=None, timeout_ms=None):
        self.sync.append({tp.partition: m.offset for tp, m in offsets.items()})


P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


def _revoke_on_io_thread(committer, partitions):
    """The rebalance listener runs on kafka-python's IO thread while the loop waits in poll()."""
    t = threading.Thread(target=lambda: asyncio.run(committer.revoked(set(partitions))))
    t.start()
    t.join()


def test_a_rebalance_mid_batch_commits_what_is_done_and_leaves_the_rest_to_the_next_owner():
    consumer = CommitConsumer()
    c = OffsetCommitter(consumer)
    e0 = c.epoch()
    c.mark_done({P0: 10, P1: 10}, e0)  # batch A: acknowledged, not yet committed
    # batch B (p0 10-19, p1 10-19) was polled at e0 and is being published when p1 is revoked
    _revoke_on_io_thread(c, [P1])
    assert consumer.sent == [{1: 10}]  # the revocation commits what was done for p1 before letting go
    c.mark_done({P0: 20, P1: 20}, e0)  # batch B acknowledged after the revocation
    c.commit(now=0.0)
    assert consumer.sent[-1] == {0: 20}  # p1's 10-19 are the next owner's to re-read (duplicates, no gap)
    consumer.answer()
    # p1 assigned to this consumer again; a batch polled now (at the new epoch) commits as usual
    c.assigned({P1})
    c.mark_done({P1: 15}, c.epoch())
    c.commit(now=0.1)
    assert consumer.sent[-1] == {1: 15} and c.joined


def test_a_failed_revocation_commit_still_forgets_the_partition():
    consumer = CommitConsumer(fail_revocation_commit=True)
    c = OffsetCommitter(consumer)
    e0 = c.epoch()
    c.mark_done({P1: 5}, e0)
    _revoke_on_io_thread(c, [P1])
    c.mark_done({P1: 9}, e0)
    c.commit(now=0.0)
    assert consumer.sent == [{1: 5}] and c.committed_total() == 0  # nothing more for p1


def test_a_lost_partition_is_forgotten_without_a_commit():
    consumer = CommitConsumer()
    c = OffsetCommitter(consumer)
    e0 = c.epoch()
    c.mark_done({P0: 3, P1: 4}, e0)
    c.lost({P0})
    c.commit(now=0.0)
    assert consumer.sent == [{1: 4}]


def test_commits_are_not_repeated_while_on_their_way_and_failures_go_out_again():
    consumer, errors = CommitConsumer(), []
    c = OffsetCommitter(consumer, on_broker_error=lambda op, why: errors.append(op), resend_s=5.0)
    c.mark_done({P0: 4}, c.epoch())
    c.commit(now=0.0)
    c.commit(now=1.0)
    assert consumer.sent == [{0: 4}]  # the same offsets are on their way
    consumer.answer(RebalanceInProgressError())
    assert errors == []  # a rebalance is no broker problem
    c.commit(now=2.0)
    assert len(consumer.sent) == 1
    c.commit(now=5.0)  # resend_s passed: the refused commit goes out again
    consumer.answer(KafkaConnectionError("down"))
    assert len(consumer.sent) == 2 and errors == ["commit"]
    c.mark_done({P0: 8}, c.epoch())
    c.commit(now=5.5)  # new offsets go out at once
    consumer.answer()
    assert consumer.sent[-1] == {0: 8} and c.committed_total() == 8
    c.commit(now=20.0)
    assert len(consumer.sent) == 3  # nothing left to commit


def test_after_a_batch_stayed_unacknowledged_nothing_more_is_committed():
    consumer = CommitConsumer()
    c = OffsetCommitter(consumer)
    c.mark_done({P0: 4}, c.epoch())
    c.halt()
    c.commit(now=0.0)
    c.commit_final()
    assert consumer.sent == [] and consumer.sync == []


def test_the_final_commit_is_synchronous():
    consumer = CommitConsumer()
    c = OffsetCommitter(consumer)
    c.mark_done({P0: 4, P1: 2}, c.epoch())
    c.commit_final()
    assert consumer.sync == [{0: 4, 1: 2}] and c.committed_total() == 6
    c.commit_final()
    assert len(consumer.sync) == 1


def test_offsets_helper():
    assert {tp.partition: m.offset for tp, m in offsets(p0=3).items()} == {0: 3}


# -- the whole loop on fakes -------------------------------------------------------------------------

F0, F1 = TopicPartition("frames", 0), TopicPartition("frames", 1)


def _agent_on_fakes(monkeypatch, records, on_flush=None, before_poll=None, **overrides):
    producer = FakeProducer(on_flush)
    frame_of = {}  # (partition, offset) -> frame id, to match outputs to frames

    def acked(tp, offset):
        fid = frame_of[(tp.partition, offset)]
        return any(dict(h).get("frame-id") == fid.encode() or dict(h).get("source-offset") == str(offset).encode()
                   and dict(h).get("source-partition") == str(tp.partition).encode() for _, _, _, h in producer.acked)

    for tp, recs in records.items():
        for r in recs:
            frame_of[(tp.partition, r.offset)] = f"{tp.partition}-{r.offset}"
    consumer = FakeConsumer(records, acked, before_poll)
    monkeypatch.setattr(runner_module, "make_consumer", lambda settings: consumer)
    monkeypatch.setattr(runner_module, "make_producer", lambda *a, **k: producer)
    import torch
    base = {"kafka": {"bootstrap_servers": "fake:9092"}, "topics": {"frames": "frames", "scores": "scores",
            "alerts": "alerts", "dead_letter": "dlq"}, "metrics": {"enabled": False}, "device": "cpu",
            "torch_threads": torch.get_num_threads(), "batching": {"max_batch": 4, "max_wait_ms": 5},
            "drift": {"window": 10, "min_frames": 5}}
    base.update(overrides)
    settings = load_settings(AgentSettings, None, base)
    cal = fit_calibration(np.random.default_rng(0).normal(-0.9, 0.05, 400), "fake-model", Policy.make("upper", 0.01))
    return Agent(settings, scorer=FakeScorer(), calibration=cal), consumer, producer


def _frames(partition, n, bright=(), bad=()):
    out = []
    for i in range(n):
        value = b"not an image" if i in bad else png(250 if i in bright else 5)
        out.append(record(partition=partition, offset=i, value=value,
                          headers=[("frame-id", f"{partition}-{i}".encode()), ("camera-id", b"cam-%d" % partition)]))
    return out


def test_the_loop_scores_publishes_and_commits_every_frame_after_its_acknowledgement(monkeypatch):
    records = {F0: _frames(0, 9, bright={3}), F1: _frames(1, 7, bad={2})}
    acks_late = lambda p: p.ack(p.pending()[::-1])  # noqa: E731 - acknowledged in reverse order
    agent, consumer, producer = _agent_on_fakes(monkeypatch, records, on_flush=acks_late, max_frames=16)
    assert agent.run() == 0
    by_topic = {}
    for topic, key, value, headers in producer.acked:
        by_topic.setdefault(topic, []).append(dict(headers)["frame-id"].decode() if topic != "dlq"
                                              else dict(headers)["source-offset"].decode())
    assert sorted(by_topic["scores"]) == sorted(f"{p}-{i}" for p, n in ((0, 9), (1, 7)) for i in range(n)
                                               if (p, i) != (1, 2))
    assert by_topic["alerts"] == ["0-3"] and by_topic["dlq"] == ["2"]
    assert consumer.committed == {F0: 9, F1: 7} and consumer.closed and producer.closed
    assert (agent.stats.scored, agent.stats.alerts, agent.stats.dead_lettered) == (15, 1, 1)
    assert agent.metrics.ready._value.get() == 0  # stopped


def test_the_loop_through_a_rebalance_mid_stream_commits_no_frame_before_its_acknowledgement(monkeypatch):
    """p1 is revoked at the third poll, while its frames 0-3 (polled by the first two) are in flight
    and unacknowledged, and assigned again at the sixth: their batches are still published, but
    nothing of p1 is committed while it is not ours, and the new assignment re-reads them
    (duplicates, never a gap)."""
    consumer = None

    def rebalance(n, c):
        if n == 3:
            assert c.position_of[F1] == 4 and c.committed == {}
            c.revoke([F1])
        if n == 6:
            c.assign([F1])

    def ack_after_the_rebalance(p):
        if consumer.polls >= 3:
            p.ack(p.pending())
        else:
            time.sleep(0.001)

    records = {F0: _frames(0, 12), F1: _frames(1, 12)}
    agent, consumer, producer = _agent_on_fakes(monkeypatch, records, on_flush=ack_after_the_rebalance,
                                                before_poll=rebalance, idle_exit_s=0.3)
    assert agent.run() == 0
    assert consumer.committed == {F0: 12, F1: 12}  # every commit was checked against the acks on the way
    scored = sorted(dict(h)["frame-id"].decode() for t, _, _, h in producer.acked if t == "scores")
    assert scored == sorted([f"{p}-{i}" for p in (0, 1) for i in range(12)] + [f"1-{i}" for i in range(4)])
    assert consumer.revoked_commits == []  # nothing committed for p1 while it was not assigned


def test_a_stop_while_acks_are_missing_commits_nothing_unacknowledged(monkeypatch):
    agent = None

    def never_ack(p):
        agent.stop()

    records = {F0: _frames(0, 6)}
    agent, consumer, producer = _agent_on_fakes(monkeypatch, records, on_flush=never_ack)
    assert agent.run() == 0
    assert consumer.committed == {} and producer.acked == []
