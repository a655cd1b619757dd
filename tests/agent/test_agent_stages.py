"""The agent's stages one by one, without Kafka: MicroBatcher, FrameDecoder, score_batch and
RecordBuilder, with a fake consumer, a fake scorer and a spy calibration."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kafka.structs import TopicPartition

from ama_stream.agent.batcher import IDLE_POLL_MS, MicroBatcher
from ama_stream.agent.decode import DecodedBatch, DecodeStage, FrameDecoder, PolledBatch, Rejected
from ama_stream.agent.frames import NPY, FrameLimits, encode_frame
from ama_stream.agent.records import SCORE_SCHEMA, FrameMeta, RecordBuilder
from ama_stream.agent.score import ScoredBatch, ScoredFrame, score_batch
from ama_stream.agent.settings import TopicsSection
from ama_stream.calibration import Decisions, Policy, fit_calibration

from .fakes import FakeScorer, png, record

P0, P1 = TopicPartition("frames", 0), TopicPartition("frames", 1)


# -- MicroBatcher ------------------------------------------------------------------------------------

class ScriptedConsumer:
    """poll() returns the next scripted list of records and remembers its arguments."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls: list[tuple[int, int]] = []

    def poll(self, timeout_ms, max_records):
        self.calls.append((timeout_ms, max_records))
        got = self.script.pop(0) if self.script else []
        got, rest = got[:max_records], got[max_records:]
        if rest:
            self.script.insert(0, rest)
        return {P0: got} if got else {}


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _recs(start, n):
    return [record(offset=i) for i in range(start, start + n)]


def test_batcher_closes_a_batch_when_full_and_polls_no_more_than_fits():
    consumer = ScriptedConsumer(_recs(0, 3), _recs(3, 1))
    b = MicroBatcher(consumer, max_batch=4, max_wait_s=10.0, clock=Clock())
    assert b.poll() == 3 and b.take() is None  # neither full nor old
    assert b.poll() == 1
    assert consumer.calls[1][1] == 1  # only room for one more
    batch = b.take()
    assert [r.offset for r in batch.records] == [0, 1, 2, 3] and b.buffered == 0


def test_batcher_closes_a_partial_batch_after_max_wait_and_polls_until_its_deadline():
    clock = Clock()
    consumer = ScriptedConsumer(_recs(0, 2), [])
    b = MicroBatcher(consumer, max_batch=64, max_wait_s=0.05, clock=clock)
    b.poll()
    assert consumer.calls[0][0] == IDLE_POLL_MS  # nothing buffered: the idle wait
    clock.t += 0.02
    b.poll()
    assert consumer.calls[1][0] == 30  # until the buffer's deadline
    assert b.take() is None
    clock.t += 0.04
    assert len(b.take().records) == 2


def test_batcher_does_not_wait_while_work_is_pending_and_can_be_forced():
    consumer = ScriptedConsumer(_recs(0, 1))
    b = MicroBatcher(consumer, max_batch=64, max_wait_s=10.0, clock=Clock())
    b.poll(busy=True)
    assert consumer.calls[0][0] == 0
    assert b.take() is None and len(b.take(force=True).records) == 1
    assert b.take(force=True) is None  # nothing left


def test_batcher_respects_max_frames_and_stops_polling():
    consumer = ScriptedConsumer(_recs(0, 4), _recs(4, 4))
    b = MicroBatcher(consumer, max_batch=4, max_wait_s=10.0, max_frames=6, clock=Clock())
    b.poll()
    b.take()
    b.poll()
    assert consumer.calls[1][1] == 2 and b.at_limit
    assert len(b.take().records) == 2  # the budget is spent: due at once
    assert b.poll() == 0 and len(consumer.calls) == 2  # no poll past the budget


def test_batcher_records_the_epoch_before_the_poll_of_its_first_frame():
    epochs = iter([0, 1, 2])
    consumer = ScriptedConsumer(_recs(0, 1), _recs(1, 1))
    b = MicroBatcher(consumer, max_batch=2, max_wait_s=10.0, epoch=lambda: next(epochs), clock=Clock())
    b.poll()
    b.poll()  # a revocation happened in between: the batch keeps the older epoch
    assert b.take().epoch == 0


# -- FrameDecoder ------------------------------------------------------------------------------------

def test_frame_decoder_decodes_fits_and_dead_letters_with_reasons_and_positions():
    decoder = FrameDecoder(FakeScorer(), FrameLimits(max_frame_bytes=20_000))
    npy = encode_frame(np.zeros((40, 40, 3), dtype=np.uint8), NPY)  # resized and converted to 1 channel
    batch = PolledBatch([
        record(partition=0, offset=5, value=png(10), headers=[("frame-id", b"a")]),
        record(partition=1, offset=9, value=b"garbage"),
        record(partition=0, offset=6, value=npy),
        record(partition=1, offset=10, value=png(10), headers=[("content-type", b"image/jpeg")]),
        record(partition=0, offset=7, value=b"\x89PNG\r\n\x1a\n" + b"x" * 30_000),
        record(partition=1, offset=11, value=png(200), headers=[("camera-id", b"c" * 5000)]),
        record(partition=1, offset=12, value=None),
    ], epoch=3)
    out = decoder(batch)
    assert [m.offset for m in out.frames] == [5, 6] and out.frames[0].frame_id == "a"
    assert out.inputs.tiles.shape == (2, 32, 32, 1) and out.inputs.tiles.dtype == np.uint8  # one input per frame
    assert out.values == [batch.records[0].value, npy]  # kept for dead letters if scoring fails
    assert [(r.meta.offset, r.reason) for r in out.rejected] == [
        (9, "undecodable"), (10, "bad-content-type"), (7, "too-large"), (11, "header-too-large"), (12, "empty")]
    assert all(r.error.startswith(r.reason + ":") for r in out.rejected)
    assert out.rejected[0].value == b"garbage"  # the dead letter carries the original value
    assert out.positions == {P0: 8, P1: 13} and out.epoch == 3 and out.size == 7
    assert out.misfit.counts  # the 40x40 RGB frame did not fit as it was


def test_frame_decoder_with_nothing_decodable_has_no_input():
    out = FrameDecoder(FakeScorer(), FrameLimits())(PolledBatch([record(value=b"x")], epoch=0))
    assert out.inputs is None and out.frames == [] and len(out.rejected) == 1 and out.positions == {P0: 1}


def test_decode_stage_returns_batches_in_poll_order_and_all_of_them_when_asked():
    stage, decoder = DecodeStage(ahead=2), FrameDecoder(FakeScorer(), FrameLimits())
    try:
        for i in range(3):
            stage.submit(PolledBatch([record(offset=i, value=png(i))], epoch=0), decoder)
        out = list(stage.decoded(wait=True))
        assert [b.frames[0].offset for b in out] == [0, 1, 2] and len(stage) == 0
    finally:
        stage.close()


# -- score_batch -------------------------------------------------------------------------------------

class SpyCalibration:
    """Returns fixed decisions and remembers what it was asked: the stage must take z, log A,
    p-values, anomalies and thresholds from here and nowhere else."""

    calibration_id = "spy"

    def __init__(self):
        self.asked: list[tuple[np.ndarray, list]] = []

    def decide(self, r, camera_ids=None):
        r = np.asarray(r, dtype=np.float64)
        self.asked.append((r.copy(), list(camera_ids)))
        n = len(r)
        return Decisions(z=np.arange(n) + 100.0, log_a=np.arange(n) - 50.0, p_value=np.full(n, 0.25),
                         anomaly=np.arange(n) % 2 == 1, threshold=np.full(n, 7.0))


def _decoded(levels, cameras=None, rejected=()):
    metas = [FrameMeta.from_record(record(offset=i, key=(cameras[i] if cameras else b"cam-0")))
             for i in range(len(levels))]
    inputs = torch.stack([torch.full((1, 32, 32), lv / 127.5 - 1) for lv in levels]) if levels else None
    return DecodedBatch(frames=metas, values=[b"v%d" % i for i in range(len(levels))], inputs=inputs,
                        rejected=list(rejected), positions={P0: len(levels)}, epoch=0, size=len(levels), decode_s=0.0)


def test_score_batch_takes_r_from_the_scorer_and_everything_else_from_the_calibration():
    scorer, cal = FakeScorer(), SpyCalibration()
    out = score_batch(scorer, cal, _decoded([0, 255, 127.5], cameras=[b"a", b"b", None]))
    assert scorer.calls == [3]  # one pass over the batch
    (r, cameras), = cal.asked
    np.testing.assert_allclose(r, [-1.0, 1.0, 0.0], atol=1e-6)
    assert cameras == ["a", "b", None]
    assert [(f.z, f.log_a, f.p_value, f.anomaly, f.threshold) for f in out.scored] == [
        (100.0, -50.0, 0.25, False, 7.0), (101.0, -49.0, 0.25, True, 7.0), (102.0, -48.0, 0.25, False, 7.0)]
    assert [round(f.r, 6) for f in out.scored] == [-1.0, 1.0, 0.0] and out.rejected == [] and out.score_s >= 0


def test_score_batch_agrees_with_a_real_calibration():
    cal = fit_calibration(np.random.default_rng(0).normal(-0.5, 0.1, 500), "fake-model", Policy.make("two-sided", 0.01))
    out = score_batch(FakeScorer(), cal, _decoded([60, 64, 250]))
    d = cal.decide(np.array([f.r for f in out.scored]))
    assert [f.anomaly for f in out.scored] == list(d.anomaly) == [False, False, True]
    np.testing.assert_allclose([f.z for f in out.scored], d.z)
    np.testing.assert_allclose([f.p_value for f in out.scored], d.p_value)


def test_a_frame_that_breaks_the_model_is_dead_lettered_with_its_value_and_the_rest_scored():
    def fail(x):
        if (x > 0.9).any():  # the bright frame makes the model raise; alone or in a batch
            raise RuntimeError("kernel exploded")

    decoder_rejected = Rejected(FrameMeta.from_record(record(offset=9)), b"junk", "undecodable", "undecodable: x")
    scorer = FakeScorer(fail=fail)
    out = score_batch(scorer, SpyCalibration(), _decoded([0, 255, 10], rejected=[decoder_rejected]))
    assert scorer.calls == [3, 1, 1, 1]  # the batch, then frame by frame
    assert [f.meta.offset for f in out.scored] == [0, 2]
    assert [(r.meta.offset, r.reason, r.value) for r in out.rejected] == [(9, "undecodable", b"junk"),
                                                                           (1, "score-failed", b"v1")]
    assert "RuntimeError: kernel exploded" in out.rejected[1].error


def test_a_non_finite_r_is_dead_lettered_and_a_batch_without_input_only_passes_its_rejections():
    out = score_batch(FakeScorer(nan_above=0.5), SpyCalibration(), _decoded([0, 255]))
    assert [f.meta.offset for f in out.scored] == [0]
    assert out.rejected[0].reason == "score-not-finite"
    assert out.rejected[0].error == "score-not-finite: the model gave R = nan (diverged weights?)"
    cal = SpyCalibration()
    empty = score_batch(FakeScorer(), cal, _decoded([], rejected=[Rejected(FrameMeta.from_record(record()), b"x",
                                                                           "empty", "empty: no value")]))
    assert empty.scored == [] and len(empty.rejected) == 1 and cal.asked == []


# -- RecordBuilder -----------------------------------------------------------------------------------

def _scored(offset, anomaly, camera=b"cam-1", frame_id=b"f"):
    meta = FrameMeta.from_record(record(offset=offset, key=b"k", headers=[("camera-id", camera), ("frame-id", frame_id),
                                                                           ("captured-at", b"123")]))
    return ScoredFrame(meta, r=1.5, z=float("nan") if offset == 99 else 2.0, log_a=-3.0, p_value=0.01,
                       anomaly=anomaly, threshold=3.0)


def test_record_builder_writes_a_score_record_per_frame_alerts_for_anomalies_and_dead_letters():
    topics = TopicsSection(frames="frames", scores="scores", alerts="alerts", dead_letter="dlq")
    rejected = Rejected(FrameMeta.from_record(record(offset=7, key=None, headers=[("x", b"y")])), None, "empty",
                        "empty: the frame has no value")
    batch = ScoredBatch(scored=[_scored(1, False), _scored(2, True)], rejected=[rejected])
    out = RecordBuilder(topics).build(batch, "model-1", "cal-1", scored_at=555)
    assert [m.topic for m in out] == ["scores", "scores", "alerts", "dlq"]
    rec = json.loads(out[1].value)
    assert rec == {"schema": SCORE_SCHEMA, "frame_id": "f", "camera_id": "cam-1", "topic": "frames", "partition": 0,
                   "offset": 2, "r_score": 1.5, "z": 2.0, "log_a": -3.0, "p_value": 0.01, "anomaly": True,
                   "threshold": 3.0, "model_id": "model-1", "calibration_id": "cal-1", "captured_at": 123,
                   "scored_at": 555}
    assert out[2].value == out[1].value and out[1].key == b"cam-1"  # keyed by camera id
    assert dict(out[1].headers) == {"content-type": b"application/json", "frame-id": b"f", "camera-id": b"cam-1"}
    # a refused score record falls back to the frame's dead letter (headers only); the alert has no
    # fallback of its own, so one frame gives at most one dead letter
    fb = out[1].fallback
    assert fb.topic == "dlq" and fb.dead_letter and fb.value is None and fb.key == b"k"
    assert dict(fb.headers)["error"].startswith(b"record-refused") and out[2].fallback is None
    dl = out[3]
    assert dl.dead_letter and dl.key is None and dl.value == b""  # neither key nor value: an empty value
    assert dl.headers[0] == ("x", b"y") and dict(dl.headers)["source-offset"] == b"7"


def test_record_builder_without_a_scores_topic_gives_the_alert_the_fallback():
    topics = TopicsSection(frames="frames", scores=None, alerts="alerts", dead_letter="dlq")
    out = RecordBuilder(topics).build(ScoredBatch(scored=[_scored(1, False), _scored(2, True)]), "m", "c", 1)
    assert [m.topic for m in out] == ["alerts"] and out[0].fallback.topic == "dlq"
    nan = RecordBuilder(topics).build(ScoredBatch(scored=[_scored(99, True)]), "m", "c", 1)
    assert json.loads(nan[0].value)["z"] is None  # never invalid JSON


@pytest.mark.parametrize("value", [b"orig", None])
def test_record_builder_keeps_a_rejected_frames_value(value):
    rejected = Rejected(FrameMeta.from_record(record(offset=3, key=b"cam")), value, "undecodable", "undecodable: x")
    topics = TopicsSection(frames="frames", dead_letter="dlq")
    (dl,) = RecordBuilder(topics).build(ScoredBatch(rejected=[rejected]), "m", "c", 1)
    assert dl.value == value and dl.key == b"cam"


def test_a_real_model_with_nan_weights_dead_letters_every_frame_as_not_finite():
    """Diverged weights (NaN in the critic): no frame is decided normal, each is a dead letter
    `score-not-finite`, counted under that reason."""
    from ama_stream.checkpoint import Checkpoint
    from ama_stream.model import AMA, ModelConfig
    from ama_stream.preprocess import PreprocessSpec
    from ama_stream.scoring import Scorer

    cfg = ModelConfig(image_size=32, channels=1, nz=8, enc_width=4, gen_width=8, disc_width=8)
    state = AMA(cfg).state_dict()
    state["discriminator.linear.parametrizations.weight.original"].fill_(float("nan"))
    for key in [k for k in state if k.startswith("discriminator.blocks.0.conv1") and "original" in k]:
        state[key].fill_(float("nan"))
    scorer = Scorer(Checkpoint(cfg, PreprocessSpec(32, 1), state, 0.0, 1.0), "cpu")
    out = score_batch(scorer, SpyCalibration(), _decoded([0, 128, 255]))
    assert out.scored == [] and [r.reason for r in out.rejected] == ["score-not-finite"] * 3
