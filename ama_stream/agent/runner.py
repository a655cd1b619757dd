"""The agent: Kafka frames -> micro-batches -> scores -> score/alert/dead-letter records -> commit.

`Agent` wires the stages and runs one `while` loop on one thread; each turn is a short list of
named steps, and a frame's path reads straight down it:

    poll      MicroBatcher       consumer.poll() into a buffer (batcher.py); then Delivery.reposition
    reload    ModelSwitch        the model in force (Scorer + Calibration): a new calibration, or a new
                                 model loaded on the loader thread, swaps in between batches (reload.py)
    decode    DecodeStage        a full or expired buffer is decoded for the model in force, which the
                                 batch keeps, on a worker thread (decode.py)
    score     score_batch        R from the batch's Scorer, decisions from its Calibration (score.py)
              RecordBuilder      score records, alerts, dead letters (records.py)
              Outbox             published on the publish thread (outbox.py; what and how: Delivery)
    finish    Delivery.settle    batches come back: offsets done (or read again), metrics, drift
    commit    Delivery.commit    the delivery's committer owns commits, rebalances included (delivery/)
    probe     LagProbe           lag and commit progress for /readyz (probe.py)

`stop()` only sets a flag: the loop then finishes the batches in flight, publishes them, commits
and closes (resources in an ExitStack).

The delivery guarantee is one object (`Delivery`, delivery/): it builds the publish thread, says
what it publishes for a batch, settles a batch that comes back (its offsets done, or its frames
read again), commits, and re-positions the consumer after a rebalance when it must. The loop never
asks which guarantee it runs: at-least-once (records acknowledged, then offsets committed) or
exactly-once (one Kafka transaction per batch).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import ExitStack

import kafka
import torch
from kafka import KafkaConsumer, KafkaProducer

from ama_stream.calibration import Calibration
from ama_stream.checkpoint import load_checkpoint
from ama_stream.logs import quiet_kafka_logs
from ama_stream.scoring import Scorer
from ama_stream.settings import SettingsError, masked

from .accounting import Accounting, AgentStats, DriftWatch, drift_monitor
from .batcher import MicroBatcher
from .decode import DecodedBatch, DecodeStage, FrameDecoder
from .delivery import make_delivery
from . import inflation
from .fetch_guard import FetchGuard
from .frames import FrameLimits
from .kafka_io import available_codecs, connect_with_retry, make_consumer, make_producer
from .metrics import AgentMetrics, Health, HealthServer, Readiness
from .outbox import Outbox
from .probe import LagProbe
from .publish import Publisher
from .records import RecordBuilder
from .control_topic import ControlTopic
from .model_files import ModelFiles
from .model_state import Model
from .reload import ModelLoader, ModelSwitch
from .score import ScoredBatch, score_batch
from .settings import AgentSettings

log = logging.getLogger(__name__)

__all__ = ["Agent", "AgentStats"]

def _cpu_threads(requested: int | None) -> int:
    """The model's CPU threads; null = all cores but one (decoding and Kafka I/O run beside the model)."""
    return requested if requested is not None else max(1, (os.cpu_count() or 1) - 1)


def _set_torch_threads(requested: int | None, scorer: Scorer) -> None:
    if requested is None and scorer.device.type != "cpu":
        return  # the model runs on the GPU: torch's CPU threads hardly matter
    torch.set_num_threads(_cpu_threads(requested))


class Agent:
    def __init__(self, settings: AgentSettings, scorer: Scorer | None = None, calibration: Calibration | None = None):
        self.settings = settings
        # the files given in the settings are watched for new versions (hot reload between batches);
        # their signatures are taken before they are read
        files = ModelFiles(settings.checkpoint if settings.model_reload else None, settings.calibration,
                           settings.calibration_check_s)
        if scorer is None:
            if settings.checkpoint is None:
                raise SettingsError("checkpoint: no checkpoint given (--checkpoint FILE or `checkpoint:` in the config)")
            scorer = self._make_scorer(load_checkpoint(settings.checkpoint))
        _set_torch_threads(settings.torch_threads, scorer)
        self._stop = threading.Event()
        self.metrics = AgentMetrics()
        self.health = Health(settings.metrics.stall_s)
        self.readiness = Readiness(self.health, self.metrics, self._stop, settings.metrics.commit_stall_s)
        initial = (calibration or files.initial_calibration(scorer.model_id)
                   or Calibration.from_checkpoint(scorer.checkpoint))
        lim = settings.limits
        limits = FrameLimits(lim.max_frame_bytes, lim.max_pixels, lim.max_batch_pixels)
        inflation.install(lim.max_inflated_batch_bytes)  # kafka-python inflates batches before our limits apply
        loader = ModelLoader(self._make_scorer, limits, settings.batching.max_batch) if settings.model_reload else None
        self.models = ModelSwitch(Model(scorer, initial, FrameDecoder(scorer, limits), str(settings.checkpoint or "")),
                                  self.metrics, files, loader, needs_calibration=settings.calibration is not None)
        self.drift = drift_monitor(settings, initial)
        self.records = RecordBuilder(settings.topics)
        self.stats = AgentStats()
        self.accounting = Accounting(self.metrics, self.stats)
        self.drift_watch = DriftWatch(self.drift, self.metrics)
        self.delivery = make_delivery(settings, self.readiness.broker_error,
                                      lambda result: self.metrics.transactions.labels(result=result).inc(),
                                      self.stop, self._stop)
        self.committer = self.delivery.committer  # the single owner of the books of done offsets
        # made by run() once the broker is reachable
        self.metrics_port: int | None = None
        self.consumer: KafkaConsumer | None = None
        self.publisher: Publisher | None = None
        self.outbox: Outbox | None = None
        self.batcher: MicroBatcher | None = None
        self.decoding: DecodeStage | None = None
        self.probe: LagProbe | None = None

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the batches in flight and exit; safe from signal handlers and threads."""
        self._stop.set()

    @property
    def model(self) -> Model:
        """The model in force: the next batch to decode is decoded, scored and decided with it."""
        return self.models.current

    @property
    def scorer(self) -> Scorer:
        return self.models.current.scorer

    @property
    def calibration(self) -> Calibration:
        return self.models.current.calibration

    @property
    def control_topic(self) -> ControlTopic | None:
        return self.models.control_topic

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> int:
        quiet_kafka_logs()
        with ExitStack() as stack:
            try:
                if not self._open(stack):
                    return 0  # stopped while waiting for the broker
                self.readiness.mark_ready()
                self._loop()
                self._drain()
                self.delivery.commit_final()
                self.readiness.stopped()
            except BaseException:
                self.stop()  # a crash: the publish thread stops retrying, so closing cannot hang
                raise
        log.info("agent stopped: %d frames scored, %d alerts, %d dead-lettered",
                 self.stats.scored, self.stats.alerts, self.stats.dead_lettered)
        if self.delivery.failure is not None:
            raise self.delivery.failure
        return 0

    def _open(self, stack: ExitStack) -> bool:
        """Starts the health server, producer, publish thread, consumer, decode thread and control
        topic, each closed by `stack` (in reverse). False if a stop came while waiting for the broker."""
        s = self.settings
        if s.metrics.enabled:
            server = HealthServer(s.metrics.host, s.metrics.port, self.metrics, self.health).start()
            stack.callback(server.close)
            self.metrics_port = server.port
        self._log_start()
        producer = self._connect_producer()
        if producer is None:
            return False
        self.publisher = Publisher(producer, self._connect_producer, s.retry, self._stop,
                                   on_error=self.readiness.broker_error,
                                   on_give_up=lambda topic, why: self.metrics.records_refused.labels(topic=topic).inc())
        stack.callback(lambda: _close("producer", self.publisher.producer.close, timeout=5))  # the one in use at the end
        self.outbox = self.delivery.open(self.publisher, lambda: self.consumer.group_metadata(), self.health.beat)
        stack.callback(self.outbox.close)
        broker_down = lambda reason: self.readiness.broker_error("connect", reason)  # noqa: E731
        consumer = connect_with_retry(lambda: make_consumer(s), "consumer", s.kafka, s.retry, self._stop, broker_down)
        if consumer is None:
            return False
        self.consumer = self.committer.consumer = consumer
        stack.callback(_close, "consumer", consumer.close, autocommit=False, timeout_ms=5000)
        self.decoding = DecodeStage(s.batching.decode_ahead)
        stack.callback(self.decoding.close)
        stack.callback(self.models.close)  # the model loader thread, if a model was loaded
        frames = FetchGuard(consumer, "frames consumer", self._fetch_failed)
        self.batcher = MicroBatcher(frames, s.batching.max_batch, s.batching.max_wait_ms / 1000, s.max_frames,
                                    epoch=self.committer.epoch)
        self.probe = LagProbe(consumer, self.committer, self.metrics, self.readiness, s.retry.lag_every_s)
        consumer.subscribe([s.topics.frames], listener=self.committer.listener())
        if s.topics.calibration:
            control = connect_with_retry(lambda: ControlTopic(s, self._fetch_failed), "calibration topic consumer", s.kafka, s.retry,
                                         self._stop)
            if control is None:
                return False
            self.models.control_topic = control
            stack.callback(control.close)
        return True

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self.health.beat()
            got = self.batcher.poll(busy=len(self.decoding) > 0)
            self.delivery.reposition(self.consumer, self.batcher)  # exactly-once, after a rebalance
            now = time.monotonic()
            self.models.check(now)  # between batches: each batch is decoded, scored and decided by one model
            self._decode()
            self._score(wait=not got)
            self._finish()
            self.delivery.commit()
            if self._should_exit(now):
                break
            if self.probe.due(now):
                self.probe.check(self.batcher.buffered + len(self.decoding) + int(self.outbox.busy()))

    def _drain(self) -> None:
        """Finish what was polled: decode, score, publish, wait for the acks, mark done."""
        self._decode(force=True)
        self._score(wait=True)
        self.outbox.wait_idle()
        self._finish()

    # -- the steps -----------------------------------------------------------------------------
    def _decode(self, force: bool = False) -> None:
        """A full or expired buffer goes to the decode thread."""
        batch = self.batcher.take(force)
        if batch is not None:
            self.decoding.submit(batch, self.models.current.decode)  # the batch keeps the model in force

    def _score(self, wait: bool) -> None:
        """Decoded batches are scored, turned into records and handed to the publish thread."""
        for batch in self.decoding.decoded(wait):
            if self.outbox.gave_up:
                continue  # behind an unacknowledged batch: stays uncommitted, read again
            model, calibration = batch.model, batch.model.calibration  # one model per batch, even if swapped meanwhile
            scored = score_batch(model.scorer, calibration, batch)
            messages = self.records.build(scored, model.model_id, calibration.calibration_id, int(time.time() * 1000))
            self.outbox.submit((batch, calibration, scored), self.delivery.payload(messages, batch))

    def _finish(self) -> None:
        """Batches the publish thread finished: the delivery settles each (offsets done, or read again)."""
        for done in self.outbox.acknowledged():
            batch, calibration, scored = done.item
            if self.delivery.settle(done, batch, self.batcher):
                self._finished(batch, calibration, scored, done.publish_s)

    def _finished(self, batch: DecodedBatch, calibration: Calibration, scored: ScoredBatch, publish_s: float) -> None:
        self.accounting.add(batch, scored, publish_s)
        self.drift_watch.observe(calibration, scored)
        self.readiness.mark_ready()

    def _should_exit(self, now: float) -> bool:
        s = self.settings
        idle = not self.batcher.buffered and not len(self.decoding) and self.outbox.idle()
        if self.batcher.at_limit and idle:
            log.info("stopping: --max-frames %d reached", s.max_frames)
            return True
        quiet_since = max(self.batcher.last_frame_at, self.committer.assigned_at)
        if s.idle_exit_s is not None and self.committer.joined and idle and now - quiet_since >= s.idle_exit_s:
            log.info("stopping: no frame for %.1f s (--idle-exit-s)", s.idle_exit_s)
            return True
        return False

    # -- helpers -------------------------------------------------------------------------------
    def _fetch_failed(self, reason: str, located: bool) -> None:
        """A poll failed on what was fetched (fetch_guard.py): counted; one that names no record to
        skip means nothing flows from that consumer, so readiness falls until a batch finishes."""
        self.metrics.fetch_errors.labels(reason=reason).inc()
        if not located:
            self.readiness.broker_error("fetch", reason)

    def _make_scorer(self, checkpoint) -> Scorer:
        """A Scorer with the agent's device, runtime and threads (at start-up and on the model loader thread)."""
        s = self.settings
        return Scorer(checkpoint, s.device, runtime=s.runtime, runtime_threads=_cpu_threads(s.torch_threads))

    def _connect_producer(self) -> KafkaProducer | None:
        s = self.settings
        return connect_with_retry(lambda: make_producer(s.kafka, s.producer, s.retry.attempt_timeout_s,
                                                        transactional_id=s.transactional_id), "producer",
                                  s.kafka, s.retry, self._stop,
                                  lambda reason: self.readiness.broker_error("connect", reason))

    def _log_start(self) -> None:
        effective = {
            "settings": masked(self.settings.for_log()),
            "model_id": self.scorer.model_id,
            "calibration_id": self.calibration.calibration_id,
            "device": str(self.scorer.device),
            "torch_threads": torch.get_num_threads(),
            "input": {"image_size": self.scorer.spec.image_size, "channels": self.scorer.spec.channels},
            "metrics_port": self.metrics_port,
            "delivery": self.settings.delivery,
            "transactional_id": self.settings.transactional_id,
            "kafka_python": kafka.__version__,
            "codecs": available_codecs(),
        }
        log.info("agent starting: %s", json.dumps(effective, sort_keys=True))


def _close(what: str, close, **kwargs) -> None:
    try:
        close(**kwargs)
    except Exception as exc:  # noqa: BLE001 - closing is best effort; offsets are already committed
        log.warning("closing the %s failed: %s", what, exc)
