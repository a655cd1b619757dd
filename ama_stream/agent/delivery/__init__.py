"""How a scored batch reaches the broker and when its offsets count as consumed: the delivery
guarantee, as one object the run loop calls without knowing which one it is.

    open(publisher, group_metadata, heartbeat) -> Outbox   the publish thread, publishing each batch
    payload(messages, batch)        what the publish thread gets for a batch
    reposition(consumer, batcher)   after each poll (exactly-once: re-read from the committed offsets
                                    after a rebalance)
    settle(done, batch, batcher)    a batch back from the publish thread: True when it is finished
                                    (its offsets done), False when its frames will be read again
    commit() / commit_final()       once per loop turn / at the stop
    committer                       the books of done offsets and the rebalance listener
    failure                         why the agent stopped on its own, or None

Two implementations side by side: at_least_once.py (records acknowledged, then the offsets
committed out of order across partitions by commit.py) and exactly_once.py (one Kafka transaction
per batch, txn.py, ordered against rebalances by fencing.py).
"""
from __future__ import annotations

from typing import Callable, Protocol

from ..outbox import Finished, Outbox
from ..publish import Publisher
from ..settings import AgentSettings
from .at_least_once import AtLeastOnce
from .commit import OffsetCommitter
from .exactly_once import ExactlyOnce


class Delivery(Protocol):
    committer: OffsetCommitter
    failure: RuntimeError | None

    def open(self, publisher: Publisher, group_metadata: Callable[[], object],
             heartbeat: Callable[[], None]) -> Outbox: ...

    def payload(self, messages: list, batch) -> object: ...

    def reposition(self, consumer, batcher) -> None: ...

    def settle(self, done: Finished, batch, batcher) -> bool: ...

    def commit(self) -> None: ...

    def commit_final(self) -> None: ...


def make_delivery(settings: AgentSettings, on_broker_error: Callable[[str, str], None],
                  on_outcome: Callable[[str], None], stop: Callable[[], None], stopping) -> Delivery:
    """The delivery the settings ask for. `on_broker_error(operation, reason)`: Readiness.broker_error;
    `on_outcome(result)`: a transaction's result (exactly-once); `stop()`, `stopping`: the agent's."""
    if settings.exactly_once:
        return ExactlyOnce(settings, on_broker_error, on_outcome, stop, stopping)
    return AtLeastOnce(on_broker_error, settings.retry.lag_every_s)
