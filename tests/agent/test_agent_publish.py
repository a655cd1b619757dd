"""The publisher without a broker: a fake producer that refuses, fails and times out. A refused
record is a per-frame failure (fallback, then given up), an outage is retried; never forever."""
from __future__ import annotations

import threading

from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import InvalidRecordError, KafkaConnectionError, MessageSizeTooLargeError

from ama_stream.agent.publish import MAX_REFUSALS, OutMessage, Publisher
from ama_stream.agent.envelope import MAX_HEADER_BYTES, FrameMeta
from ama_stream.agent.settings import RetrySection


class _Future:
    def __init__(self, error: BaseException | None = None):
        self.is_done = True
        self.exception = error

    def failed(self) -> bool:
        return self.exception is not None


class FakeProducer:
    """send() consults `rule(message, attempt) -> None | exception to raise | ('fail', exception)`."""

    def __init__(self, rule):
        self.rule = rule
        self.sent: list[tuple[str, bytes | None, list]] = []
        self.acked: list[tuple[str, bytes | None, list]] = []
        self.calls: dict[str, int] = {}

    def send(self, topic, key=None, value=None, headers=None):
        self.calls[topic] = self.calls.get(topic, 0) + 1
        self.sent.append((topic, value, headers))
        outcome = self.rule(topic, value, headers, self.calls[topic])
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, tuple):
            return _Future(outcome[1])
        self.acked.append((topic, value, headers))
        return _Future()

    def flush(self, timeout=None):
        pass

    def close(self, timeout=None):
        pass


def publisher(rule, given_up: list):
    producer = FakeProducer(rule)
    pub = Publisher(producer, lambda: producer, RetrySection(initial_s=0.01, max_s=0.02), threading.Event(),
                    on_give_up=lambda topic, why: given_up.append(topic))
    return pub, producer


def dead_letter(value=b"frame") -> OutMessage:
    return OutMessage("dlq", b"cam", value, [("error", b"undecodable: x")], dead_letter=True)


def score(fallback: OutMessage | None = None) -> OutMessage:
    return OutMessage("scores", b"cam", b'{"r": 1}', [("frame-id", b"f")], fallback=fallback)


def test_a_score_record_refused_as_too_large_is_replaced_by_its_dead_letter_at_once():
    given_up: list = []
    pub, producer = publisher(lambda t, v, h, n: MessageSizeTooLargeError("too big") if t == "scores" else None, given_up)
    assert pub.wait(pub.send([score(fallback=dead_letter(value=None))]))
    assert [t for t, _, _ in producer.acked] == ["dlq"] and given_up == ["scores"]
    assert producer.calls["scores"] == 1  # not retried


def test_a_dead_letter_too_large_goes_out_without_its_value_and_then_nothing_is_retried_forever():
    given_up: list = []
    pub, producer = publisher(lambda t, v, h, n: MessageSizeTooLargeError("too big") if v else None, given_up)
    assert pub.wait(pub.send([dead_letter(value=b"x" * 100)]))
    (topic, value, headers), = producer.acked
    assert topic == "dlq" and not value and dict(headers)["error-value-dropped"]
    always: list = []
    pub, producer = publisher(lambda t, v, h, n: MessageSizeTooLargeError("too big"), always)
    assert pub.wait(pub.send([score(fallback=dead_letter(value=None))]))  # everything refused: given up, done
    assert producer.acked == [] and always == ["scores", "dlq"]


def test_a_record_failing_non_retriably_is_given_up_after_max_refusals():
    given_up: list = []
    pub, producer = publisher(lambda t, v, h, n: ("fail", InvalidRecordError("no")) if t == "scores" else None, given_up)
    assert pub.wait(pub.send([score(fallback=dead_letter(value=None))]))
    assert producer.calls["scores"] == MAX_REFUSALS and [t for t, _, _ in producer.acked] == ["dlq"]


def test_an_outage_is_retried_until_it_passes():
    given_up: list = []
    pub, producer = publisher(lambda t, v, h, n: ("fail", KafkaConnectionError("down")) if n <= 5 else None, given_up)
    assert pub.wait(pub.send([score(fallback=dead_letter())]))
    assert producer.calls["scores"] == 6 and [t for t, _, _ in producer.acked] == ["scores"] and given_up == []


def _record(headers, key=b"cam"):
    return ConsumerRecord("frames", 0, -1, 7, 0, 0, key, b"v", list(headers), None, 0, 0, 0)


def test_oversize_headers_and_keys_are_cut_and_name_the_problem():
    big = b"c" * (1 << 20)
    meta = FrameMeta.from_record(_record([("frame-id", b"f-1"), ("camera-id", big)]))
    assert meta.envelope_error.startswith("header-too-large: header 'camera-id' has 1048576 bytes")
    assert meta.camera_id is None and meta.frame_id == "frames:0:7"  # nothing oversize reaches a record
    assert max(len(v) for _, v in meta.headers) <= MAX_HEADER_BYTES
    many = FrameMeta.from_record(_record([(f"h{i}", b"x" * 4000) for i in range(40)]))
    assert "in all" in many.envelope_error and sum(len(v) for _, v in many.headers) <= 64 * 1024
    long_key = FrameMeta.from_record(_record([], key=b"k" * 10_000))
    assert "key has 10000 bytes" in long_key.envelope_error and len(long_key.key) <= MAX_HEADER_BYTES
    fine = FrameMeta.from_record(_record([("camera-id", b"cam-1")]))
    assert fine.envelope_error is None and fine.camera_id == "cam-1"
