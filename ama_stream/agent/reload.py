"""The model in force -- a Scorer with the Calibration that decides its R-scores -- and how a
running agent replaces it: a new calibration, or a new model (checkpoint + calibration pair).

The run loop asks for updates between batches (every `calibration_check_s`) and swaps the one
`Model` object that the next batches are decoded, scored and decided with: each batch carries the
model in force when it went to the decoder, so a batch is fitted to, scored by and decided under
one model and one calibration only, and no frame is skipped or scored twice. Anything that fails
validation is refused: the agent logs it, counts it, and keeps the model in force.

- Calibration file: a new version is noticed by its (device, inode, size, mtime) changing;
  `ama-stream calibrate` replaces the file atomically (new inode). A writer that rewrites it in
  place may be caught half-way: that read is refused, and the finished file is read next time.
  It is parsed on the loop thread (a calibration is small) and must name the model in force.
- Checkpoint file (`model_reload: true`): a new version, noticed the same way (`ama-stream train`
  writes atomically too), is loaded together with the calibration file -- or, when the agent has
  no calibration file, with the checkpoint's own statistics: a new model always comes with the
  same kind of decision rule the agent started with, never with the old model's calibration.
- Control topic (`topics.calibration`): each message value is a calibration JSON document, as
  written by `ama-stream calibrate`, or a model message naming a checkpoint + calibration pair
  (`{"format": "ama-stream/model", "version": 1, "checkpoint": PATH, "calibration": PATH}`).
  Read outside any consumer group, from the end of the topic at start-up (only messages published
  while the agent runs), or from its beginning when the topic appears later. A message whose key
  names another model id is skipped (one topic can serve agents of several models); any other
  message is validated against this agent's model.

A new model is loaded off the loop thread (`ModelLoader` on one loader thread: checkpoint,
calibration, Scorer, a FrameDecoder for its input, a warm-up batch); the loop only swaps in a
model that is ready, and never waits for one.

This module loads models and owns the switch; what switches is in model_state.py, the watched files
in model_files.py, the control topic in control_topic.py.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from ama_stream.calibration import Calibration, load_calibration
from ama_stream.checkpoint import Checkpoint, load_checkpoint

from .control_topic import ControlTopic
from .decode import FrameDecoder
from .frames import FrameLimits
from .model_files import ModelFiles
from .model_state import Loaded, Model, ModelRequest, Update

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loading a model


def warm_up(scorer, batch: int) -> None:
    """One batch of gray frames through the model: the first real batch pays no lazy set-up, and
    a model that cannot score (diverged weights, device out of memory) is refused before the swap."""
    spec = scorer.spec
    r = np.asarray(scorer.r_scores(torch.zeros(batch, spec.channels, spec.image_size, spec.image_size),
                                   batch_size=batch))
    if len(r) != batch or not np.all(np.isfinite(r)):
        raise ValueError(f"warm-up: the model gave {len(r)} R-scores for {batch} gray frames, "
                         f"{int(np.sum(~np.isfinite(r)))} of them not finite (diverged weights?)")


class ModelLoader:
    """Makes the model a ModelRequest names; runs on the loader thread, never raises.

    In order, cheapest first: the checkpoint (validated), the calibration (it must name the
    checkpoint's model_id; none named: the checkpoint's statistics), the Scorer (the agent's device,
    runtime and threads), a FrameDecoder for its input size and channels, and a warm-up batch."""

    def __init__(self, make_scorer: Callable[[Checkpoint], Any], limits: FrameLimits, warm_batch: int):
        self.make_scorer = make_scorer
        self.limits = limits
        self.warm_batch = warm_batch

    def __call__(self, request: ModelRequest, current_model_id: str) -> Loaded:
        try:
            checkpoint = load_checkpoint(request.checkpoint)
            calibration = (load_calibration(request.calibration, checkpoint.model_id)
                           if request.calibration is not None else Calibration.from_checkpoint(checkpoint))
            why = calibration.implausible_for(checkpoint.metrics)
            if why:
                raise ValueError(f"{request.calibration}: {why}")
            if checkpoint.model_id == current_model_id:  # same weights (rewritten, touched): no new Scorer
                return Loaded(calibration=calibration if request.calibration is not None else None)
            scorer = self.make_scorer(checkpoint)
            warm_up(scorer, self.warm_batch)
            return Loaded(Model(scorer, calibration, FrameDecoder(scorer, self.limits), request.origin))
        except Exception as exc:  # noqa: BLE001 - whatever fails, the request is refused and the old model kept
            return Loaded(error=str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- the switch


class ModelSwitch:
    """The model in force, and the one place that swaps it.

    The run loop calls `check(now)` between batches; it reads the files and the control topic (set
    later, once the broker is reachable), swaps in each valid new calibration, hands new models to
    the loader thread one at a time and swaps in a model once it is loaded. `current` is read once
    per batch, when the batch goes to the decoder. `loader` None: model reload is off, and model
    messages are refused."""

    def __init__(self, model: Model, metrics, files: ModelFiles | None = None,
                 loader: Callable[[ModelRequest, str], Loaded] | None = None, needs_calibration: bool = False):
        self.current = model
        self.metrics = metrics
        self.files = files
        self.loader = loader
        self.needs_calibration = needs_calibration  # a new model must name its calibration (the agent has a file)
        self.control_topic: ControlTopic | None = None
        self._lock = threading.Lock()  # use() may come from any thread, swaps from the loop: none undoes the other
        self._queue: deque[ModelRequest] = deque()
        self._loading: tuple[ModelRequest, Future[Loaded]] | None = None
        self._thread: threading.Thread | None = None  # the loader thread of the load in progress
        self._show()

    @property
    def model_id(self) -> str:
        return self.current.model_id

    @property
    def busy(self) -> bool:
        """A model is loading or waiting to."""
        return self._loading is not None or bool(self._queue)

    def use(self, calibration: Calibration) -> None:
        """Swap the decision rule; takes effect from the next batch (any thread may call this)."""
        with self._lock:
            if calibration.model_id and calibration.model_id != self.model_id:
                raise ValueError(f"calibration is for model {calibration.model_id}, "
                                 f"the agent scores with {self.model_id}")
            checkpoint = getattr(self.current.scorer, "checkpoint", None)  # stage tests use bare scorers
            why = calibration.implausible_for(getattr(checkpoint, "metrics", None) or {})
            if why:
                raise ValueError(why)
            self.current = self.current.with_calibration(calibration)

    def request(self, request: ModelRequest) -> None:
        """A new model to load (run loop thread); refused at once if it cannot be admitted."""
        if not request.error:
            if self.loader is None:
                request = replace(request, error="model reload is off (set model_reload: true to swap models)")
            elif request.calibration is None and self.needs_calibration:
                request = replace(request, error="the agent decides with a calibration file; a new model needs its "
                                                 "own calibration (name `calibration` in the model message)")
        if request.error:
            self._refuse(request, request.error)
        else:
            self._queue.append(request)

    def check(self, now: float) -> None:
        self._collect()
        if self.files is not None and self._loading is None:  # the files are not read while a model loads
            self._take(self.files.check(now, self.model_id))
        if self.control_topic is not None:
            for item in self.control_topic.check(now, self.model_id):
                self._take(item)
        self._start_next()

    def close(self, timeout_s: float = 10.0) -> None:
        """Waits up to `timeout_s` for a model being loaded (it is dropped), then returns anyway: a
        load stuck in a read (a network file system) must not keep the agent from exiting, and the
        loader thread is a daemon thread, so it does not hold up the interpreter's exit either."""
        self._queue.clear()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("the model load from %s did not finish within %.0f s; stopping without it",
                            self._loading[0].origin if self._loading else "?", timeout_s)

    # -- calibrations ---------------------------------------------------------------------------
    def apply(self, update: Update) -> None:
        """Swaps in a valid new calibration; a refused one is logged and counted, the old one stays."""
        counter = self.metrics.calibration_reloads
        old = self.current.calibration
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
            self.use(new)
        except ValueError as exc:
            counter.labels(source=update.source, result="refused").inc()
            log.error("new calibration from %s refused, keeping %s: %s", update.origin, old.calibration_id, exc)
            return
        counter.labels(source=update.source, result="ok").inc()
        self._show()
        rule = new.rule()
        log.info("calibration %s -> %s from %s: %s; global threshold %.4f (expected false-alarm rate %.3g), "
                 "%d camera entries", old.calibration_id, new.calibration_id, update.origin, new.policy.describe(),
                 rule.threshold, rule.expected_fpr, len(new.cameras))

    # -- models ---------------------------------------------------------------------------------
    def _take(self, item: Update | ModelRequest | None) -> None:
        if isinstance(item, Update):
            self.apply(item)
        elif item is not None:
            self.request(item)

    def _start_next(self) -> None:
        if self._loading is not None or not self._queue:
            return
        request = self._queue.popleft()
        log.info("loading a new model from %s (checkpoint %s, calibration %s)", request.origin, request.checkpoint,
                 request.calibration or "the checkpoint's statistics")
        future: Future[Loaded] = Future()
        future.set_running_or_notify_cancel()
        loader, model_id = self.loader, self.model_id

        def load() -> None:
            try:
                future.set_result(loader(request, model_id))
            except BaseException as exc:  # noqa: BLE001 - handed to _collect, which refuses the request
                future.set_exception(exc)

        # one load at a time, on a daemon thread (not a ThreadPoolExecutor: its threads are joined
        # at interpreter exit, so a load stuck in a read would keep the agent from ever exiting)
        self._thread = threading.Thread(target=load, name="ama-model-load", daemon=True)
        self._loading = (request, future)
        self._thread.start()

    def _collect(self) -> None:
        """A finished load: the model swapped in, or the refusal counted."""
        if self._loading is None or not self._loading[1].done():
            return
        request, future = self._loading
        self._loading = None
        try:
            loaded = future.result()
        except Exception as exc:  # noqa: BLE001 - a loader that raised after all
            loaded = Loaded(error=f"{type(exc).__name__}: {exc}")
        if request.signature is not None and self.files is not None and self.files.signatures() != request.signature:
            log.info("%s or its calibration changed while the model loaded; loading them again", request.origin)
            return  # not counted: the next check sees the change and requests the pair as it is now
        if loaded.error:
            self._refuse(request, loaded.error)
            return
        if request.signature is not None and self.files is not None:
            self.files.model_loaded(request.signature)
        if loaded.model is None:
            self.metrics.model_reloads.labels(source=request.source, result="unchanged").inc()
            log.info("model from %s is the one in force (%s)", request.origin, self.model_id)
            if loaded.calibration is not None:
                self.apply(Update(request.source, request.origin, loaded.calibration))
            return
        self._swap(loaded.model, request)

    def _swap(self, model: Model, request: ModelRequest) -> None:
        with self._lock:
            old, self.current = self.current, model
        self.metrics.model_reloads.labels(source=request.source, result="loaded").inc()
        self._show()
        log.info("model %s -> %s from %s: %s; calibration %s -> %s (%s)", old.model_id, model.model_id, request.origin,
                 model.describe(), old.calibration.calibration_id, model.calibration.calibration_id,
                 model.calibration.policy.describe())

    def _refuse(self, request: ModelRequest, error: str) -> None:
        self.metrics.model_reloads.labels(source=request.source, result="refused").inc()
        log.error("new model from %s refused, keeping model %s with calibration %s: %s", request.origin,
                  self.model_id, self.current.calibration.calibration_id, error)

    def _show(self) -> None:
        self.metrics.model.clear()
        self.metrics.model.labels(model_id=self.model_id).set(1)
        self.metrics.calibration.clear()
        self.metrics.calibration.labels(calibration_id=self.current.calibration.calibration_id,
                                        policy=self.current.calibration.policy.name).set(1)
