"""Every `retry.lag_every_s`: the consumer lag of the assigned partitions (ama_consumer_lag), which
doubles as the broker liveness check for /readyz, and the commit-progress check (readiness falls
when work waits and no commit moves)."""
from __future__ import annotations

import time

from kafka.errors import KafkaError

from .delivery.commit import OffsetCommitter
from .kafka_io import describe
from .metrics import AgentMetrics, Readiness


class LagProbe:
    def __init__(self, consumer, committer: OffsetCommitter, metrics: AgentMetrics, readiness: Readiness,
                 every_s: float):
        self.consumer = consumer
        self.committer = committer
        self.metrics = metrics
        self.readiness = readiness
        self.every_s = every_s
        self._next = 0.0
        self._assigned: set = set()

    def due(self, now: float) -> bool:
        return now >= self._next

    def check(self, in_flight: int) -> None:
        """`in_flight`: frames polled and batches not yet acknowledged (work besides the lag)."""
        self._next = time.monotonic() + self.every_s
        assigned = set(self.consumer.assignment())
        if assigned != self._assigned:  # a rebalance: the gauges of partitions no longer ours go
            self.metrics.consumer_lag.clear()
            self._assigned = assigned
        if not assigned:
            return
        waiting = in_flight
        try:
            ends = self.consumer.end_offsets(list(assigned), timeout_ms=2000)
            for tp, end in ends.items():
                position = self.committer.done(tp)
                if position is None:
                    position = self.consumer.position(tp, timeout_ms=1000)
                if position is not None:
                    lag = max(0, end - position)
                    waiting += lag
                    self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
        except KafkaError as exc:
            self.readiness.broker_error("probe", describe(exc))
            return
        self.readiness.check_progress(waiting, self.committer.committed_total(), time.monotonic())
