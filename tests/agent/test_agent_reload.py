"""The model switch without a broker: loading off the loop, swaps between batches, refusals, the
watched checkpoint + calibration pair, model messages, the real ModelLoader on tiny checkpoints,
and the whole loop on fakes swapping to a model with another input size mid-stream."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from ama_stream.agent.decode import FrameDecoder
from ama_stream.agent.frames import FrameLimits
from ama_stream.agent.metrics import AgentMetrics
from ama_stream.agent.control_topic import model_message
from ama_stream.agent.model_files import ModelFiles
from ama_stream.agent.model_state import Loaded, Model, ModelRequest
from ama_stream.agent.reload import ModelLoader, ModelSwitch
from ama_stream.calibration import Calibration, Policy, fit_calibration, load_calibration
from ama_stream.checkpoint import load_checkpoint, save_checkpoint
from ama_stream.fileio import atomic_write_bytes, read_file_bytes
from ama_stream.preprocess import PreprocessSpec
from ama_stream.scoring import Scorer

from .conftest import wait_for
from .fakes import FakeScorer
from .test_agent_delivery import F0, F1, _agent_on_fakes, _frames


def calibration_for(model_id: str, mu: float = 0.0, seed: int = 0) -> Calibration:
    r = np.random.default_rng(seed).normal(mu, 0.05, 200)
    return fit_calibration(r, model_id, Policy("two-sided", 0.05), source={"spec": f"test {seed}"})


def fake_model(model_id: str, calibration: Calibration | None = None, spec=PreprocessSpec(32, 1),
               offset: float = 0.0) -> Model:
    scorer = FakeScorer(model_id=model_id, spec=spec, offset=offset)
    return Model(scorer, calibration or calibration_for(model_id), FrameDecoder(scorer, FrameLimits()), model_id)


def text_loader(request: ModelRequest, current_model_id: str) -> Loaded:
    """ModelLoader's contract on fakes: a "checkpoint" file holds its model id as text; the
    calibration is a real calibration file, checked against that id."""
    try:
        model_id = request.checkpoint.read_text().strip()
        calibration = load_calibration(request.calibration, model_id) if request.calibration else None
    except Exception as exc:  # noqa: BLE001
        return Loaded(error=str(exc))
    if model_id == current_model_id:
        return Loaded(calibration=calibration)
    return Loaded(fake_model(model_id, calibration))


def count(metrics: AgentMetrics, result: str, source: str, name: str = "ama_model_reloads_total") -> float:
    return metrics.registry.get_sample_value(name, {"source": source, "result": result}) or 0.0


def settle(switch: ModelSwitch) -> None:
    """check() until no model is loading or waiting to (the loader thread finishes on its own)."""
    def idle() -> bool:
        switch.check(time.monotonic())
        return not switch.busy
    wait_for(idle, 60, "the model switch to settle")


@pytest.fixture
def switches():
    made: list[ModelSwitch] = []

    def make(*args, **kwargs) -> ModelSwitch:
        made.append(ModelSwitch(*args, **kwargs))
        return made[-1]

    yield make
    for switch in made:
        switch.close()


# --------------------------------------------------------------------------- the switch


def test_a_model_loads_off_the_loop_thread_and_swaps_in_at_a_later_check(switches):
    release, loader_threads = threading.Event(), []
    new = fake_model("model-b")

    def slow_loader(request, current_model_id):
        loader_threads.append(threading.current_thread().name)
        assert current_model_id == "model-a"
        release.wait(30)
        return Loaded(new)

    metrics = AgentMetrics()
    switch = switches(fake_model("model-a"), metrics, loader=slow_loader)
    switch.request(ModelRequest("topic", "t[0]@1", Path("/models/b.pt"), None))
    switch.check(time.monotonic())  # hands it to the loader thread
    switch.check(time.monotonic())  # returns at once: the load is still running
    assert switch.busy and switch.model_id == "model-a"
    release.set()
    settle(switch)
    assert switch.current is new and loader_threads[0].startswith("ama-model-load")
    assert count(metrics, "loaded", "topic") == 1
    assert metrics.registry.get_sample_value("ama_model_info", {"model_id": "model-b"}) == 1
    assert metrics.registry.get_sample_value("ama_model_info", {"model_id": "model-a"}) is None
    info = {"calibration_id": new.calibration.calibration_id, "policy": "two-sided"}
    assert metrics.registry.get_sample_value("ama_calibration_info", info) == 1


def test_refused_models_are_counted_and_the_model_in_force_stays(switches, caplog):
    metrics = AgentMetrics()
    old = fake_model("model-a")
    failing = switches(old, metrics, loader=lambda request, current: Loaded(error="boom: no such checkpoint file"),
                       needs_calibration=True)
    failing.request(ModelRequest("topic", "t[0]@1", Path("/models/b.pt"), Path("/models/b.json")))
    failing.request(ModelRequest("topic", "t[0]@2", Path("/models/b.pt"), None))  # the agent has a calibration file
    failing.request(ModelRequest("topic", "t[0]@3", None, None, error="t[0]@3: model message is malformed"))
    settle(failing)
    assert failing.current is old and count(metrics, "refused", "topic") == 3
    assert "new model from t[0]@1 refused, keeping model model-a" in caplog.text and "boom" in caplog.text
    assert "a new model needs its own calibration" in caplog.text
    off = switches(old, AgentMetrics(), loader=None)  # model_reload: false
    off.request(ModelRequest("topic", "t[0]@4", Path("/models/b.pt"), Path("/models/b.json")))
    assert off.current is old and count(off.metrics, "refused", "topic") == 1
    assert "model reload is off" in caplog.text


def test_the_model_in_force_again_only_brings_its_calibration(switches):
    metrics = AgentMetrics()
    old, recalibrated = fake_model("model-a"), calibration_for("model-a", seed=5)
    switch = switches(old, metrics, loader=lambda request, current: Loaded(calibration=recalibrated))
    switch.request(ModelRequest("topic", "t[0]@1", Path("/models/a.pt"), Path("/models/a2.json")))
    settle(switch)
    assert switch.current.scorer is old.scorer and switch.current.calibration is recalibrated
    assert count(metrics, "unchanged", "topic") == 1
    assert count(metrics, "ok", "topic", "ama_calibration_reloads_total") == 1


def test_calibrations_follow_the_model_in_force(switches):
    switch = switches(fake_model("model-a"), AgentMetrics(), loader=lambda request, current: Loaded(fake_model("model-b")))
    with pytest.raises(ValueError, match="calibration is for model model-b, the agent scores with model-a"):
        switch.use(calibration_for("model-b"))
    switch.request(ModelRequest("topic", "t[0]@1", Path("/models/b.pt"), None))
    settle(switch)
    switch.use(calibration_for("model-b", seed=3))
    assert switch.current.calibration.model_id == "model-b"


# --------------------------------------------------------------------------- the watched pair


def write_pair(folder: Path, model_id: str, calibration: Calibration | None = None) -> None:
    folder.mkdir(exist_ok=True)
    atomic_write_bytes(folder / "model.pt", model_id.encode())
    if calibration is not None:
        atomic_write_bytes(folder / "calibration.json", calibration.to_json_bytes())


def test_a_new_checkpoint_before_its_calibration_is_refused_once_then_loaded_with_it(switches, tmp_path):
    """Two files replaced one after the other: a check between the two sees a checkpoint whose
    calibration is still the old model's (refused, counted); the calibration arriving retries the pair."""
    cal_a, cal_b = calibration_for("model-a"), calibration_for("model-b", seed=1)
    write_pair(tmp_path, "model-a", cal_a)
    files = ModelFiles(tmp_path / "model.pt", tmp_path / "calibration.json", check_every_s=0)
    metrics = AgentMetrics()
    switch = switches(fake_model("model-a", files.initial_calibration("model-a")), metrics, files, text_loader,
                      needs_calibration=True)
    settle(switch)
    assert not count(metrics, "refused", "file") and not count(metrics, "loaded", "file")
    write_pair(tmp_path, "model-b")  # the checkpoint first
    settle(switch)
    assert switch.model_id == "model-a" and count(metrics, "refused", "file") == 1
    settle(switch)  # not retried while nothing changes
    assert count(metrics, "refused", "file") == 1
    atomic_write_bytes(tmp_path / "calibration.json", cal_b.to_json_bytes())  # then its calibration
    settle(switch)
    assert (switch.model_id, switch.current.calibration.calibration_id) == ("model-b", cal_b.calibration_id)
    assert count(metrics, "loaded", "file") == 1
    recalibrated = calibration_for("model-b", seed=2)  # afterwards a calibration alone is one for the new model
    atomic_write_bytes(tmp_path / "calibration.json", recalibrated.to_json_bytes())
    settle(switch)
    assert switch.current.calibration.calibration_id == recalibrated.calibration_id
    assert count(metrics, "ok", "file", "ama_calibration_reloads_total") == 1
    assert count(metrics, "loaded", "file") == 1 and count(metrics, "refused", "file") == 1


def test_a_pair_swapped_by_a_directory_symlink_while_loading_is_loaded_again_not_refused(switches, tmp_path, caplog):
    write_pair(tmp_path / "v1", "model-a", calibration_for("model-a"))
    write_pair(tmp_path / "v2", "model-b", calibration_for("model-b", seed=1))
    write_pair(tmp_path / "v3", "model-c", calibration_for("model-c", seed=2))
    current = tmp_path / "current"
    current.symlink_to("v1")

    def swap(to: str) -> None:
        (tmp_path / "next").symlink_to(to)
        (tmp_path / "next").replace(current)  # one rename: both files change at once

    release, started = threading.Event(), threading.Event()
    caplog.set_level(logging.INFO, logger="ama_stream.agent.reload")

    def slow_text_loader(request, current_model_id):
        started.set()
        release.wait(30)
        return text_loader(request, current_model_id)

    files = ModelFiles(current / "model.pt", current / "calibration.json", check_every_s=0)
    metrics = AgentMetrics()
    switch = switches(fake_model("model-a", files.initial_calibration("model-a")), metrics, files, slow_text_loader,
                      needs_calibration=True)
    swap("v2")
    switch.check(time.monotonic())
    assert started.wait(30)
    swap("v3")  # while v2 loads
    release.set()
    settle(switch)
    assert switch.model_id == "model-c" and count(metrics, "loaded", "file") == 1
    assert "changed while the model loaded; loading them again" in caplog.text
    assert not count(metrics, "refused", "file") and not count(metrics, "refused", "file", "ama_calibration_reloads_total")


# --------------------------------------------------------------------------- model messages


def test_model_messages_are_parsed_and_malformed_ones_refused_with_the_reason():
    ok = model_message(json.dumps({"format": "ama-stream/model", "version": 1, "checkpoint": "/m/b.pt",
                                   "calibration": "/m/b.json"}).encode(), "t[0]@1")
    assert (ok.source, ok.checkpoint, ok.calibration, ok.error) == ("topic", Path("/m/b.pt"), Path("/m/b.json"), "")
    no_cal = model_message(b'{"format": "ama-stream/model", "version": 1, "checkpoint": "/m/b.pt"}', "o")
    assert no_cal.calibration is None and not no_cal.error
    for payload, reason in [
        ({"version": 1, "checkpoint": "models/b.pt"}, "absolute path"),
        ({"version": 1, "checkpoint": "/m/b.pt", "calibration": 3}, "`calibration` as an absolute path"),
        ({"version": 1}, "`checkpoint`"),
        ({"version": 2, "checkpoint": "/m/b.pt"}, "version 2 is not supported"),
        ({"version": True, "checkpoint": "/m/b.pt"}, "version True is not supported"),  # True == 1, not a version
        ({"version": 1.0, "checkpoint": "/m/b.pt"}, "version 1.0 is not supported"),
        ({"version": 1, "checkpoint": "/m/b.pt", "weights": "x"}, "unknown field(s) weights"),
    ]:
        refused = model_message(json.dumps({"format": "ama-stream/model", **payload}).encode(), "t[0]@9")
        assert refused.error.startswith("t[0]@9: model message") and reason in refused.error, payload
    calibration = calibration_for("model-a").to_json_bytes()
    # under the size cap but nested too deeply for json: the RecursionError branch
    for other in (calibration, b"not json", b"[" * 10_000, b'{"format": "ama-stream/model"' + b" " * 70_000 + b"}"):
        assert model_message(other, "o") is None  # a calibration document (or garbage) for parse_calibration


def test_model_messages_may_name_files_only_inside_the_allowed_folders(tmp_path):
    """Before, a model message could name any file the agent's user can read (/etc/shadow as root), and
    the log told whether it existed. Now paths outside the allowed folders are refused unread, the
    same way whether they exist or not, and a symbolic link cannot lead out of a folder."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "b.pt").write_bytes(b"x")
    (models / "escape.pt").symlink_to("/etc/passwd")

    def message(checkpoint: str, calibration: str | None = None):
        payload = {"format": "ama-stream/model", "version": 1, "checkpoint": checkpoint}
        if calibration:
            payload["calibration"] = calibration
        return model_message(json.dumps(payload).encode(), "t[0]@3", [models.resolve()])

    assert not message(str(models / "b.pt")).error
    assert not message(str(models / "new.pt")).error  # inside, not yet written: the loader says so later
    for outside in ("/etc/shadow", "/etc/no-such-file", str(models / "escape.pt"), str(models / ".." / "b.pt")):
        refused = message(outside)
        assert "outside the folders model messages may use" in refused.error and "no such" not in refused.error
    assert "`calibration`" in message(str(models / "b.pt"), "/etc/shadow").error


def test_a_calibration_that_would_silence_the_model_is_refused():
    """mu = 1e150 was accepted and silenced every alert; a sigma a million times too large would too."""
    from ama_stream.calibration import Calibration, Entry, Policy

    held_out = {"holdout_r_mean": 120.0, "holdout_r_std": 4.0}
    fitted = Calibration("m", Entry(n=500, mu=118.0, sigma=4.5), Policy("sigma", None, 3.0))
    assert fitted.implausible_for(held_out) is None and fitted.implausible_for({}) is None
    for entry in (Entry(n=500, mu=1e150, sigma=4.0), Entry(n=500, mu=120.0, sigma=4e6),
                  Entry(n=500, mu=120.0, sigma=1e-3), Entry(n=500, mu=-1e3, sigma=4.0)):
        why = Calibration("m", entry, Policy("sigma", None, 3.0)).implausible_for(held_out)
        assert why and "not a calibration of this model's scores" in why
    per_camera = Calibration("m", Entry(n=500, mu=118.0, sigma=4.5), Policy("sigma", None, 3.0),
                             {"cam-9": Entry(n=50, mu=1e150, sigma=1.0)})
    assert "camera 'cam-9'" in per_camera.implausible_for(held_out)


# --------------------------------------------------------------------------- the real loader


def test_the_model_loader_builds_a_warmed_model_for_its_own_input_and_refuses_bad_pairs(
        random_checkpoint, other_checkpoint, tmp_path):
    old_id, new = load_checkpoint(random_checkpoint).model_id, load_checkpoint(other_checkpoint)
    warm_calls = []

    def make_scorer(checkpoint):
        scorer = Scorer(checkpoint, "cpu")
        original = scorer.r_scores
        scorer.r_scores = lambda x, batch_size=256, desc=None: warm_calls.append(tuple(x.shape)) or original(x, batch_size)
        return scorer

    loader = ModelLoader(make_scorer, FrameLimits(), warm_batch=4)
    cal = tmp_path / "other.json"
    calibration_for(new.model_id).save(cal)
    loaded = loader(ModelRequest("file", "f", other_checkpoint, cal), old_id)
    assert not loaded.error and loaded.model.model_id == new.model_id
    assert loaded.model.calibration.model_id == new.model_id and loaded.model.decoder.spec == PreprocessSpec(16, 3)
    assert warm_calls == [(4, 3, 16, 16)]  # warmed with one batch of its own input
    own = loader(ModelRequest("file", "f", other_checkpoint, None), old_id)
    assert own.model.calibration.calibration_id == f"checkpoint:{new.model_id}"  # no calibration file: its own statistics
    same = loader(ModelRequest("file", "f", random_checkpoint, None), old_id)
    assert same.model is None and same.calibration is None and not same.error

    wrong = tmp_path / "wrong.json"
    calibration_for(old_id).save(wrong)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    diverged = load_checkpoint(random_checkpoint)
    first = next(iter(diverged.state_dict))
    diverged.state_dict = {**diverged.state_dict, first: torch.full_like(diverged.state_dict[first], float("nan"))}
    nan_path = tmp_path / "nan.pt"
    save_checkpoint(diverged, nan_path)
    for request, reason in [
        (ModelRequest("file", "f", other_checkpoint, wrong), f"calibration is for model {old_id}, not for this "
                                                             f"checkpoint's model {new.model_id}"),
        (ModelRequest("file", "f", corrupt, None), "not a readable checkpoint"),
        (ModelRequest("file", "f", tmp_path / "missing.pt", None), "no such checkpoint file"),
        (ModelRequest("file", "f", nan_path, None), "warm-up: the model gave 4 R-scores for 4 gray frames, 4 of them not finite"),
    ]:
        result = loader(request, old_id)
        assert result.model is None and reason in result.error, (request.checkpoint, result.error)


def test_model_messages_naming_a_fifo_or_a_device_are_refused_promptly_and_the_switch_keeps_working(
        switches, other_checkpoint, tmp_path, caplog):
    """A path from a control message is only read if it is a regular file: a FIFO (or /dev/stdin)
    would block the loader thread forever, /dev/zero would fill memory."""
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    cal = tmp_path / "cal.json"
    calibration_for("model-b").save(cal)

    def make_scorer(checkpoint):  # never reached: the files are refused first
        raise AssertionError("a scorer was made for a refused request")

    metrics = AgentMetrics()
    old = fake_model("model-a")
    switch = switches(old, metrics, loader=ModelLoader(make_scorer, FrameLimits(), warm_batch=2))
    requests = [
        (fifo, None, "is not a regular file (a FIFO), expected a checkpoint file"),
        (Path("/dev/zero"), None, "is not a regular file (a character device), expected a checkpoint file"),
        (tmp_path, None, "is a directory, expected a checkpoint file"),
    ]
    checkpoint = other_checkpoint  # a valid checkpoint, with a calibration that is not a file
    requests += [(checkpoint, fifo, "is not a regular file (a FIFO), expected a calibration file"),
                 (checkpoint, Path("/dev/zero"), "is not a regular file (a character device), expected a calibration file")]
    start = time.monotonic()
    for i, (ckpt, calibration, _) in enumerate(requests):
        switch.request(ModelRequest("topic", f"t[0]@{i}", ckpt, calibration))
        settle(switch)
    assert time.monotonic() - start < 30
    assert switch.current is old and count(metrics, "refused", "topic") == len(requests)
    for _, _, reason in requests:
        assert reason in caplog.text
    switch.use(calibration_for("model-a", seed=4))  # still working
    start = time.monotonic()
    switch.close()
    assert time.monotonic() - start < 5


def test_a_watched_checkpoint_replaced_by_a_fifo_is_refused_and_the_files_are_still_watched(switches, tmp_path):
    write_pair(tmp_path, "model-a", calibration_for("model-a"))
    files = ModelFiles(tmp_path / "model.pt", tmp_path / "calibration.json", check_every_s=0)
    metrics = AgentMetrics()
    loader = ModelLoader(lambda checkpoint: None, FrameLimits(), warm_batch=2)
    switch = switches(fake_model("model-a", files.initial_calibration("model-a")), metrics, files, loader,
                      needs_calibration=True)
    (tmp_path / "model.pt").unlink()
    os.mkfifo(tmp_path / "model.pt")
    settle(switch)
    assert count(metrics, "refused", "file") == 1 and switch.model_id == "model-a"
    # the loader is free again, so the files are still looked at (they are not while a model loads):
    # the calibration changing retries the pair, which is refused again at once
    atomic_write_bytes(tmp_path / "calibration.json", calibration_for("model-a", seed=7).to_json_bytes())
    settle(switch)
    assert count(metrics, "refused", "file") == 2 and switch.model_id == "model-a"


def test_read_file_bytes_refuses_what_is_not_a_regular_file_or_too_large(tmp_path):
    class Refused(Exception):
        pass

    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    (tmp_path / "ok").write_bytes(b"x" * 100)
    for path, reason in [(fifo, "not a regular file (a FIFO)"), (Path("/dev/zero"), "a character device"),
                         (tmp_path, "is a directory"), (tmp_path / "missing", "no such thing file"),
                         (big, "101 bytes is larger than a thing file can be (100)")]:
        with pytest.raises(Refused, match=re.escape(reason)):
            read_file_bytes(path, "thing", Refused, max_bytes=100)
    assert read_file_bytes(tmp_path / "ok", "thing", Refused, max_bytes=100) == b"x" * 100


def test_a_proc_file_that_reports_size_zero_is_refused_after_one_byte():
    """/proc/self/pagemap reports 0 bytes and yields gigabytes: before, a model message naming it read
    2 GiB before the size limit refused it. Now the read stops one byte past what the size said."""
    import resource

    class Refused(Exception):
        pass

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(Refused, match="holds more than the 0 bytes its size says"):
        read_file_bytes(Path("/proc/self/pagemap"), "checkpoint", Refused, max_bytes=2 * 2**30)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: nothing like 2 GiB


def test_closing_the_switch_does_not_wait_for_a_stuck_load(switches):
    stuck = threading.Event()

    def stuck_loader(request, current_model_id):
        stuck.set()
        threading.Event().wait(3600)  # a read that never returns

    switch = switches(fake_model("model-a"), AgentMetrics(), loader=stuck_loader)
    switch.request(ModelRequest("topic", "t[0]@1", Path("/models/b.pt"), None))
    switch.check(time.monotonic())
    assert stuck.wait(30)
    start = time.monotonic()
    switch.close(timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert switch._thread.daemon  # nor does it hold up the interpreter's exit


# --------------------------------------------------------------------------- the whole loop on fakes


def test_the_loop_swaps_to_a_model_with_another_input_between_batches_scoring_each_frame_once(monkeypatch):
    """A swap from a 32x32 gray model to a 16x16 RGB one while batches decoded for the old input are
    in flight: each batch is scored by the model it was decoded for (a fake scorer refuses other
    inputs, which would dead-letter the frames), records name that model, nothing is lost or doubled."""
    new_scorer = FakeScorer(model_id="fake-model-2", spec=PreprocessSpec(16, 3), offset=10.0)
    new = Model(new_scorer, calibration_for("fake-model-2", mu=9.0), FrameDecoder(new_scorer, FrameLimits()), "b")
    loaded = threading.Event()
    agent = None

    def loader(request, current_model_id):
        loaded.set()
        return Loaded(new)

    def swap_mid_stream(n, consumer):
        if n == 3:
            agent.models.request(ModelRequest("topic", "test", Path("/models/b.pt"), None))
        if n == 4:
            assert loaded.wait(30)  # the swap happens at this turn's check, with frames still to come

    records = {F0: _frames(0, 24), F1: _frames(1, 24)}
    agent, consumer, producer = _agent_on_fakes(monkeypatch, records, before_poll=swap_mid_stream, max_frames=48,
                                                model_reload=True)
    old_calibration = agent.calibration
    agent.models.loader = loader
    assert agent.run() == 0
    assert [m for m in producer.acked if m[0] == "dlq"] == []
    scores = [json.loads(value) for topic, _, value, _ in producer.acked if topic == "scores"]
    assert sorted((s["partition"], s["offset"]) for s in scores) == sorted((p, i) for p in (0, 1) for i in range(24))
    pairs = {"fake-model": old_calibration.calibration_id, "fake-model-2": new.calibration.calibration_id}
    by_partition = defaultdict(list)
    for s in sorted(scores, key=lambda s: (s["partition"], s["offset"])):
        assert s["calibration_id"] == pairs[s["model_id"]]
        assert (s["r_score"] > 5) == (s["model_id"] == "fake-model-2")  # the named model scored it
        by_partition[s["partition"]].append(s["model_id"])
    for ids in by_partition.values():
        switch = ids.index("fake-model-2")
        assert switch > 0 and set(ids[:switch]) == {"fake-model"} and set(ids[switch:]) == {"fake-model-2"}
    assert agent.scorer is new_scorer and count(agent.metrics, "loaded", "topic") == 1
    assert consumer.committed == {F0: 24, F1: 24}


def test_serve_flag_model_reload():
    import argparse

    from ama_stream.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert serve.build_overrides(parser.parse_args(["--model-reload"]))["model_reload"] is True
    assert "model_reload" not in serve.build_overrides(parser.parse_args([]))
