"""The agent: Kafka frames -> micro-batches -> scores -> score/alert/dead-letter records -> commit.

One `while` loop on one thread owns the consumer (poll, commit) and scoring; a worker thread
decodes the next batches meanwhile and another publishes the scored ones and waits for their
acknowledgements. `stop()` only sets a flag: the loop then finishes the
batches in flight, publishes them, commits and closes. Offsets are committed only after the
broker acknowledged every record of the frames below them (at-least-once).

Rebalances: kafka-python 3 runs the listener on its IO thread while this loop waits inside poll();
it commits the offsets already done and marks the revoked partitions in the OffsetBook. Frames
already read are still scored and published (kafka-python keeps the fetch position of a partition
that is assigned again, so dropping them would lose them); their offsets are committed only if
their partition was not revoked meanwhile, so a partition's new owner re-reads them instead
(duplicates, never a gap).
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import kafka
import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import TopicPartition

from ama_stream.calibration import Calibration
from ama_stream.checkpoint import load_checkpoint
from ama_stream.drift import CameraDrift, DriftBand, DriftMonitor
from ama_stream.logs import quiet_kafka_logs
from ama_stream.scoring import Scorer
from ama_stream.settings import SettingsError, masked

from .frames import FrameLimits
from .kafka_io import connect_with_retry, describe, make_consumer, make_producer
from .metrics import AgentMetrics, Health, HealthServer
from .offsets import CommitProgress, OffsetBook
from .pipeline import DecodedBatch, FrameDecoder, PolledBatch, ScoredBatch, score_batch
from .publish import OutMessage, Publisher, PublishWorker
from .reload import CalibrationFile, ControlTopic, Update
from .records import dead_letter_headers, encode_record, record_headers, score_record
from .settings import AgentSettings

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # longest poll while nothing is in flight: bounds the reaction to stop()
MISFIT_LOG_S = 600.0  # frames resized or converted for the model: a warning at most this often
# Commit errors that mean "the group is rebalancing", not "the broker is unreachable".
GROUP_STATE_ERRORS = (RebalanceInProgressError, CommitFailedError, IllegalGenerationError, UnknownMemberIdError)


def initial_calibration(calibration_file: CalibrationFile | None, scorer: Scorer) -> Calibration:
    """The calibration file's, else the checkpoint's training mu/sigma with |z| > 3."""
    if calibration_file is not None:
        return calibration_file.initial
    return Calibration.from_checkpoint(scorer.checkpoint)


def drift_monitor(settings: AgentSettings, calibration: Calibration) -> DriftMonitor | None:
    d = settings.drift
    if not d.enabled:
        return None
    band = DriftBand(d.window, d.min_frames, d.mean_tolerance, tuple(d.std_ratio), d.alert_sigmas)
    return DriftMonitor(calibration, band, d.max_cameras)


@dataclass
class AgentStats:
    """Counters since start; read by the demo and benchmarks (the metrics endpoint has the same)."""

    scored: int = 0
    alerts: int = 0
    dead_lettered: int = 0


class _RebalanceListener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's IO thread; awaits the commit of done offsets before a revocation completes."""

    def __init__(self, agent: "Agent"):
        self.agent = agent

    async def on_partitions_revoked(self, revoked):
        revoked = set(revoked)
        if not revoked:
            return
        book = self.agent.offsets
        offsets = book.uncommitted(revoked)
        if offsets:
            try:
                await self.agent.consumer.commit_async(offsets)
                book.mark_committed(offsets)
            except KafkaError as exc:
                log.warning("commit on revocation failed (%s); their frames will be scored again by the next owner", exc)
        book.revoke(revoked)
        log.info("partitions revoked: %s", _names(revoked))

    async def on_partitions_lost(self, lost):
        self.agent.offsets.revoke(lost)
        log.warning("partitions lost (group membership expired): %s; in-flight frames dropped", _names(lost))

    async def on_partitions_assigned(self, assigned):
        self.agent.on_assigned(set(assigned))


def _set_torch_threads(requested: int | None, scorer: Scorer) -> None:
    if requested is None:
        if scorer.device.type != "cpu":
            return  # the model runs on the GPU: torch's CPU threads hardly matter
        requested = max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(requested)


def _names(partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"


class Agent:
    def __init__(self, settings: AgentSettings, scorer: Scorer | None = None, calibration: Calibration | None = None):
        if scorer is None:
            if settings.checkpoint is None:
                raise SettingsError("checkpoint: no checkpoint given (--checkpoint FILE or `checkpoint:` in the config)")
            scorer = Scorer(load_checkpoint(settings.checkpoint), settings.device, runtime=settings.runtime, runtime_threads=settings.torch_threads)
        self.settings = settings
        self.scorer = scorer
        _set_torch_threads(settings.torch_threads, scorer)
        # a file given in the settings is watched for new versions (hot reload between batches)
        self.calibration_file = (CalibrationFile(settings.calibration, scorer.model_id, settings.calibration_check_s)
                                 if settings.calibration is not None else None)
        self._calibration = calibration or initial_calibration(self.calibration_file, scorer)
        self.control_topic: ControlTopic | None = None
        self.drift = drift_monitor(settings, self._calibration)
        lim = settings.limits
        self.decoder = FrameDecoder(scorer, FrameLimits(lim.max_frame_bytes, lim.max_pixels, lim.max_batch_pixels))
        self.metrics = AgentMetrics()
        self._show_calibration()
        self.health = Health(settings.metrics.stall_s)
        self.stats = AgentStats()
        self.offsets = OffsetBook()
        self.metrics_port: int | None = None
        self.consumer: KafkaConsumer | None = None
        self.publisher: Publisher | None = None
        self._stop = threading.Event()
        self._raw: list = []
        self._raw_since = 0.0
        self._raw_epoch = 0  # OffsetBook epoch before the poll that returned the first record in _raw
        self._pending: deque[Future[DecodedBatch]] = deque()
        self._misfit_logged = -math.inf
        self.commit_progress = CommitProgress(settings.metrics.commit_stall_s, time.monotonic())
        self.outbox: PublishWorker | None = None
        self._taken = 0  # frames polled so far (for max_frames)
        self._idle_since = time.monotonic()
        self._joined = False  # idleness counts only once the group gave this agent its (maybe empty) share
        self._next_probe = 0.0
        self._commit_sent: dict | None = None  # offsets of the last asynchronous commit sent

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the batches in flight and exit; safe from signal handlers and threads."""
        self._stop.set()

    @property
    def calibration(self) -> Calibration:
        return self._calibration

    def use_calibration(self, calibration: Calibration) -> None:
        """Swap the decision rule; takes effect from the next batch (any thread may call this)."""
        if calibration.model_id and calibration.model_id != self.scorer.model_id:
            raise ValueError(f"calibration is for model {calibration.model_id}, the agent scores with {self.scorer.model_id}")
        self._calibration = calibration

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._idle_since = time.monotonic()  # joining the group is not idleness
        self._joined = True
        self.metrics.consumer_lag.clear()
        log.info("partitions assigned: %s", _names(assigned))

    # -- main ----------------------------------------------------------------------------------
    def run(self) -> int:
        s = self.settings
        quiet_kafka_logs()
        with ExitStack() as stack:
            if s.metrics.enabled:
                server = HealthServer(s.metrics.host, s.metrics.port, self.metrics, self.health).start()
                stack.callback(server.close)
                self.metrics_port = server.port
            self._log_start()
            producer = self._connect_producer()
            if producer is None:
                return 0
            self.publisher = Publisher(producer, self._connect_producer, s.retry, self._stop,
                                       on_error=self._on_broker_error,
                                       on_give_up=lambda topic, why: self.metrics.records_refused.labels(topic=topic).inc())
            stack.callback(lambda: self._close_producer(self.publisher.producer))  # the one in use at the end
            self.outbox = PublishWorker(self._publish)
            stack.callback(self.outbox.close)
            consumer = connect_with_retry(lambda: make_consumer(s), "consumer", s.kafka, s.retry, self._stop,
                                          self._broker_down("connect"))
            if consumer is None:
                return 0
            self.consumer = consumer
            stack.callback(self._close_consumer, consumer)
            decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ama-decode")
            stack.callback(decode_pool.shutdown, wait=True, cancel_futures=True)
            self._decode_pool = decode_pool
            consumer.subscribe([s.topics.frames], listener=_RebalanceListener(self))
            if s.topics.calibration:
                self.control_topic = connect_with_retry(lambda: ControlTopic(s, self.scorer.model_id),
                                                        "calibration topic consumer", s.kafka, s.retry, self._stop)
                if self.control_topic is None:
                    return 0
                stack.callback(self.control_topic.close)
            self._mark_ready()
            self._idle_since = time.monotonic()
            self._loop()
            self._drain()
            self._commit(sync=True)
            self.health.set_ready(False, "stopped")
            self.metrics.ready.set(0)
        log.info("agent stopped: %d frames scored, %d alerts, %d dead-lettered",
                 self.stats.scored, self.stats.alerts, self.stats.dead_lettered)
        return 0

    def _connect_producer(self) -> KafkaProducer | None:
        s = self.settings
        return connect_with_retry(lambda: make_producer(s.kafka, s.producer, s.retry.connect_timeout_s), "producer",
                                  s.kafka, s.retry, self._stop, self._broker_down("connect"))

    def _log_start(self) -> None:
        effective = {
            "settings": masked(self.settings.for_log()),
            "model_id": self.scorer.model_id,
            "calibration_id": self.calibration.calibration_id,
            "device": str(self.scorer.device),
            "torch_threads": torch.get_num_threads(),
            "input": {"image_size": self.scorer.spec.image_size, "channels": self.scorer.spec.channels},
            "metrics_port": self.metrics_port,
            "kafka_python": kafka.__version__,
        }
        log.info("agent starting: %s", json.dumps(effective, sort_keys=True))

    def _loop(self) -> None:
        s = self.settings
        max_batch, max_wait = s.batching.max_batch, s.batching.max_wait_ms / 1000
        consumer = self.consumer
        while not self._stop.is_set():
            self.health.beat()
            now = time.monotonic()
            budget = max_batch - len(self._raw)
            if s.max_frames is not None:
                budget = min(budget, s.max_frames - self._taken)
            if budget > 0:
                if self._pending:
                    timeout_ms = 0
                elif self._raw:
                    timeout_ms = max(0, int((self._raw_since + max_wait - now) * 1000))
                else:
                    timeout_ms = IDLE_POLL_MS
                epoch = self.offsets.epoch()  # before poll(): the rebalance callbacks run inside it
                polled = consumer.poll(timeout_ms=timeout_ms, max_records=budget)
                got = [rec for recs in polled.values() for rec in recs]
            else:
                got = []
            now = time.monotonic()
            if got:
                if not self._raw:
                    self._raw_since, self._raw_epoch = now, epoch
                self._raw.extend(got)
                self._taken += len(got)
                self._idle_since = now
            at_limit = s.max_frames is not None and self._taken >= s.max_frames
            if self._raw and (len(self._raw) >= max_batch or now >= self._raw_since + max_wait or at_limit):
                self._submit()
            self._check_calibration(now)  # between batches: each batch is decided by one calibration
            while self._pending and (self._pending[0].done() or len(self._pending) >= s.batching.decode_ahead or not got):
                self._process(self._pending.popleft().result())
            self.outbox.check()
            self._commit()  # what the publish worker finished since the last turn
            if at_limit and not self._raw and not self._pending and self.outbox.idle():
                log.info("stopping: --max-frames %d reached", s.max_frames)
                break
            idle = not self._raw and not self._pending and self.outbox.idle()
            if s.idle_exit_s is not None and self._joined and idle and now - self._idle_since >= s.idle_exit_s:
                log.info("stopping: no frame for %.1f s (--idle-exit-s)", s.idle_exit_s)
                break
            if now >= self._next_probe:
                self._probe()

    def _submit(self) -> None:
        batch = PolledBatch(self._raw, self._raw_epoch)
        self._raw = []
        self._pending.append(self._decode_pool.submit(self.decoder, batch))

    def _drain(self) -> None:
        """Finish what was polled: decode, score, publish, mark done."""
        if self._raw:
            self._submit()
        while self._pending:
            self._process(self._pending.popleft().result())
        self.outbox.wait_idle()

    # -- one batch -----------------------------------------------------------------------------
    def _process(self, batch: DecodedBatch) -> None:
        """Scores a batch on this thread and hands it to the publish worker."""
        if self.outbox.gave_up:
            return
        calibration = self.calibration  # one decision rule per batch, even if swapped meanwhile
        self.outbox.submit((batch, calibration, score_batch(self.scorer, calibration, batch)))

    # -- calibration and drift -----------------------------------------------------------------
    def _check_calibration(self, now: float) -> None:
        updates: list[Update] = []
        if self.calibration_file is not None:
            update = self.calibration_file.check(now)
            if update is not None:
                updates.append(update)
        if self.control_topic is not None:
            updates.extend(self.control_topic.check(now))
        for update in updates:
            self._apply(update)

    def _apply(self, update: Update) -> None:
        """Swaps in a valid new calibration; a refused one is logged and counted, the old one stays."""
        counter = self.metrics.calibration_reloads
        old = self.calibration
        if update.calibration is None:
            counter.labels(source=update.source, result="refused").inc()
            log.error("new calibration from %s refused, keeping %s: %s", update.origin, old.calibration_id, update.error)
            return
        new = update.calibration
        if new.calibration_id == old.calibration_id:
            counter.labels(source=update.source, result="unchanged").inc()
            log.info("calibration from %s is the one in force (%s)", update.origin, new.calibration_id)
            return
        try:
            self.use_calibration(new)
        except ValueError as exc:
            counter.labels(source=update.source, result="refused").inc()
            log.error("new calibration from %s refused, keeping %s: %s", update.origin, old.calibration_id, exc)
            return
        counter.labels(source=update.source, result="ok").inc()
        self._show_calibration()
        rule = new.rule()
        log.info("calibration %s -> %s from %s: %s; global threshold %.4f (expected false-alarm rate %.3g), "
                 "%d camera entries", old.calibration_id, new.calibration_id, update.origin, new.policy.describe(),
                 rule.threshold, rule.expected_fpr, len(new.cameras))

    def _show_calibration(self) -> None:
        self.metrics.calibration.clear()
        self.metrics.calibration.labels(calibration_id=self.calibration.calibration_id,
                                        policy=self.calibration.policy.name).set(1)

    def _watch_drift(self, calibration: Calibration, result: ScoredBatch) -> None:
        """Rolling per-camera statistics of the batch's z against the calibration that decided it.

        Runs on the publish worker only, so the monitor has a single thread.
        """
        if self.drift is None or not result.scored:
            return
        if self.drift.calibration_id != calibration.calibration_id:
            self.drift.reset(calibration)  # a new calibration: new expectations, empty windows
            for gauge in (self.metrics.drift, self.metrics.drift_z_mean, self.metrics.drift_alert_rate):
                gauge.clear()
        cameras = [f.meta.camera_id for f in result.scored]
        for state in self.drift.observe(cameras, [f.z for f in result.scored], [f.anomaly for f in result.scored]):
            self._report_drift(state, calibration)
        for camera in set(cameras):
            state = self.drift.cameras.get(camera)
            if state is not None and state.judged:
                label = camera or ""
                self.metrics.drift.labels(camera=label).set(int(state.drifting))
                self.metrics.drift_z_mean.labels(camera=label).set(state.z_mean)
                self.metrics.drift_alert_rate.labels(camera=label).set(state.alert_rate)

    @staticmethod
    def _report_drift(state: CameraDrift, calibration: Calibration) -> None:
        camera = state.camera if state.camera is not None else "(no camera id)"
        if state.drifting:
            log.warning("camera %s: scores drifted from calibration %s (%s); recalibration is due: run "
                        "`ama-stream calibrate` on recent known-normal frames of this camera",
                        camera, calibration.calibration_id, "; ".join(state.reasons))
        else:
            log.info("camera %s: scores back within the band of calibration %s", camera, calibration.calibration_id)

    def _publish(self, item: tuple[DecodedBatch, Calibration, ScoredBatch]) -> bool:
        """On the publish worker: send the records, wait for every ack, only then mark the frames done."""
        batch, calibration, result = item
        started = time.perf_counter()
        messages = self._messages(result, calibration, int(time.time() * 1000))
        if not self.publisher.wait(self.publisher.send(messages), heartbeat=self.health.beat):
            log.warning("stopping with %d frames unacknowledged; they stay uncommitted and will be read again",
                        batch.size)
            return False
        self.offsets.mark_done(batch.positions, batch.epoch)
        self._account(batch, result, time.perf_counter() - started)
        self._watch_drift(calibration, result)  # here, off the model's thread, for published frames only
        if not self.health.readiness()[0]:
            self._mark_ready()
        return True

    def _messages(self, result: ScoredBatch, calibration: Calibration, scored_at: int) -> list[OutMessage]:
        topics = self.settings.topics
        out: list[OutMessage] = []
        for f in result.scored:
            record = score_record(
                f.meta, r_score=f.r, z=f.z, log_a=f.log_a, p_value=f.p_value, anomaly=f.anomaly,
                threshold=f.threshold, model_id=self.scorer.model_id, calibration_id=calibration.calibration_id,
                scored_at=scored_at,
            )
            value, headers = encode_record(record), record_headers(f.meta)
            # if the broker refuses the record, the frame is dead-lettered (headers only) instead
            # one fallback per frame (on its first record): a refused score AND alert is still one dead letter
            fallback = OutMessage(topics.dead_letter, f.meta.key, b"" if f.meta.key is None else None,
                                  dead_letter_headers(f.meta, "record-refused: the score record could not be published"),
                                  dead_letter=True)
            if topics.scores:
                out.append(OutMessage(topics.scores, f.meta.out_key, value, headers, fallback=fallback))
            if f.anomaly:
                out.append(OutMessage(topics.alerts, f.meta.out_key, value, headers,
                                      fallback=None if topics.scores else fallback))
        for rej in result.rejected:
            log.debug("dead-lettering frame %s: %s", rej.meta.frame_id, rej.error)
            value = rej.value if rej.value is not None or rej.meta.key is not None else b""
            headers = [(k, v if v is not None else b"") for k, v in dead_letter_headers(rej.meta, rej.error)]
            out.append(OutMessage(topics.dead_letter, rej.meta.key, value, headers, dead_letter=True))
        return out

    def _account(self, batch: DecodedBatch, result: ScoredBatch, publish_s: float) -> None:
        m = self.metrics
        m.batch_size.observe(batch.size)
        m.decode_seconds.observe(batch.decode_s)
        if result.scored:
            m.score_seconds.observe(result.score_s)
        m.publish_seconds.observe(publish_s)
        alerts = sum(f.anomaly for f in result.scored)
        m.frames.inc(len(result.scored))
        m.alerts.inc(alerts)
        for rej in result.rejected:
            m.dead_lettered.labels(reason=rej.reason).inc()
        self._account_misfit(batch)
        acked_ms = time.time() * 1000
        for f in result.scored:
            if f.meta.captured_at is not None:
                m.end_to_end_seconds.observe(max(0.0, (acked_ms - f.meta.captured_at) / 1000))
        self.stats.scored += len(result.scored)
        self.stats.alerts += alerts
        self.stats.dead_lettered += len(result.rejected)

    def _account_misfit(self, batch: DecodedBatch) -> None:
        """Counts frames that did not fit the model; warns on the first and then every MISFIT_LOG_S."""
        if batch.misfit is None or not batch.misfit.counts:
            return
        for reason, n in batch.misfit.counts.items():
            self.metrics.frames_resized.labels(reason=reason).inc(n)
        now = time.monotonic()
        if batch.misfit.serious and now - self._misfit_logged >= MISFIT_LOG_S:
            self._misfit_logged = now
            log.warning("%s (counted in ama_frames_resized_total)", batch.misfit.message("frames of a batch"))

    # -- broker interaction --------------------------------------------------------------------
    def _commit(self, sync: bool = False) -> None:
        """Commits the done offsets: asynchronously while running, synchronously when finishing."""
        if self.outbox.gave_up or self.consumer is None:  # gave up: an earlier batch is unacknowledged
            return
        offsets = self.offsets.uncommitted()
        if not offsets:
            return
        if not sync:
            if offsets != self._commit_sent:  # not again while the same commit is on its way
                self._commit_sent = offsets
                self.consumer.commit_async(offsets, callback=self._on_commit)
            return
        try:
            self.consumer.commit(offsets=offsets, timeout_ms=5000)
        except KafkaError as exc:
            self._on_commit(offsets, exc)
            return
        self.offsets.mark_committed(offsets)

    def _on_commit(self, offsets, response) -> None:
        """kafka-python's commit callback (on this loop's thread, from inside poll/commit)."""
        if not isinstance(response, BaseException):
            self.offsets.mark_committed(offsets)
        elif isinstance(response, GROUP_STATE_ERRORS):
            # The group is rebalancing: the partitions' next owner re-reads what this commit
            # covered (duplicates, never a loss); the broker itself is fine.
            log.info("commit refused during a rebalance (%s); the next owner re-reads those frames",
                     type(response).__name__)
        else:
            # Not fatal: the offsets stay uncommitted and go out again with the next commit.
            self._on_broker_error("commit", describe(response))
            log.warning("commit failed (%s); will retry with the next batch", describe(response))

    def _probe(self) -> None:
        """Consumer lag of the assigned partitions; doubles as the broker liveness check for /readyz."""
        self._next_probe = time.monotonic() + self.settings.retry.lag_every_s
        self._commit_sent = None  # a commit that failed goes out again with the next turn
        assigned = self.consumer.assignment()
        if not assigned:
            return
        # work not finished: frames not yet polled (lag) and batches polled, decoding or publishing
        waiting = len(self._raw) + len(self._pending) + (0 if self.outbox.idle() else 1)
        try:
            ends = self.consumer.end_offsets(list(assigned), timeout_ms=2000)
            positions = {tp: self.offsets.done(tp) for tp in assigned}
            for tp, end in ends.items():
                position = positions.get(tp)
                if position is None:
                    position = self.consumer.position(tp, timeout_ms=1000)
                if position is not None:
                    waiting += max(0, end - position)
                    self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, end - position))
        except KafkaError as exc:
            self._on_broker_error("probe", describe(exc))
            return
        stalled = self.commit_progress.check(waiting, self.offsets.committed_total(), time.monotonic())
        if stalled is not None:
            if self.health.readiness()[0]:
                log.error("not ready: %s (the broker answers; see the dead-letter topic and the publish log)", stalled)
                self.metrics.commit_stalls.inc()
            self.health.set_ready(False, stalled)
            self.metrics.ready.set(0)
            return
        if not self.health.readiness()[0]:
            self._mark_ready()

    def _mark_ready(self) -> None:
        if self._stop.is_set() or self.commit_progress.stalled:  # a stall clears only when commits move
            return
        log.info("broker reachable; ready")
        self.health.set_ready(True)
        self.metrics.ready.set(1)

    def _on_broker_error(self, operation: str, reason: str) -> None:
        self.metrics.broker_errors.labels(operation=operation).inc()
        if self.health.readiness()[0]:
            log.warning("broker problem during %s (%s); not ready until it recovers", operation, reason)
        self.health.set_ready(False, f"broker unreachable ({operation}: {reason})")
        self.metrics.ready.set(0)

    def _broker_down(self, operation: str):
        return lambda reason: self._on_broker_error(operation, reason)

    def _close_consumer(self, consumer: KafkaConsumer) -> None:
        try:
            consumer.close(autocommit=False, timeout_ms=5000)
        except Exception as exc:  # noqa: BLE001 - closing is best effort; offsets are already committed
            log.warning("closing the consumer failed: %s", exc)

    def _close_producer(self, producer: KafkaProducer) -> None:
        try:
            producer.close(timeout=5)
        except Exception as exc:  # noqa: BLE001
            log.warning("closing the producer failed: %s", exc)
