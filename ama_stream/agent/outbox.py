"""The publish thread: scored batches go out in order, acknowledged batches come BACK to the run loop.

The run loop `submit`s a batch with its messages; this thread publishes them (`Publisher.publish`:
send, wait for every acknowledgement, retry) and puts the batch on a queue of finished work. The
run loop takes finished batches back with `acknowledged()` and does everything that follows an
acknowledgement itself (offsets done, metrics, drift, readiness), so nothing on this thread calls
into the agent. Waiting for acknowledgements here instead of on the run loop's thread was worth
10-40% of end-to-end throughput even on 2 CPU cores (benchmarks/agent_bench.py).

A publish that a stop request cut short comes back with `ok=False`; the batches behind it are
dropped unpublished (they stay uncommitted and are read again). An exception on this thread is
re-raised on the run loop's by `check()` / `acknowledged()`.

What is submitted with a batch is handed to `publish` unchanged: the records (at-least-once), or
the records with the batch's offsets (exactly-once: txn.TxnBatch). `publish` returns a bool or an
outcome whose truth says whether the batches behind it may go on (txn.Outcome).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from .kafka_io import describe

T = TypeVar("T")


@dataclass
class Finished(Generic[T]):
    item: T  # what the run loop submitted with the messages
    ok: bool  # False: a stop cut the wait short; the batch is not acknowledged
    publish_s: float  # from handing the records to the producer until the last acknowledgement
    outcome: Any = None  # what `publish` returned (exactly-once: a txn.Outcome)


class Outbox(Generic[T]):
    def __init__(self, publish: Callable[[Any], Any], depth: int = 2):
        """`publish(messages) -> bool`: Publisher.publish, True once all are acknowledged (or
        Transactions.publish, an Outcome)."""
        self._publish = publish
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._finished: queue.SimpleQueue[Finished[T]] = queue.SimpleQueue()
        self.gave_up = False  # set by this thread once a publish came back unacknowledged
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ama-publish", daemon=True)
        self._thread.start()

    def submit(self, item: T, messages: Any) -> None:
        """Queues a batch; blocks while `depth` batches are already waiting (back-pressure)."""
        self.check()
        self._queue.put((item, messages))

    def acknowledged(self) -> Iterator[Finished[T]]:
        """The batches finished since the last call, in submission order (without blocking)."""
        self.check()
        while True:
            try:
                yield self._finished.get_nowait()
            except queue.Empty:
                return

    def idle(self) -> bool:
        """Nothing queued, being published, or finished and not yet taken back."""
        return self._queue.unfinished_tasks == 0 and self._finished.empty()

    def busy(self) -> bool:
        """Something queued or being published (what the lag probe counts as work in flight)."""
        return self._queue.unfinished_tasks > 0

    def wait_idle(self) -> None:
        """Blocks until everything submitted is published or dropped (then take it back)."""
        self._queue.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"publishing failed unexpectedly: {describe(self.error)}") from self.error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is None:
                    return
                if self.gave_up or self.error is not None:
                    continue  # behind an unacknowledged batch: dropped, stays uncommitted
                item, messages = entry
                started = time.perf_counter()
                outcome = self._publish(messages)
                ok = bool(outcome)
                self.gave_up = not ok
                self._finished.put(Finished(item, ok, time.perf_counter() - started, outcome))
            except BaseException as exc:  # noqa: BLE001 - handed to the run loop by check()
                self.error = exc
            finally:
                self._queue.task_done()
