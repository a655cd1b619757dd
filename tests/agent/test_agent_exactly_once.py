"""delivery: exactly-once. A batch's records and its consumed offsets go in one Kafka transaction.

Without a broker: the transaction unit aborts on a failure and commits no offsets with it, stops on
fencing, drops a batch whose group generation is over; the committer sends no commit of its own and
holds a revocation until the transaction in progress ended; the whole loop through a rebalance
publishes every frame in exactly one committed transaction.

With the broker: the Fetch exchange that decides whether read_committed consumers skip aborted
records (`broker_txn`: strict xfail on the embedded tansu, which answers it wrongly); five kill -9s
and restarts (exactly once through a read_committed consumer: `broker_txn`; exactly once in the
committed transactions, the offsets only with them: on any broker); a second agent with the same
agent id fences the first.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import typing
import uuid
from collections import Counter

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import (
    CommitFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
)
from kafka.structs import TopicPartition

from ama_stream.agent import runner as runner_module
from ama_stream.agent.delivery.fencing import TransactionalCommitter
from ama_stream.agent.kafka_io import consumer_config, ensure_topics, make_producer, producer_config
from ama_stream.agent.publish import Publisher
from ama_stream.agent.records import OutMessage
from ama_stream.agent.runner import Agent
from ama_stream.agent.settings import AgentSettings, Delivery, KafkaSection, RetrySection
from ama_stream.agent.delivery.txn import Outcome, ProducerFenced, Transactions, TransactionUnanswered, TxnBatch, is_fenced
from ama_stream.calibration import Policy, fit_calibration
from ama_stream.commands.serve import DELIVERY_MODES
from ama_stream.settings import SettingsError, load_settings

from .conftest import AgentProcess, Topics, committed_offsets, publish, random_items, read_all, wait_for
from .fakes import FakeConsumer, FakeProducer, FakeScorer, png, record
from .txnlog import FetchCapture, read_log, read_to_end

RETRY = RetrySection(initial_s=0.01, max_s=0.02)
P0, P1 = TopicPartition("frames", 0), TopicPartition("frames", 1)


# -- settings ------------------------------------------------------------------------------------------

def _settings(**overrides) -> AgentSettings:
    return load_settings(AgentSettings, None, {"kafka": {"bootstrap_servers": "k:9092"}, **overrides})


def test_exactly_once_is_opt_in_and_derives_a_stable_transactional_id():
    assert typing.get_args(Delivery) == DELIVERY_MODES  # serve's --delivery choices
    plain = _settings()
    assert plain.delivery == "at-least-once" and plain.transactional_id is None
    assert "isolation_level" not in consumer_config(plain)
    eos = _settings(delivery="exactly-once", group_id="line3", agent_id="gpu-0")
    assert eos.transactional_id == "ama-stream-line3-gpu-0"
    assert consumer_config(eos)["isolation_level"] == "read_committed"
    tid = producer_config(eos.kafka, eos.producer, 1.0, eos.transactional_id)["transactional_id"]
    assert tid == eos.transactional_id
    host = _settings(delivery="exactly-once")
    assert host.transactional_id.startswith("ama-stream-ama-stream-") and len(host.transactional_id) > 22


@pytest.mark.parametrize("overrides, message", [
    ({"producer": {"transactional_id": "x"}}, "producer.transactional_id is managed by the agent"),
    ({"delivery": "exactly-once", "consumer": {"isolation_level": "read_uncommitted"}}, "read_committed"),
    ({"delivery": "exactly-once", "producer": {"enable_idempotence": False}}, "idempotent producer"),
    ({"delivery": "exactly-once", "agent_id": "a b"}, "agent id uses only"),
    ({"delivery": "exactly-once", "consumer": {"auto_offset_reset": "latest"}}, "'latest' would lose frames"),
    ({"delivery": "exactly-once", "consumer": {"auto_offset_reset": "largest"}}, "'largest' would lose frames"),
    ({"delivery": "exactly-twice"}, "delivery"),
])
def test_settings_that_would_undo_exactly_once_are_refused(overrides, message):
    with pytest.raises(SettingsError, match=message):
        _settings(**overrides)


def test_auto_offset_reset_latest_stays_allowed_at_least_once_and_earliest_with_exactly_once():
    assert consumer_config(_settings(consumer={"auto_offset_reset": "latest"}))["auto_offset_reset"] == "latest"
    eos = _settings(delivery="exactly-once", consumer={"auto_offset_reset": "earliest"})
    assert consumer_config(eos)["auto_offset_reset"] == "earliest"


def test_serve_flags_set_the_delivery_and_the_agent_id(monkeypatch):
    from ama_stream.cli import _build_parser
    from ama_stream.commands.serve import build_overrides

    args = _build_parser("serve").parse_args(["serve", "--delivery", "exactly-once", "--agent-id", "cam-host-2"])
    assert build_overrides(args) == {"delivery": "exactly-once", "agent_id": "cam-host-2"}
    monkeypatch.setenv("AMA_AGENT_ID", "from-env")
    assert _settings(delivery="exactly-once").transactional_id == "ama-stream-ama-stream-from-env"


# -- the transaction unit on a fake producer -----------------------------------------------------------

class FakeTxnProducer(FakeProducer):
    """A transactional producer: records of a transaction become visible (`committed_records`) and its
    offsets committed (`committed_offsets`) only by commit_transaction. `on_offsets(p)` / `on_commit(p)`
    may raise to make that step fail."""

    def __init__(self, on_flush=None, on_offsets=None, on_commit=None):
        super().__init__(on_flush)
        self.calls: list = []
        self.txn: list = []
        self.pending_offsets: dict = {}
        self.committed_records: list = []
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.on_offsets = on_offsets or (lambda p: None)
        self.on_commit = on_commit or (lambda p: None)

    def begin_transaction(self):
        self.calls.append("begin")
        self.txn, self.pending_offsets = [], {}

    def send(self, topic, key=None, value=None, headers=None):
        fut = super().send(topic, key=key, value=value, headers=headers)
        self.txn.append(fut)
        return fut

    def send_offsets_to_transaction(self, offsets, group_metadata):
        self.calls.append(("offsets", {tp.partition: m.offset for tp, m in offsets.items()}))
        self.on_offsets(self)
        self.pending_offsets = {tp: m.offset for tp, m in offsets.items()}

    def commit_transaction(self):
        self.calls.append("commit")
        self.on_commit(self)
        assert all(f.is_done and not f.failed() for f in self.txn), "commit with records unacknowledged"
        self.committed_records.extend(f.message for f in self.txn)
        for tp, offset in self.pending_offsets.items():
            self.committed_offsets[tp] = max(self.committed_offsets.get(tp, 0), offset)
        self.txn, self.pending_offsets = [], {}

    def abort_transaction(self):
        self.calls.append("abort")
        self.txn, self.pending_offsets = [], {}


def _messages(n, topic="scores"):
    return [OutMessage(topic, b"cam", b"r%d" % i, [("frame-id", b"f%d" % i)]) for i in range(n)]


def _transactions(producer, committer=None, stop=None, outcomes=None):
    stop = stop or threading.Event()
    committer = committer or TransactionalCommitter(None)
    publisher = Publisher(producer, lambda: producer, RETRY, stop, flush_timeout_s=0.01)
    outcomes = [] if outcomes is None else outcomes
    return Transactions(publisher, committer, lambda: "group", RETRY, stop, on_outcome=outcomes.append,
                        grace_s=0.2, poll_s=0.01), committer


def test_a_failed_record_aborts_the_transaction_and_its_offsets_go_only_with_the_retry():
    def first_send_fails(p):
        for f in p.pending():
            if len(p.futures) <= 3:
                f.fail(KafkaTimeoutError("expired in the accumulator"))
            else:
                p.ack([f])

    producer, outcomes = FakeTxnProducer(first_send_fails), []
    txns, committer = _transactions(producer, outcomes=outcomes)
    assert txns.publish(TxnBatch(_messages(3), {P0: 7}, committer.epoch())) is Outcome.COMMITTED
    assert producer.calls == ["begin", "abort", "begin", ("offsets", {0: 7}), "commit"]
    assert sorted(v for _, _, v, _ in producer.committed_records) == [b"r0", b"r1", b"r2"]  # once each
    assert producer.committed_offsets == {P0: 7} and outcomes == ["aborted", "committed"]
    assert committer.done(P0) == 7 and committer.committed_total() == 7


def test_offsets_or_a_commit_that_fail_abort_and_the_batch_goes_again():
    fails = iter([KafkaTimeoutError("coordinator"), None])

    def flaky_commit(p):
        error = next(fails)
        if error is not None:
            raise error

    producer = FakeTxnProducer(on_commit=flaky_commit)
    txns, committer = _transactions(producer)
    assert txns.publish(TxnBatch(_messages(2), {P0: 2, P1: 5}, committer.epoch())) is Outcome.COMMITTED
    assert producer.calls == ["begin", ("offsets", {0: 2, 1: 5}), "commit", "abort",
                              "begin", ("offsets", {0: 2, 1: 5}), "commit"]
    assert len(producer.committed_records) == 2 and producer.committed_offsets == {P0: 2, P1: 5}


def test_a_failure_that_lasts_until_a_stop_commits_nothing():
    stop = threading.Event()

    def down(p):
        for f in p.pending():
            f.fail(KafkaTimeoutError("broker away"))
        stop.set()  # the operator stops the agent meanwhile

    producer = FakeTxnProducer(down)
    txns, committer = _transactions(producer, stop=stop)
    assert txns.publish(TxnBatch(_messages(2), {P0: 2}, committer.epoch())) is Outcome.STOPPED
    assert "commit" not in producer.calls and not any(isinstance(c, tuple) for c in producer.calls)
    assert producer.calls.count("abort") == producer.calls.count("begin") >= 1
    assert producer.committed_offsets == {} and committer.committed_total() == 0


def test_a_record_the_broker_refuses_is_replaced_by_its_dead_letter_in_the_next_transaction():
    def refuse_big(p):
        for f in p.pending():
            if f.message[2] == b"r1" and f.message[0] == "scores":
                f.fail(MessageSizeTooLargeError("too large"))
            else:
                p.ack([f])

    producer = FakeTxnProducer(refuse_big)
    txns, committer = _transactions(producer)
    msgs = [OutMessage("scores", b"cam", b"r%d" % i, [("frame-id", b"f%d" % i)],
                       fallback=OutMessage("dlq", b"cam", None, [("frame-id", b"f%d" % i)])) for i in range(3)]
    assert txns.publish(TxnBatch(msgs, {P0: 3}, committer.epoch())) is Outcome.COMMITTED
    assert producer.calls.count("abort") == 1
    assert sorted((t, v) for t, _, v, _ in producer.committed_records) == [
        ("dlq", None), ("scores", b"r0"), ("scores", b"r2")]


def test_a_fenced_producer_stops_without_abort_or_retry():
    def fenced(p):
        raise ProducerFencedError()

    producer = FakeTxnProducer(on_commit=fenced)
    txns, committer = _transactions(producer)
    assert txns.publish(TxnBatch(_messages(1), {P0: 1}, committer.epoch())) is Outcome.FENCED
    assert producer.calls == ["begin", ("offsets", {0: 1}), "commit"] and producer.committed_offsets == {}
    assert is_fenced(Exception("in an error state", ProducerFencedError())) and not is_fenced(KafkaTimeoutError())
    assert is_fenced(KafkaError("Cannot execute transactional method because we are in an error state: "
                                "[Error 90] ProducerFencedError"))


def test_offsets_refused_for_an_old_group_generation_drop_the_batch_and_rewind():
    def stale(p):
        raise CommitFailedError("Transaction offset commit failed due to consumer group metadata mismatch")

    producer = FakeTxnProducer(on_offsets=stale)
    txns, committer = _transactions(producer)
    epoch = committer.epoch()
    assert txns.publish(TxnBatch(_messages(1), {P0: 1}, epoch)) is Outcome.STALE
    assert producer.calls == ["begin", ("offsets", {0: 1}), "abort"]
    assert committer.take_rewind() and not committer.take_rewind()  # once
    producer.calls.clear()
    assert txns.publish(TxnBatch(_messages(1), {P0: 2}, epoch)) is Outcome.STALE  # polled before: dropped
    assert producer.calls == []


# -- the committer in exactly-once mode ----------------------------------------------------------------

class NoCommits:
    def commit_async(self, *a, **k):
        raise AssertionError("exactly-once: the committer must not commit")

    commit = commit_async


def test_the_committer_never_commits_and_a_revocation_waits_for_the_transaction_in_progress():
    import asyncio

    c = TransactionalCommitter(NoCommits(), revoke_wait_s=30)
    e0 = c.epoch()
    c.mark_done({P0: 4}, e0)
    c.commit(now=0.0)
    c.commit_final()
    assert c.begin_transaction(e0)
    revoked = threading.Event()
    t = threading.Thread(target=lambda: (asyncio.run(c.revoked({P0, P1})), revoked.set()))
    t.start()
    assert not revoked.wait(0.3)  # held while the transaction is open
    c.end_transaction({P0: 9}, e0)
    assert revoked.wait(10)
    t.join()
    assert c.done(P0) is None  # forgotten with the revocation
    assert not c.begin_transaction(e0)  # batches polled before it are dropped ...
    assert c.take_rewind()  # ... and read again from the committed offsets
    assert c.begin_transaction(c.epoch())
    c.end_transaction(None)


# -- the whole loop on fakes through a rebalance ------------------------------------------------------

class TxnFakeConsumer(FakeConsumer):
    """kafka-python's behaviour that matters here: a partition assigned again KEEPS its position, and
    the committed offsets are the ones the producer's transactions committed."""

    def __init__(self, records, producer: FakeTxnProducer, before_poll=None):
        super().__init__(records, lambda tp, offset: True, before_poll)
        self.producer = producer
        self.config = {"auto_offset_reset": "earliest"}
        self.seeks: list = []
        # KafkaConsumer.committed(tp) (the base class's dict of consumer commits stays unused: none may come)
        self.committed = lambda tp, timeout_ms=None: producer.committed_offsets.get(tp)

    def assign(self, partitions):
        self.assigned |= set(partitions)
        self._listen("on_partitions_assigned", partitions)

    def seek(self, tp, offset):
        self.seeks.append((tp.partition, offset))
        self.events.append(("seek", tp, offset))
        self.position_of[tp] = offset

    def seek_to_beginning(self, *tps):
        for tp in tps:
            self.seek(tp, 0)

    def group_metadata(self):
        return "group"


def _frames(partition, n):
    return [record(partition=partition, offset=i, value=png(5 + i),
                   headers=[("frame-id", f"{partition}-{i}".encode()), ("camera-id", b"cam")]) for i in range(n)]


def _txn_agent_on_fakes(monkeypatch, consumer, producer) -> Agent:
    monkeypatch.setattr(runner_module, "make_consumer", lambda settings: consumer)
    monkeypatch.setattr(runner_module, "make_producer", lambda *a, **k: producer)
    import torch
    settings = load_settings(AgentSettings, None, {
        "kafka": {"bootstrap_servers": "fake:9092"}, "delivery": "exactly-once", "agent_id": "a",
        "topics": {"frames": "frames", "scores": "scores", "alerts": "alerts", "dead_letter": "dlq"},
        "metrics": {"enabled": False}, "device": "cpu", "torch_threads": torch.get_num_threads(),
        "batching": {"max_batch": 4, "max_wait_ms": 5}, "idle_exit_s": 0.3, "drift": {"enabled": False}})
    cal = fit_calibration(np.random.default_rng(0).normal(-0.9, 0.05, 400), "fake-model", Policy.make("upper", 0.01))
    return Agent(settings, scorer=FakeScorer(), calibration=cal)


def test_the_loop_through_a_rebalance_publishes_every_frame_in_exactly_one_committed_transaction(monkeypatch):
    """Both partitions are revoked at the third poll while batches of theirs are in flight and assigned
    again at once (kafka-python keeps their positions): the revocation waits for the transaction in
    progress, the batches polled before it are dropped, and the loop re-reads from the committed
    offsets, so each frame is in exactly one committed transaction."""
    consumer = None

    def rebalance(n, c):
        if n == 3:
            c.revoke([P0, P1])
            c.assign([P0, P1])

    producer = FakeTxnProducer()
    records = {P0: _frames(0, 12), P1: _frames(1, 12)}
    consumer = TxnFakeConsumer(records, producer, rebalance)
    agent = _txn_agent_on_fakes(monkeypatch, consumer, producer)
    marked = []
    agent.committer.mark_done = lambda *a: marked.append(a)  # exactly-once: end_transaction's job alone
    assert agent.run() == 0
    assert marked == [] and (agent.committer.done(P0), agent.committer.done(P1)) == (12, 12)
    scored = Counter(dict(h)["frame-id"].decode() for t, _, _, h in producer.committed_records if t == "scores")
    assert scored == Counter(f"{p}-{i}" for p in (0, 1) for i in range(12))  # each frame once
    assert producer.committed_offsets == {P0: 12, P1: 12} and consumer.commits == []  # only transactions commit
    assert consumer.seeks  # the rewind after the rebalance
    assert agent.metrics.transactions.labels(result="dropped")._value.get() >= 1


def test_a_committed_offset_that_cannot_be_fetched_keeps_its_partition_paused_until_the_rewind_completes(
        monkeypatch, caplog):
    """After the rebalance, fetching P1's committed offset fails twice (a timeout: the broker away or a
    transaction still committing offsets; then a non-retriable error): the agent neither hangs nor
    crashes, nothing is polled from P1 until it is re-positioned at its committed offset on a later
    turn, P0 goes on meanwhile, and each frame is in exactly one committed transaction."""
    def rebalance(n, c):
        if n == 3:
            c.revoke([P0, P1])
            c.assign([P0, P1])

    producer = FakeTxnProducer()
    consumer = TxnFakeConsumer({P0: _frames(0, 12), P1: _frames(1, 12)}, producer, rebalance)
    failures = [KafkaTimeoutError("Failed to get offsets by times in 5000 ms"),
                GroupAuthorizationFailedError("not authorized")]
    timeouts = []

    def committed(tp, timeout_ms=None):
        timeouts.append(timeout_ms)
        if tp == P1 and failures:
            consumer.events.append(("committed failed", tp))
            raise failures.pop(0)
        return producer.committed_offsets.get(tp)

    consumer.committed = committed
    agent = _txn_agent_on_fakes(monkeypatch, consumer, producer)
    assert agent.run() == 0
    assert not failures and timeouts and all(t is not None and t > 0 for t in timeouts)
    events = consumer.events
    paused_at = events.index(("pause", P0, P1))
    failed_at = events.index(("committed failed", P1))
    seek_p1 = next(i for i, e in enumerate(events) if e[0] == "seek" and e[1] == P1)
    resumed_p1 = next(i for i, e in enumerate(events) if e[0] == "resume" and P1 in e[1:])
    assert paused_at < failed_at < seek_p1 < resumed_p1
    between = events[paused_at:resumed_p1]
    assert not [e for e in between if e[0] == "poll" and e[2] == P1]  # nothing polled from P1 while pending
    assert [e for e in between if e[0] == "poll" and e[2] == P0]  # P0 was re-positioned and read meanwhile
    scored = Counter(dict(h)["frame-id"].decode() for t, _, _, h in producer.committed_records if t == "scores")
    assert scored == Counter(f"{p}-{i}" for p in (0, 1) for i in range(12))  # each frame once
    assert producer.committed_offsets == {P0: 12, P1: 12} and not consumer.paused
    assert "stay paused and are re-positioned once it can be fetched" in caplog.text
    assert caplog.text.count("fetching the committed offset") == 1  # once per failure streak


# -- against the broker ----------------------------------------------------------------------------------

def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.mark.kafka
@pytest.mark.broker_txn
def test_a_read_committed_fetch_names_the_aborted_transaction_so_its_records_are_skipped(bootstrap):
    """The Fetch exchange behind read_committed. A transactional producer writes three transactions
    -- committed, ABORTED, committed -- and a read_committed consumer reads the topic. Kafka (KIP-98)
    answers a FetchRequest with isolation_level=1 with the aborted transactions that overlap the
    fetched range, (producer_id, first_offset), and the client drops those records. tansu 0.6.0 logs
    the abort marker but answers aborted_transactions=[]: the consumer returns b"aborted"."""
    topic = _unique("txn-probe")
    ensure_topics(KafkaSection(bootstrap_servers=bootstrap), {topic: 1})
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=_unique("probe"))
    try:
        producer.init_transactions()
        for value, commit in ((b"committed-1", True), (b"aborted", False), (b"committed-2", True)):
            producer.begin_transaction()
            producer.send(topic, value).get(30)
            producer.commit_transaction() if commit else producer.abort_transaction()
    finally:
        producer.close(timeout=5)

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                             enable_auto_commit=False)
    try:
        capture = FetchCapture(consumer, topic)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        seen = [r.value for r in read_to_end(consumer, [tp], 60)]
    finally:
        consumer.close()

    evidence = "\n".join(ex.brief() for ex in capture.exchanges if ex.batches)
    data = [b for b in capture.batches() if not b.control]
    aborted = next(b for b in data if b.records[0][1] == b"aborted")
    markers = [b for b in capture.batches() if b.control and b.producer_id == aborted.producer_id]
    # the log is right: the aborted transaction's data, then an abort marker for the same producer
    assert any(m.abort and m.base_offset > aborted.last_offset for m in markers), evidence
    # the answer to READ_COMMITTED must name it ...
    assert all(ex.isolation_level == 1 for ex in capture.exchanges)
    named = {a for ex in capture.exchanges for a in (ex.aborted_transactions or [])}
    assert any(pid == aborted.producer_id and first <= aborted.base_offset for pid, first in named), (
        f"the broker's READ_COMMITTED Fetch answer does not list the aborted transaction of producer "
        f"{aborted.producer_id} at offset {aborted.base_offset}:\n{evidence}")
    # ... so that the consumer skips its records
    assert seen == [b"committed-1", b"committed-2"]


KILLS = 5
VALID, BAD = 240, 16
SLOW_COMMIT_S = "0.25"  # each transaction held open this long before its commit (tests/agent/slow_commit.py)


def _eos_args(topics: Topics, checkpoint, agent_id: str) -> list[str]:
    return [*topics.serve_args(checkpoint), "--delivery", "exactly-once", "--agent-id", agent_id,
            "--max-batch", "8"]


@pytest.fixture(scope="module")
def killed_five_times(bootstrap, random_checkpoint, tmp_path_factory):
    """Frames (VALID decodable, BAD not) on 2 partitions; an exactly-once agent killed with SIGKILL at
    KILLS seeded-random points mid-stream and restarted each time with the same agent id; then one
    more run to the end. Returns (topics, valid frame ids, bad frame ids, logs)."""
    tag = uuid.uuid4().hex[:10]
    topics = Topics(f"frames-{tag}", f"scores-{tag}", f"alerts-{tag}", f"dlq-{tag}", f"group-{tag}", bootstrap)
    ensure_topics(KafkaSection(bootstrap_servers=bootstrap), {topics.frames: 2, topics.scores: 1, topics.alerts: 1,
                                                             topics.dlq: 1})
    items = random_items(VALID, f"eos-{tag}")
    producer = make_producer(KafkaSection(bootstrap_servers=bootstrap), {}, 10.0)
    try:
        publish(producer, topics.frames, items, cameras=8)  # cam-4 and cam-7 hash to partition 0, the rest to 1
        bad = [f"bad-{tag}-{i}" for i in range(BAD)]
        for i, fid in enumerate(bad):
            producer.send(topics.frames, key=b"cam-%d" % (i % 8), value=b"not an image %d" % i,
                          headers=[("frame-id", fid.encode()), ("camera-id", b"cam-%d" % (i % 8))])
        producer.flush()
    finally:
        producer.close(timeout=5)

    logs = tmp_path_factory.mktemp("eos-kills")
    rng = random.Random(12)
    started: list[AgentProcess] = []

    def start(name: str, *extra: str) -> AgentProcess:
        agent = AgentProcess([*_eos_args(topics, random_checkpoint, "eos-a"), *extra], logs / f"{name}.log",
                             _free_port(), ["tests.agent.slow_commit", SLOW_COMMIT_S]).start()
        started.append(agent)
        return agent

    try:
        for kill in range(KILLS):
            agent = start(f"run-{kill}")
            target = rng.randint(6, 30)  # frames committed by this run before the kill
            wait_for(lambda: agent.scored() >= target, 180, f"run {kill}: {target} frames committed")
            time.sleep(rng.uniform(0.0, 0.4))  # a random point of the next transaction
            os.kill(agent.proc.pid, signal.SIGKILL)
            agent.wait(30)
            agent.stop()
        final = start("final", "--idle-exit-s", "4")
        assert final.wait(300) == 0, final.log()[-3000:]
        final.stop()
    finally:
        for agent in started:
            agent.stop()
    return topics, [i.frame_id for i in items], bad, [a.log() for a in started]


def _free_port() -> int:
    from ama_stream.kafka_tools.broker import free_port

    return free_port()


def _frame_id(headers: dict | list) -> str:
    return dict(headers)["frame-id"].decode()


@pytest.mark.kafka
@pytest.mark.broker_txn
def test_five_kill_9s_read_committed_sees_each_frame_exactly_once(killed_five_times):
    topics, valid, bad, _logs = killed_five_times
    scores = Counter(json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.scores))
    dead = Counter(_frame_id(r.headers) for r in read_all(topics.bootstrap, topics.dlq))
    assert scores == Counter(valid), f"lost {set(valid) - set(scores)}, repeated {+(scores - Counter(valid))}"
    assert dead == Counter(bad)


@pytest.mark.kafka
def test_five_kill_9s_commit_each_frame_in_exactly_one_transaction_with_its_offset(killed_five_times):
    """What holds on any broker: decided by the commit/abort markers in the log, every valid frame has
    exactly one score record and every bad frame exactly one dead letter in COMMITTED transactions
    (0 lost, 0 repeated), the kills left records in aborted transactions (so the test tested
    something), no transaction is left open, and the group's committed offsets are exactly the
    frames those committed transactions cover: each offset was committed with its records."""
    topics, valid, bad, logs = killed_five_times
    scores, dlq = read_log(topics.bootstrap, topics.scores), read_log(topics.bootstrap, topics.dlq)
    assert not scores.state("open") and not dlq.state("open") and not scores.state("plain")

    committed = Counter(json.loads(r.value)["frame_id"] for r in scores.state("committed"))
    assert committed == Counter(valid), f"lost {set(valid) - set(committed)}, repeated {+(committed - Counter(valid))}"
    assert Counter(_frame_id(r.headers) for r in dlq.state("committed")) == Counter(bad)
    aborted = scores.state("aborted") + dlq.state("aborted")
    assert aborted, "no kill hit an open transaction: nothing was tested"

    covered: dict[int, set[int]] = {}
    for r in scores.state("committed"):
        rec = json.loads(r.value)
        covered.setdefault(rec["partition"], set()).add(rec["offset"])
    for r in dlq.state("committed"):
        covered.setdefault(int(r.headers["source-partition"]), set()).add(int(r.headers["source-offset"]))
    offsets = committed_offsets(topics.bootstrap, topics.group, topics.frames)
    assert {p: set(range(o or 0)) for p, o in offsets.items()} == {p: covered.get(p, set()) for p in offsets}
    assert all(o for o in offsets.values())  # both partitions had frames
    assert sum(o or 0 for o in offsets.values()) == VALID + BAD
    restarts = sum("transactional_id" in log and "ama-stream-" + topics.group + "-eos-a" in log for log in logs)
    assert restarts == KILLS + 1


@pytest.mark.kafka
def test_a_zombie_agent_is_fenced_by_its_transactional_id_and_stops(make_topics, producer, random_checkpoint,
                                                                    agent_threads):
    """While frames keep coming to agent A, another producer starts with A's transactional id (as A's
    successor does) and commits a FENCE record: its init_transactions fences A and aborts A's open
    transaction. A's next transactional request is refused and A stops: run() raises ProducerFenced
    after closing its clients -- or TransactionUnanswered after transaction_timeout_ms when the
    fence fell between A's offsets and its commit, since tansu 0.6.0 then drops the connection
    instead of answering PRODUCER_FENCED (txn.py). Nothing of A's comes after the FENCE record. A
    successor with the same agent id then finishes: each frame in exactly one committed transaction.
    (The successor starts once A stopped: with both agents in the group at once, a member that leaves
    during a rebalance can leave tansu 0.6.0's group coordinator answering SyncGroup with
    REBALANCE_IN_PROGRESS forever.)"""
    topics = make_topics(partitions=2)
    items = random_items(240, "fence")
    feeder = threading.Thread(target=publish, args=(producer, topics.frames, items),
                              kwargs={"cameras": 8, "rate": 40})
    eos = {"delivery": "exactly-once", "agent_id": "twin", "batching": {"max_batch": 4},
           "producer": {"transaction_timeout_ms": 3000}}
    a = agent_threads(topics.settings(random_checkpoint, **eos))
    tid = f"ama-stream-{topics.group}-twin"
    feeder.start()
    try:
        wait_for(lambda: a.agent.stats.scored >= 16, 120, "A scoring")
        fencer = KafkaProducer(bootstrap_servers=topics.bootstrap, transactional_id=tid)
        try:
            fencer.init_transactions()
            fencer.begin_transaction()
            fencer.send(topics.scores, b"FENCE").get(30)
            fencer.commit_transaction()
        finally:
            fencer.close(timeout=5)
        with pytest.raises((ProducerFenced, TransactionUnanswered), match=tid):
            a.join(60)
        assert a.agent.metrics.ready._value.get() == 0  # it went through its orderly stop
        b = agent_threads(topics.settings(random_checkpoint, idle_exit_s=4, **eos))
    finally:
        feeder.join()
    assert b.join(180) == 0

    log = read_log(topics.bootstrap, topics.scores)
    assert not log.state("open") and len({r.producer_id for r in log.records}) == 1  # one transactional id
    fence = next(r for r in log.records if r.value == b"FENCE")
    assert fence.state == "committed"
    assert any(r.producer_epoch < fence.producer_epoch for r in log.records)  # A published before
    assert all(r.offset < fence.offset for r in log.records if r.producer_epoch < fence.producer_epoch)
    committed = Counter(json.loads(r.value)["frame_id"] for r in log.state("committed") if r.value != b"FENCE")
    assert committed == Counter(i.frame_id for i in items)
    assert sum(o or 0 for o in committed_offsets(topics.bootstrap, topics.group, topics.frames).values()) == len(items)
