"""The scale benchmark's own bookkeeping on synthetic records (benchmarks/scale_bench.py): log parsing,
group stability, gap finding, lost/duplicate counting, the steady window. No broker, no timing."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_bench.py"


@pytest.fixture(scope="module")
def sb():
    """The script as a module; the sys.path entries it adds (the checkout, benchmarks/) are taken back."""
    path = sys.path[:]
    spec = importlib.util.spec_from_file_location("scale_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_bench"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("scale_bench", None)
        sys.modules.pop("agent_bench", None)
        sys.path[:] = path


def _line(ts: str, msg: str) -> str:
    return json.dumps({"ts": ts, "level": "INFO", "logger": "ama_stream.agent.delivery.commit", "msg": msg})


def test_group_events_are_read_from_the_agents_json_log(sb):
    lines = [
        _line("2026-12-03T10:00:00.100Z", "agent starting: {}"),
        _line("2026-12-03T10:00:03.250Z", "partitions assigned: frames-x[0], frames-x[1], frames-x[11]"),
        '{"ts": "2026-12-03T10:00:0',  # cut short while being written
        "Traceback (most recent call last):",
        _line("2026-12-03T10:00:09.000Z", "partitions revoked: frames-x[0], frames-x[1], frames-x[11]"),
        _line("2026-12-03T10:00:12.005Z", "partitions assigned: none"),
        _line("2026-12-03T10:00:20.000Z", "partitions lost (group membership expired): frames-x[3]; in-flight frames dropped"),
    ]
    events = sb.parse_group_events(lines, "a0")
    assert [(e.kind, sorted(e.partitions)) for e in events] == [
        ("assigned", [0, 1, 11]), ("revoked", [0, 1, 11]), ("assigned", []), ("lost", [3])]
    assert events[0].t_ms == sb.json_log_ms("2026-12-03T10:00:00.000Z") + 3250
    assert events[1].t_ms - events[0].t_ms == 5750


def test_the_group_is_stable_only_when_the_live_agents_hold_every_partition_once(sb):
    E = sb.GroupEvent
    a_all = E(100, "a", "assigned", frozenset(range(4)))
    a_half, b_half = E(300, "a", "assigned", frozenset({0, 1})), E(310, "b", "assigned", frozenset({2, 3}))
    assert sb.stable_assignment({"a": [a_all]}, ["a"], 4, 0) == (100, {0: "a", 1: "a", 2: "a", 3: "a"})
    assert sb.stable_assignment({"a": [a_all]}, ["a", "b"], 4, 0) is None  # b has not joined yet
    revoked = E(200, "a", "revoked", frozenset(range(4)))
    assert sb.stable_assignment({"a": [a_all, revoked], "b": [b_half]}, ["a", "b"], 4, 0) is None  # a mid-rebalance
    assert sb.stable_assignment({"a": [a_all, revoked, a_half], "b": [b_half]}, ["a", "b"], 4, 0) == (
        310, {0: "a", 1: "a", 2: "b", 3: "b"})
    assert sb.stable_assignment({"a": [a_all, revoked, a_half], "b": [b_half]}, ["a", "b"], 4, 305) is None  # before the event
    assert sb.stable_assignment({"a": [a_all], "b": [b_half]}, ["a", "b"], 4, 0) is None  # overlap: an old generation
    assert sb.stable_assignment({"a": [a_half]}, ["a"], 4, 0) is None  # partitions 2, 3 unowned (b died)


def test_the_longest_gap_is_charged_to_the_interval_in_which_it_ends(sb):
    times = [0, 0, 10, 20, 20, 30, 500, 510, 520]  # one batch's records share a time
    assert sb.longest_gap(times, 25, 600) == (30, 500)
    assert sb.longest_gap(times, 5, 25) == (0, 10)  # it began before the event and ended after it
    assert sb.longest_gap(times, 100, 200) is None  # still open at 200: it belongs to the interval it ends in
    assert sb.longest_gap(times, 100, 200, open_end=True) == (30, 200)  # unless this is the last interval
    assert sb.longest_gap(times, 515, 900) == (510, 520)
    assert sb.longest_gap(times, 515, 900, open_end=True) == (520, 900)  # nothing scored after 520
    assert sb.longest_gap([], 0, 50) is None and sb.longest_gap([], 0, 50, open_end=True) == (0, 50)
    assert sb.longest_gap(times, 50, 50) is None
    assert sb.gap_ms(times, 25, 600) == 470 and sb.gap_ms(times, 100, 200) == 0


def test_a_single_stalled_partition_is_found_even_when_others_keep_scoring(sb):
    R = sb.Rec
    recs = [R(t, 0, f"p0-{t}") for t in range(0, 1000, 10)] + [R(t, 1, f"p1-{t}") for t in (0, 10, 20, 900, 910)]
    assert sb.partition_stall(recs, 0, 1000) == (1, (20, 900))
    assert sb.partition_stall(recs, 0, 800) == (0, (0, 10))  # partition 1's stall ends after 800
    assert sb.partition_stall(recs, 0, 800, open_end=True) == (1, (20, 800))
    assert sb.gap_ms([r.scored_at for r in recs], 0, 1000) == 10


def test_lost_and_duplicated_frames_are_counted(sb):
    produced = ["f1", "f2", "f3", "f4"]
    scored = ["f1", "f2", "f2", "f2", "f4", "f4", "stray"]
    d = sb.delivery_counts(produced, scored)
    assert d["produced"] == 4 and d["scored_distinct"] == 3
    assert d["lost"] == 1 and d["lost_examples"] == ["f3"]
    assert d["duplicated_frames"] == 2 and d["duplicate_records"] == 3
    assert d["unexpected_records"] == 1


def test_duplicates_are_charged_to_the_interval_of_their_second_record(sb):
    R = sb.Rec
    recs = [R(50, 0, "a"), R(150, 0, "b"), R(160, 1, "a"), R(250, 1, "b"), R(260, 0, "b"), R(40, 0, "c"), R(45, 0, "c")]
    # 'c' repeats before the first event (not counted); 'a' again at 160 (interval 0), 'b' again at 250 and 260 (interval 1)
    assert sb.duplicates_by_interval(recs, [100, 200]) == [1, 2]


def test_the_steady_window_runs_while_every_agent_is_busy(sb):
    R = sb.Rec
    owner = {0: "a", 1: "a", 2: "b", 3: "b"}
    recs = [R(50, 0, "early")]  # before the group's final assignment at t0 = 100: not counted
    recs += [R(t, p, f"a{t}-{p}") for t in range(110, 2010, 100) for p in (0, 1)]  # a: 2 frames per batch, 110..1910
    recs += [R(t, p, f"b{t}-{p}") for t in range(300, 1400, 100) for p in (2, 3)]  # b: from 300 until dry at 1300
    w = sb.steady_window(recs, owner, 100)
    assert w["window_s"] == pytest.approx(1.0)  # (300, 1300]
    assert w["per_agent"]["a"]["frames"] == 20 and w["per_agent"]["b"]["frames"] == 20
    assert w["fps"] == pytest.approx(40.0) and w["per_agent"]["a"]["share"] == pytest.approx(0.5)
    assert w["per_agent"]["b"]["partitions"] == [2, 3] and not w["cut_by_rebalance"]
    cut = sb.steady_window(recs, owner, 100, t_cut=800)
    assert cut["window_s"] == pytest.approx(0.5) and cut["cut_by_rebalance"]
    assert sb.steady_window([R(t, 0, str(t)) for t in (110, 120)], owner, 100) is None  # b never scored


def test_the_projection_is_capped_by_partitions_and_the_broker(sb):
    assert sb.projection(1, 900, 8000, 12) == 900
    assert sb.projection(4, 900, 8000, 12) == 3600
    assert sb.projection(16, 900, 8000, 12) == 8000
    assert sb.projection(16, 100, 8000, 12) == 1200  # only 12 agents get a partition


def test_scores_and_frames_are_read_committed_as_downstream_consumers_must(sb, monkeypatch):
    """With --delivery exactly-once aborted transactions leave their records in the log: the score
    reader (and the relay, reading frames as the agent does) must skip them."""
    made = []

    class Recorder:
        def __init__(self, **config):
            made.append(config)

        def __getattr__(self, name):
            return lambda *a, **k: None

    class Stop(Exception):
        pass

    monkeypatch.setattr(sb, "KafkaConsumer", Recorder)
    sb.ScoreReader("k:9092", "scores")

    def stop_at_producer(*a, **k):
        raise Stop

    monkeypatch.setattr(sb, "make_producer", stop_at_producer)
    with pytest.raises(Stop):
        sb._relay_worker("k:9092", "frames", "scores", [0], 1, None, None)
    assert len(made) == 2 and all(c.get("isolation_level") == "read_committed" for c in made)
