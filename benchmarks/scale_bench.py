"""Scale-out figures (issue 12): 1, 2 and 4 `ama-stream serve` agents in one consumer group over a
12-partition frames topic on the embedded broker, and what a rebalance costs while agents join and leave.

    python benchmarks/scale_bench.py     # the full measurement: about 6-8 minutes on 2 quiet cores
    python benchmarks/scale_bench.py --frames 3000 --broker-frames 3000 --agents 1,4 --settle-s 4 \
        --min-window-s 1 --out /tmp/scale-smoke.jsonl   # smoke run of every phase: about 3 minutes; numbers meaningless

Every agent is a real `ama-stream serve` subprocess (this checkout's ama_stream) with one torch thread
(`torch_threads=1`, OMP/MKL threads 1; decoding is one worker thread in the agent anyway), so 4 of them
fit a 2-core machine. They then share those 2 cores with each other, the broker, and this script, so
the per-agent rate falls as agents are added: the measured numbers are what they are on this machine,
and the projection for N GPU agents below uses the per-agent rate measured with ONE agent and the
broker's own rate, not the 4-agent figures. Model: agent_bench.py's `small` model (nz 32, widths 16, the
demo's CPU model) with random weights and mu/sigma fitted on the frames (speed does not depend on
training; alerts are as rare as in real use). Frames: agent_bench.py's (Fashion-MNIST test images as
PNG, or random images without the datasets), spread evenly over the partitions (frame i to partition
i % P).

Phases (`--phases`, default all three):

1. broker: the embedded broker's own rate for the same frames, no model: one kafka-python producer
   publishing them; one consumer reading them back; and the pipeline an agent puts through the broker
   per frame (frame in, frame out, one score-sized JSON record in) with --broker-clients producer
   processes and as many "null agents" (consume a partition slice, publish a score-sized record per
   frame, acks=all like the agent) at once. The pipeline rate is r_broker of the formula. It is
   measured with Python clients on the broker's own cores, so it is a lower bound of what the broker
   takes from clients spread over other machines.
2. steady, for each agent count in --agents: --frames frames are published first, N agents start
   together, and once every agent holds its final share of the partitions (the "partitions assigned"
   lines of the agents' logs: the group is stable when the live agents' last assignments are disjoint
   and cover every partition) the window runs from the moment every agent has scored a batch to the
   moment the first agent's partitions run dry (or the next rebalance). Total frames/s and each agent's
   frames/s and share come from the score records' scored_at and partition (partition -> agent from that
   final assignment).
3. churn: frames are published continuously at --churn-rate while agents join one by one up to the
   largest of --agents, then one leaves by SIGTERM (graceful: finishes its batches, commits, leaves
   the group) and one is killed with SIGKILL (the group notices only after the session timeout); the
   rest drain what was published. Per event: the backlog (frames published, not yet scored) when it
   came, when the group was stable again, the pause (the longest time with no score record at all),
   the longest stall of a single partition, and the duplicate records scored in the interval after it
   (each gap is charged to the event in whose interval it ends; the next event comes --settle-s after
   the group is stable); at the end, lost frames (published and acknowledged, no score record after
   the survivors drained) and duplicated frames (more than one score record). Keep --churn-rate below
   what one agent scores: a backlog stalls partitions by itself (the consumer fetches a few at a time).
   Delivery is at-least-once: duplicates are expected after a kill -9 (the dead agent's frames scored
   but not committed are scored again by the next owner) and after any rebalance for frames polled
   but not yet committed when their partition was revoked; a lost frame is a bug.

Group timing: tansu answers a JoinGroup after about half the session timeout, and a member that
died is noticed only when its session expires, so --session-timeout-ms (and --heartbeat-interval-ms,
--max-poll-interval-ms: kafka-python sends the latter as the rebalance timeout) drive the rebalance
pause; every row records the values used.

Output: one JSON line per phase and agent count appended to benchmarks/results/scale.jsonl (with the
machine facts), progress on stderr, and markdown tables for docs/benchmarks.md ("Scale-out") on stdout.
"""
from __future__ import annotations

import argparse
import bisect
import calendar
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
# this checkout's ama_stream (not whichever one is installed), and agent_bench.py beside this file
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402
from kafka import KafkaConsumer  # noqa: E402
from kafka.structs import TopicPartition  # noqa: E402

from agent_bench import MODELS, calibrated_checkpoint, frames, raw_consume_fps  # noqa: E402
from ama_stream.kafka_tools.broker import EMBEDDED_CONSUMER, EmbeddedBroker  # noqa: E402
from ama_stream.kafka_tools.feed import frame_headers  # noqa: E402
from ama_stream.agent.frames import PNG  # noqa: E402
from ama_stream.agent.kafka_io import ensure_topics, make_producer  # noqa: E402
from ama_stream.agent.settings import KafkaSection  # noqa: E402


def now_ms() -> float:
    return time.time() * 1000  # the agents' scored_at is time.time() in ms too (same machine, same clock)


def log(msg: str) -> None:
    print(f"[scale_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- analysis (pure functions of records and log events; tests/test_scale_bench.py checks them) --------

@dataclass(frozen=True)
class Rec:
    """What the analysis needs of a score record."""

    scored_at: float  # ms
    partition: int
    frame_id: str


@dataclass(frozen=True)
class GroupEvent:
    """One 'partitions assigned/revoked/lost' line of an agent's log."""

    t_ms: float
    agent: str
    kind: str  # assigned | revoked | lost
    partitions: frozenset[int]


_GROUP_LINE = re.compile(r"^partitions (assigned|revoked|lost)[^:]*: (.*)$")


def parse_partitions(text: str) -> frozenset[int]:
    """'frames-x[0], frames-x[3]' -> {0, 3}; 'none' -> {} (the agent's commit.names format)."""
    return frozenset(int(p) for p in re.findall(r"\[(\d+)\]", text))


def json_log_ms(ts: str) -> float:
    """The agents' JSON log time ('2026-12-03T10:11:12.345Z', UTC) in ms since the epoch."""
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) * 1000.0 + int(ts[20:23])


def parse_group_events(lines: Iterable[str], agent: str) -> list[GroupEvent]:
    """The group events in an agent's `--log-json` log, in order."""
    out = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short while the agent is still writing it
        match = _GROUP_LINE.match(entry.get("msg", ""))
        if match:
            out.append(GroupEvent(json_log_ms(entry["ts"]), agent, match.group(1), parse_partitions(match.group(2))))
    return out


def stable_assignment(events: dict[str, list[GroupEvent]], live: Iterable[str], partitions: int,
                      since_ms: float) -> tuple[float, dict[int, str]] | None:
    """(time of the last assignment, partition -> agent) once every live agent's last group event is an
    assignment at or after `since_ms` and together they hold each of the partitions exactly once; else None."""
    owner: dict[int, str] = {}
    last = since_ms
    for agent in live:
        evs = events.get(agent) or []
        if not evs or evs[-1].kind != "assigned" or evs[-1].t_ms < since_ms:
            return None
        for p in evs[-1].partitions:
            if p in owner:
                return None
            owner[p] = agent
        last = max(last, evs[-1].t_ms)
    return (last, owner) if set(owner) == set(range(partitions)) else None


def first_event_after(events: dict[str, list[GroupEvent]], t_ms: float) -> float | None:
    times = [e.t_ms for evs in events.values() for e in evs if e.t_ms > t_ms]
    return min(times) if times else None


def longest_gap(times: Sequence[float], start: float, end: float, open_end: bool = False) -> tuple[float, float] | None:
    """The longest stretch without a record that ENDS in (start, end], as (from, to): between two
    consecutive record times (`from` may lie before `start`: a pause that began before the event and ended
    after it is the event's). A stretch still open at `end` belongs to the interval in which it ends, so it
    counts only with `open_end` (the last interval): then (last record at or before end, end). Times need not
    be sorted or distinct (records of one batch share a time). None when no stretch ends in the interval."""
    if end <= start:
        return None
    ts = sorted(set(times))
    i = bisect.bisect_right(ts, start)
    prev = ts[i - 1] if i > 0 else None
    best: tuple[float, float] | None = None
    for t in ts[i:]:
        if t > end:
            break
        if prev is not None and (best is None or t - prev > best[1] - best[0]):
            best = (prev, t)
        prev = t
    if open_end:
        last = start if prev is None else prev
        if last < end and (best is None or end - last > best[1] - best[0]):
            best = (last, end)
    return best


def gap_ms(times: Sequence[float], start: float, end: float, open_end: bool = False) -> float:
    g = longest_gap(times, start, end, open_end)
    return g[1] - g[0] if g else 0.0


def partition_stall(recs: Sequence[Rec], start: float, end: float,
                    open_end: bool = False) -> tuple[int | None, tuple[float, float] | None]:
    """(partition, (from, to)): the longest stretch in which one partition got no score record, as
    longest_gap() finds it for each partition in (start, end]."""
    by_part: dict[int, list[float]] = {}
    for r in recs:
        by_part.setdefault(r.partition, []).append(r.scored_at)
    worst: tuple[int | None, tuple[float, float] | None] = (None, None)
    for p, ts in sorted(by_part.items()):
        g = longest_gap(ts, start, end, open_end)
        if g and (worst[1] is None or g[1] - g[0] > worst[1][1] - worst[1][0]):
            worst = (p, g)
    return worst


def delivery_counts(produced: Iterable[str], scored: Iterable[str]) -> dict:
    """Lost (published, never scored) and duplicated (scored more than once) frames."""
    counts = Counter(scored)
    produced = set(produced)
    lost = sorted(produced - counts.keys())
    dups = {k: c for k, c in counts.items() if c > 1}
    return {
        "produced": len(produced),
        "scored_distinct": len(produced & counts.keys()),
        "lost": len(lost),
        "lost_examples": lost[:5],
        "duplicated_frames": len(dups),
        "duplicate_records": sum(c - 1 for c in dups.values()),
        "unexpected_records": sum(c for k, c in counts.items() if k not in produced),
    }


def duplicates_by_interval(recs: Sequence[Rec], starts: Sequence[float]) -> list[int]:
    """Repeated score records of a frame (every one after its first, by scored_at) counted in the
    interval [starts[i], starts[i+1]) their scored_at falls in; records before starts[0] are not counted."""
    out = [0] * len(starts)
    seen: set[str] = set()
    for r in sorted(recs, key=lambda r: r.scored_at):
        if r.frame_id in seen:
            i = bisect.bisect_right(starts, r.scored_at) - 1
            if i >= 0:
                out[i] += 1
        seen.add(r.frame_id)
    return out


def steady_window(recs: Sequence[Rec], owner: dict[int, str], t0: float, t_cut: float | None = None) -> dict | None:
    """Total and per-agent frames/s while every agent is busy: after `t0` (the group's final assignment)
    from the time every agent has scored a batch to the time the first agent's partitions ran dry (or
    `t_cut`, the next rebalance). Records of a batch share its scored_at, so the batch AT the window's
    start is left out and the ones up to its end are in (as agent_bench.py does for one agent)."""
    agents = sorted(set(owner.values()))
    times: dict[str, list[float]] = {a: [] for a in agents}
    for r in recs:
        if r.scored_at > t0 and r.partition in owner:
            times[owner[r.partition]].append(r.scored_at)
    if any(not ts for ts in times.values()):
        return None
    ta = max(min(ts) for ts in times.values())
    tb = min(max(ts) for ts in times.values())
    cut = t_cut is not None and t_cut < tb
    if cut:
        tb = t_cut
    if tb <= ta:
        return None
    window_s = (tb - ta) / 1000
    per = {a: sum(1 for t in ts if ta < t <= tb) for a, ts in times.items()}
    total = sum(per.values())
    return {
        "window_s": window_s,
        "cut_by_rebalance": cut,
        "frames_in_window": total,
        "fps": total / window_s,
        "per_agent": {a: {"partitions": sorted(p for p, o in owner.items() if o == a), "frames": per[a],
                          "fps": per[a] / window_s, "share": per[a] / total if total else 0.0} for a in agents},
    }


def projection(n: int, r_agent: float, r_broker: float, partitions: int) -> float:
    """Frames/s of n agents: each adds its own rate while it has a partition to read, up to what the broker carries."""
    return min(min(n, partitions) * r_agent, r_broker)


# -- the broker, the agents, the records -----------------------------------------------------------------

def topic_set(kafka: KafkaSection, tag: str, partitions: int) -> dict[str, str]:
    t = {"frames": f"frames-{tag}", "scores": f"scores-{tag}", "alerts": f"alerts-{tag}", "dlq": f"dlq-{tag}"}
    ensure_topics(kafka, {t["frames"]: partitions, t["scores"]: 1, t["alerts"]: 1, t["dlq"]: 1})
    return t


def publish_spread(producer, topic: str, values: Sequence[bytes], partitions: int, prefix: str,
                   start: int = 0, count: int | None = None) -> list[str]:
    """Frames start..start+count-1 (values cycled), frame i to partition i % partitions; returns their ids."""
    count = len(values) if count is None else count
    ids = []
    for i in range(start, start + count):
        fid, camera = f"{prefix}-{i:08d}", f"cam-{i % partitions}"
        producer.send(topic, key=camera.encode(), value=values[i % len(values)], partition=i % partitions,
                      headers=frame_headers(fid, camera, PNG, int(now_ms())))
        ids.append(fid)
    producer.flush()
    return ids


class ScoreReader(threading.Thread):
    """Reads a 1-partition scores topic from the beginning into `recs` until finish()."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True, name="score-reader")
        # read_committed, as downstream consumers must with --delivery exactly-once (aborted
        # transactions' records are skipped); the same as read_uncommitted at-least-once
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=5000,
                                      fetch_max_wait_ms=EMBEDDED_CONSUMER["fetch_max_wait_ms"],
                                      isolation_level="read_committed")
        self.tp = TopicPartition(topic, 0)
        self.consumer.assign([self.tp])
        self.consumer.seek_to_beginning(self.tp)
        self.recs: list[Rec] = []
        self.ids: set[str] = set()
        self._recs_lock = threading.Lock()
        self._end_offset: int | None = None
        self._finish_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                for records in self.consumer.poll(timeout_ms=200).values():
                    batch = [json.loads(r.value) for r in records]
                    with self._recs_lock:
                        for d in batch:
                            self.recs.append(Rec(float(d["scored_at"]), int(d["partition"]), d["frame_id"]))
                            self.ids.add(d["frame_id"])
                if self._finish_flag.is_set():
                    if self._end_offset is None:
                        self._end_offset = self.consumer.end_offsets([self.tp])[self.tp]
                    if self.consumer.position(self.tp) >= self._end_offset:
                        return
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
        finally:
            self.consumer.close()

    def distinct(self) -> int:
        with self._recs_lock:
            return len(self.ids)

    def covers(self, ids: set[str]) -> bool:
        with self._recs_lock:
            return ids <= self.ids

    def finish(self, timeout: float = 120) -> list[Rec]:
        """Reads up to the end offset as of now, stops, returns every record."""
        self._finish_flag.set()
        self.join(timeout)
        if self.error is not None:
            raise self.error
        with self._recs_lock:
            return list(self.recs)


@dataclass
class AgentProc:
    """`ama-stream serve` in a subprocess, logging JSON lines (its group events) to a file."""

    name: str
    cmd: list[str]
    log_path: Path
    started_ms: float = 0.0
    proc: subprocess.Popen | None = None
    _events: list[GroupEvent] = field(default_factory=list)

    def start(self) -> "AgentProc":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._log = open(self.log_path, "ab")
        self.started_ms = now_ms()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self) -> list[GroupEvent]:
        return parse_group_events(self.log_path.read_text(errors="replace").splitlines(), self.name)

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code; None (and the process killed) if it did not exit in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self._log.close()

    def tail(self, n: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


class Bench:
    def __init__(self, args, bootstrap: str, checkpoint: Path, work: Path):
        self.args, self.bootstrap, self.checkpoint, self.work = args, bootstrap, checkpoint, work
        self.kafka = KafkaSection(bootstrap_servers=bootstrap)
        self.consumer_settings = {"session_timeout_ms": args.session_timeout_ms,
                                  "heartbeat_interval_ms": args.heartbeat_interval_ms,
                                  "fetch_max_wait_ms": args.fetch_max_wait_ms}
        if args.max_poll_interval_ms is not None:
            self.consumer_settings["max_poll_interval_ms"] = args.max_poll_interval_ms
        self.agents: list[AgentProc] = []

    def agent(self, name: str, topics: dict[str, str], group: str) -> AgentProc:
        a = self.args
        cmd = [sys.executable, "-m", "ama_stream.cli", "--log-level", "INFO", "--log-json", "serve",
               "--bootstrap", self.bootstrap, "--checkpoint", str(self.checkpoint), "--frames-topic", topics["frames"],
               "--scores-topic", topics["scores"], "--alerts-topic", topics["alerts"], "--dlq-topic", topics["dlq"],
               "--group-id", group, "--device", a.device, "--max-batch", str(a.max_batch),
               "--max-wait-ms", str(a.max_wait_ms), "--metrics-port", "0", "--set", f"torch_threads={a.torch_threads}"]
        for key, value in self.consumer_settings.items():
            cmd += ["--set", f"consumer.{key}={value}"]
        # each agent its own id: under exactly-once it names the agent's transactional id, and agents
        # sharing one would fence each other
        cmd += ["--delivery", a.delivery, "--agent-id", name]
        for kv in a.agent_set:
            cmd += ["--set", kv]
        proc = AgentProc(name, cmd, self.work / f"{group}-{name}.log").start()
        self.agents.append(proc)
        return proc

    def group_events(self, agents: Sequence[AgentProc]) -> dict[str, list[GroupEvent]]:
        return {a.name: a.events() for a in agents}

    def wait_stable(self, agents: Sequence[AgentProc], live: Sequence[AgentProc], since_ms: float,
                    what: str) -> tuple[float, dict[int, str]]:
        deadline = time.monotonic() + self.args.join_timeout_s
        while time.monotonic() < deadline:
            for a in live:
                if not a.alive:
                    raise RuntimeError(f"agent {a.name} exited ({a.proc.returncode}) while waiting for {what}; "
                                       f"log {a.log_path}:\n{a.tail()}")
            stable = stable_assignment(self.group_events(agents), [a.name for a in live], self.args.partitions, since_ms)
            if stable:
                return stable
            time.sleep(0.2)
        raise RuntimeError(f"the group was not stable after {self.args.join_timeout_s:.0f} s ({what}); logs in {self.work}")

    def stop_all(self, agents: Sequence[AgentProc], timeout: float = 60) -> list[int | None]:
        for a in agents:
            a.signal(signal.SIGTERM)
        return [a.wait(timeout) for a in agents]

    def close(self) -> None:
        for a in self.agents:
            if a.alive:
                a.proc.kill()
                a.wait(10)


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def save_records(path: Path, recs: Sequence[Rec], events: Sequence[dict] = ()) -> None:
    """The score records (scored_at, partition, frame_id) and events of a phase, for a second look."""
    with open(path, "w") as f:
        f.write("scored_at_ms,partition,frame_id\n")
        f.writelines(f"{r.scored_at:.0f},{r.partition},{r.frame_id}\n" for r in recs)
    if events:
        path.with_suffix(".events.json").write_text(json.dumps(list(events), indent=1))


# -- phase 1: the broker's own rate ----------------------------------------------------------------------

SCORE_LIKE = {"schema": "ama-stream/score/v1", "camera_id": "cam-0", "r_score": 1234.5678901, "z": -0.12345678,
              "log_a": -1.2345678, "p_value": 0.901234567, "anomaly": False, "threshold": {"policy": "sigma", "k": 3.0},
              "model_id": "0123456789abcdef", "calibration_id": "0123456789abcdef", "captured_at": 1796303289001}


def _producer_worker(bootstrap: str, topic: str, values: list[bytes], parts: list[int], start: mp.Event,
                     out: mp.Queue) -> None:
    producer = make_producer(KafkaSection(bootstrap_servers=bootstrap), {"linger_ms": 5}, 10.0)
    out.put(("ready", None))
    start.wait()
    for i, value in enumerate(values):
        part = parts[i % len(parts)]
        producer.send(topic, key=f"cam-{part}".encode(), value=value, partition=part,
                      headers=frame_headers(f"b-{part}-{i}", f"cam-{part}", PNG, int(now_ms())))
    producer.flush()
    out.put(("produced", now_ms()))
    producer.close()


def _relay_worker(bootstrap: str, topic: str, scores: str, parts: list[int], n: int, start: mp.Event,
                  out: mp.Queue) -> None:
    """A null agent: reads its partitions and publishes one score-sized JSON record per frame (acks=all)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=64,
                             fetch_max_wait_ms=EMBEDDED_CONSUMER["fetch_max_wait_ms"],
                             isolation_level="read_committed")  # reads frames as the agent does
    tps = [TopicPartition(topic, p) for p in parts]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    producer = make_producer(KafkaSection(bootstrap_servers=bootstrap), {}, 10.0)  # the agent's producer settings
    out.put(("ready", None))
    start.wait()
    got = 0
    while got < n:
        for records in consumer.poll(timeout_ms=200).values():
            scored_at = int(now_ms())
            for r in records:
                value = json.dumps({**SCORE_LIKE, "frame_id": f"{r.partition}-{r.offset}", "topic": r.topic,
                                    "partition": r.partition, "offset": r.offset, "scored_at": scored_at}).encode()
                producer.send(scores, key=r.key, value=value)
            got += len(records)
    producer.flush()
    out.put(("relayed", now_ms()))
    producer.close()
    consumer.close()


def broker_phase(b: Bench, values: list[bytes]) -> dict:
    a = b.args
    n, P, k = a.broker_frames, a.partitions, a.broker_clients
    topics = topic_set(b.kafka, f"broker-{uuid.uuid4().hex[:6]}", P)
    producer = make_producer(b.kafka, {"linger_ms": 5}, 10.0)
    t0 = time.perf_counter()
    publish_spread(producer, topics["frames"], values, P, "b", count=n)
    produce_fps = n / (time.perf_counter() - t0)
    producer.close()
    log(f"broker: one producer {produce_fps:.0f} frames/s")
    consume_fps = raw_consume_fps(b.bootstrap, topics["frames"], P, n)
    log(f"broker: one consumer {consume_fps:.0f} frames/s")

    # the pipeline: k producers and k null agents at once, on a fresh topic
    topics = topic_set(b.kafka, f"pipe-{uuid.uuid4().hex[:6]}", P)
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    slices = [list(range(j, P, k)) for j in range(k)]
    per = [n * len(s) // P for s in slices]
    procs = []
    for j, parts in enumerate(slices):
        vals = [values[i % len(values)] for i in range(per[j])]
        procs.append(ctx.Process(target=_relay_worker, args=(b.bootstrap, topics["frames"], topics["scores"], parts,
                                                             per[j], start, out)))
        procs.append(ctx.Process(target=_producer_worker, args=(b.bootstrap, topics["frames"], vals, parts, start, out)))
    for p in procs:
        p.start()
    try:
        for _ in procs:
            kind, _t = out.get(timeout=120)
        t_start = now_ms()
        start.set()
        ends: dict[str, list[float]] = {"produced": [], "relayed": []}
        for _ in procs:
            kind, t = out.get(timeout=600)
            ends[kind].append(t)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    total = sum(per)
    pipeline_fps = total / ((max(ends["relayed"]) - t_start) / 1000)
    produce_under_load = total / ((max(ends["produced"]) - t_start) / 1000)
    log(f"broker: pipeline with {k} producers + {k} null agents {pipeline_fps:.0f} frames/s "
        f"(their producers {produce_under_load:.0f} frames/s)")
    return {"frames": n, "produce_fps_1_client": produce_fps, "consume_fps_1_client": consume_fps,
            "pipeline_clients": k, "pipeline_frames": total, "pipeline_fps": pipeline_fps,
            "pipeline_produce_fps": produce_under_load}


# -- phase 2: steady state with N agents -----------------------------------------------------------------

def steady_phase(b: Bench, values: list[bytes], n_agents: int) -> dict:
    a = b.args
    tag = f"s{n_agents}-{uuid.uuid4().hex[:6]}"
    topics = topic_set(b.kafka, tag, a.partitions)
    producer = make_producer(b.kafka, {"linger_ms": 5}, 10.0)
    ids = set(publish_spread(producer, topics["frames"], values, a.partitions, tag, count=a.frames))
    producer.close()
    reader = ScoreReader(b.bootstrap, topics["scores"])
    reader.start()
    group = f"scale-{tag}"
    load = [os.getloadavg()[0]]
    agents = [b.agent(f"a{i}", topics, group) for i in range(n_agents)]
    started = min(x.started_ms for x in agents)
    try:
        t0, owner = b.wait_stable(agents, agents, started, f"{n_agents} agents to join")
        log(f"steady {n_agents}: group stable {(t0 - started) / 1000:.1f} s after start; waiting for {len(ids)} frames")
        if not wait_until(lambda: reader.distinct() >= len(ids) and reader.covers(ids), a.drain_timeout_s + len(ids) / 50):
            raise RuntimeError(f"only {reader.distinct()} of {len(ids)} frames scored; logs in {b.work}")
        load.append(os.getloadavg()[0])
        cut = first_event_after(b.group_events(agents), t0)  # a rebalance after the stable assignment ends the window
        codes = b.stop_all(agents)
    finally:
        recs = reader.finish()
    save_records(b.work / f"{tag}-records.csv", recs)
    # revocations before the group reached its final assignment: the agents joined in more than one generation
    rebalances = sum(1 for evs in b.group_events(agents).values() for e in evs
                     if e.kind == "revoked" and e.partitions and e.t_ms < t0)
    w = steady_window(recs, owner, t0, cut)
    if w is None:
        raise RuntimeError(f"no steady window with {n_agents} agents (backlog too small for --frames {a.frames}?)")
    if w["window_s"] < a.min_window_s:
        log(f"WARNING: steady window with {n_agents} agents only {w['window_s']:.1f} s (< {a.min_window_s} s): "
            f"raise --frames")
    d = delivery_counts(ids, (r.frame_id for r in recs))
    per_agent = [w["per_agent"][x.name] for x in agents]
    log(f"steady {n_agents}: {w['fps']:.0f} frames/s over {w['window_s']:.1f} s; per agent "
        + ", ".join(f"{p['fps']:.0f} ({100 * p['share']:.0f}%)" for p in per_agent))
    return {"agents": n_agents, "fps": w["fps"], "window_s": w["window_s"], "frames_in_window": w["frames_in_window"],
            "per_agent_fps": [p["fps"] for p in per_agent], "per_agent_share": [p["share"] for p in per_agent],
            "per_agent_partitions": [p["partitions"] for p in per_agent], "stable_after_s": (t0 - started) / 1000,
            "revocations_while_joining": rebalances, "window_cut_by_rebalance": w["cut_by_rebalance"],
            "exit_codes": codes, "delivery": d, "load_average_1min": load}


# -- phase 3: agents joining and leaving mid-stream ------------------------------------------------------

class Feeder(threading.Thread):
    """Publishes frames at a steady rate until stopped; `acked` are the ids the broker acknowledged."""

    def __init__(self, kafka: KafkaSection, topic: str, values: list[bytes], partitions: int, rate: float, prefix: str):
        super().__init__(daemon=True, name="feeder")
        self.producer = make_producer(kafka, {"linger_ms": 5}, 10.0)
        self.topic, self.values, self.partitions, self.rate, self.prefix = topic, values, partitions, rate, prefix
        self.acked: set[str] = set()
        self.failed: list[str] = []
        self._halt = threading.Event()
        self.sent_ms: list[float] = []  # when each frame was handed to the producer
        self.stopped_ms: float | None = None

    def run(self) -> None:
        start = time.monotonic()
        i = 0
        while not self._halt.is_set():
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            fid, part = f"{self.prefix}-{i:08d}", i % self.partitions
            fut = self.producer.send(self.topic, key=f"cam-{part}".encode(), value=self.values[i % len(self.values)],
                                     partition=part, headers=frame_headers(fid, f"cam-{part}", PNG, int(now_ms())))
            fut.add_callback(lambda _md, fid=fid: self.acked.add(fid))
            fut.add_errback(lambda exc, fid=fid: self.failed.append(f"{fid}: {exc}"))
            self.sent_ms.append(now_ms())
            i += 1
        self.producer.flush()
        self.stopped_ms = now_ms()
        self.producer.close()

    def halt(self) -> None:
        self._halt.set()

    def stop(self) -> None:
        self.halt()
        self.join(60)


def churn_phase(b: Bench, values: list[bytes]) -> dict:
    a = b.args
    n_max = max(a.agent_counts)
    if n_max < 3:
        log(f"churn: only {n_max} agents: no kill -9 step (it needs 3: one leaves, one is killed, one drains)")
    tag = f"churn-{uuid.uuid4().hex[:6]}"
    topics = topic_set(b.kafka, tag, a.partitions)
    group = f"scale-{tag}"
    reader = ScoreReader(b.bootstrap, topics["scores"])
    reader.start()
    feeder = Feeder(b.kafka, topics["frames"], values, a.partitions, a.churn_rate, tag)
    feeder.start()
    events: list[dict] = []
    agents: list[AgentProc] = []
    live: list[AgentProc] = []
    load = [os.getloadavg()[0]]

    def settle_after(event: dict, what: str) -> None:
        t_stable, owner = b.wait_stable(agents, live, event["t_ms"], what)
        event["stable_after_s"] = (t_stable - event["t_ms"]) / 1000
        event["live"] = [x.name for x in live]
        log(f"churn: {event['event']}: group of {len(live)} stable after {event['stable_after_s']:.1f} s")
        time.sleep(a.settle_s)

    try:
        for i in range(n_max):
            t = now_ms()
            agent = b.agent(f"a{i}", topics, group)
            agents.append(agent)
            live.append(agent)
            events.append({"event": f"join {agent.name} ({len(live)} agents)", "kind": "join", "agent": agent.name, "t_ms": t})
            settle_after(events[-1], f"{agent.name} to join")
        load.append(os.getloadavg()[0])
        # one leaves gracefully, then one is killed (the ones that joined second and third, if there are that many)
        leaving = [live[1] if len(live) > 2 else live[-1], live[2] if len(live) > 2 else None]
        for agent, how in zip(leaving, ("SIGTERM", "SIGKILL")):
            if agent is None or len(live) < 2:
                continue
            t = now_ms()
            agent.signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
            live.remove(agent)
            events.append({"event": f"{how} {agent.name} ({len(live)} agents left)", "kind": how, "agent": agent.name,
                           "t_ms": t})
            if how == "SIGTERM":
                events[-1]["exit_code"] = agent.wait(60)
            settle_after(events[-1], f"the group after {how} {agent.name}")
        feeder.stop()
        load.append(os.getloadavg()[0])
        produced = set(feeder.acked)
        log(f"churn: {len(produced)} frames published; waiting for the {len(live)} remaining agents to drain")
        drained = wait_until(lambda: reader.covers(produced), a.drain_timeout_s)
        t_drained = now_ms()
        codes = b.stop_all(live)
    finally:
        feeder.halt()
        recs = reader.finish()
        for x in agents:
            if x.alive:
                x.proc.kill()
    d = delivery_counts(produced, (r.frame_id for r in recs))
    starts = [e["t_ms"] for e in events]
    ends = starts[1:] + [feeder.stopped_ms or t_drained]
    dups = duplicates_by_interval(recs, starts)
    times = [r.scored_at for r in recs]
    firsts: dict[str, float] = {}
    for r in recs:
        firsts[r.frame_id] = min(r.scored_at, firsts.get(r.frame_id, r.scored_at))
    first_scored = sorted(firsts.values())
    for i, (e, end, dup) in enumerate(zip(events, ends, dups)):
        # frames published (at the steady rate) and not yet scored when the event came: a backlog stalls
        # partitions by itself (the fetcher serves a few at a time), so a stall is read next to it
        published = bisect.bisect_right(feeder.sent_ms, e["t_ms"])
        e["backlog_frames"] = max(0, published - bisect.bisect_right(first_scored, e["t_ms"]))
        last = i == len(events) - 1  # its interval runs to the end of publishing: a pause still open there is its own
        g = longest_gap(times, e["t_ms"], end, open_end=last)
        part, stall = partition_stall(recs, e["t_ms"], end, open_end=last)
        e.update(pause_s=(g[1] - g[0]) / 1000 if g else 0.0,
                 pause_from_s=(g[0] - e["t_ms"]) / 1000 if g else None,
                 partition_stall_s=(stall[1] - stall[0]) / 1000 if stall else 0.0,
                 partition_stall_from_s=(stall[0] - e["t_ms"]) / 1000 if stall else None,
                 stalled_partition=part, duplicate_records=dup,
                 interval_s=(end - e["t_ms"]) / 1000)
    if events and times:  # before the first agent there was no record to pause: its start-up instead
        events[0]["first_record_after_s"] = (min(times) - events[0]["t_ms"]) / 1000
    save_records(b.work / f"{tag}-records.csv", recs, events)
    all_gaps = [y - x for x, y in zip(sorted(set(times)), sorted(set(times))[1:])]
    log(f"churn: lost {d['lost']}, duplicated frames {d['duplicated_frames']} ({d['duplicate_records']} extra records)")
    return {"agents_max": n_max, "rate_fps": a.churn_rate, "settle_s": a.settle_s, "events": events,
            "delivery": d, "drained": drained, "drain_s": (t_drained - (feeder.stopped_ms or t_drained)) / 1000,
            "send_failures": feeder.failed[:5], "send_failure_count": len(feeder.failed),
            "typical_gap_ms": statistics.median(all_gaps) if all_gaps else None,
            "exit_codes_at_end": codes, "load_average_1min": load}


# -- output ----------------------------------------------------------------------------------------------

def formula_text(r_agent: float | None, r_broker: float | None, partitions: int) -> str:
    ra = f"{r_agent:.0f}" if r_agent else "r_agent"
    rb = f"{r_broker:.0f}" if r_broker else "r_broker"
    lines = [
        f"X(N) ~= min(min(N, P) * r_agent, r_broker), P = {partitions} partitions",
        f"measured here: r_agent (1 CPU agent, 1 torch thread) = {ra} frames/s, "
        f"r_broker (embedded tansu, Python clients, same machine) = {rb} frames/s",
    ]
    if r_agent and r_broker:
        lines.append("CPU agents: " + ", ".join(f"X({n}) = {projection(n, r_agent, r_broker, partitions):.0f}"
                                                for n in (1, 2, 4, 8, 12)) + " frames/s, each agent on its own cores")
        lines.append(f"GPU agents: X(N) = min(min(N, {partitions}) * r_gpu, {rb}); the broker is the limit from "
                     f"N >= {rb} / r_gpu (r_gpu: one GPU agent's rate, agent_bench.py --device cuda:0; not measured here)")
    return "\n".join(lines)


def markdown(header: dict, broker: dict | None, steady: list[dict], churn: dict | None, partitions: int) -> str:
    out = [f"Measured {header['date']} on {header['machine']}, model `{header['model_name']}` ({header['device']}, "
           f"{header['torch_threads']} torch thread per agent), {header['frames_kind']}, {partitions}-partition frames "
           f"topic, max_batch {header['max_batch']}, max_wait_ms {header['max_wait_ms']}, broker: {header['broker']}, "
           f"consumer {json.dumps(header['consumer'])}, delivery {header['delivery_mode']}. "
           f"Command: `{header['command']}`"]
    if header["cpu_cores"] and header["cpu_cores"] < 8:
        out.append(f"\nOn this {header['cpu_cores']}-core machine the agents share {header['cpu_cores']} cores "
                   "(with the broker and the bench): the per-agent rate falls as agents are added. "
                   "The projection uses the 1-agent rate.")
    if broker:
        out.append("\n| broker, no model | frames/s |\n|---|---:|")
        out.append(f"| one producer (frames in) | {broker['produce_fps_1_client']:.0f} |")
        out.append(f"| one consumer (frames out) | {broker['consume_fps_1_client']:.0f} |")
        out.append(f"| pipeline: {broker['pipeline_clients']} producers + {broker['pipeline_clients']} null agents "
                   f"(frame in, frame out, score-sized record in) = r_broker | **{broker['pipeline_fps']:.0f}** |")
    if steady:
        base = steady[0]["fps"] / steady[0]["agents"]
        out.append("\n| agents | total frames/s | x 1 agent | per agent frames/s (share) | window s | group stable after s | load avg |")
        out.append("|---:|---:|---:|---|---:|---:|---|")
        for s in steady:
            per = ", ".join(f"{f:.0f} ({100 * sh:.0f}%)" for f, sh in zip(s["per_agent_fps"], s["per_agent_share"]))
            out.append(f"| {s['agents']} | **{s['fps']:.0f}** | {s['fps'] / base:.2f} | {per} | {s['window_s']:.1f} | "
                       f"{s['stable_after_s']:.1f} | {', '.join(f'{x:.1f}' for x in s['load_average_1min'])} |")
    if churn:
        d = churn["delivery"]
        out.append(f"\nJoin/leave at {churn['rate_fps']:.0f} frames/s published ({churn['settle_s']:.0f} s settling after "
                   f"each event; median gap between score batches {churn['typical_gap_ms'] or 0:.0f} ms):\n")
        out.append("| event | backlog at the event, frames | group stable after s | pause, no score record s | "
                   "longest partition stall s | duplicate records |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for e in churn["events"]:
            pause = (f"{e['pause_s']:.1f}" if "first_record_after_s" not in e else
                     f"start-up: first record after {e['first_record_after_s']:.1f}")
            out.append(f"| {e['event']} | {e['backlog_frames']} | {e.get('stable_after_s', float('nan')):.1f} | {pause} | "
                       f"{e['partition_stall_s']:.1f} | {e['duplicate_records']} |")
        out.append(f"\nPublished and acknowledged {d['produced']}, scored {d['scored_distinct']}: **lost {d['lost']}**, "
                   f"**duplicated {d['duplicated_frames']}** frames ({d['duplicate_records']} extra records); "
                   f"survivors drained in {churn['drain_s']:.1f} s{'' if churn['drained'] else ' (TIMED OUT)'}.")
    r_agent = steady[0]["fps"] / steady[0]["agents"] if steady and steady[0]["agents"] == 1 else None
    out.append("\n```\n" + formula_text(r_agent, broker["pipeline_fps"] if broker else None, partitions) + "\n```\n")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phases", default="broker,steady,churn", help="comma-separated: broker, steady, churn")
    p.add_argument("--agents", default="1,2,4", help="agent counts of the steady phase; the churn phase goes up to the largest")
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--frames", type=int, default=30000, help="frames pre-published for each agent count")
    p.add_argument("--broker-frames", type=int, default=30000, help="frames of the broker phase")
    p.add_argument("--broker-clients", type=int, default=2, help="producers and null agents of the broker pipeline")
    p.add_argument("--churn-rate", type=float, default=300.0, help="frames/s published during the join/leave phase")
    p.add_argument("--settle-s", type=float, default=10.0, help="seconds after each join/leave once the group is stable")
    p.add_argument("--drain-timeout-s", type=float, default=180.0)
    p.add_argument("--join-timeout-s", type=float, default=120.0)
    p.add_argument("--min-window-s", type=float, default=10.0, help="warn when a steady window is shorter")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=int, default=20)
    p.add_argument("--torch-threads", type=int, default=1, help="each agent's torch_threads")
    p.add_argument("--session-timeout-ms", type=int, default=EMBEDDED_CONSUMER["session_timeout_ms"])
    p.add_argument("--heartbeat-interval-ms", type=int, default=EMBEDDED_CONSUMER["heartbeat_interval_ms"])
    p.add_argument("--max-poll-interval-ms", type=int, default=None,
                   help="also kafka-python's rebalance timeout (default: kafka-python's 300000)")
    p.add_argument("--fetch-max-wait-ms", type=int, default=EMBEDDED_CONSUMER["fetch_max_wait_ms"])
    p.add_argument("--delivery", choices=["at-least-once", "exactly-once"], default="at-least-once",
                   help="the agents' delivery mode (on tansu, exactly-once duplicates are aborted records it does "
                        "not filter: see docs/operations.md)")
    p.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE", help="more agent settings (--set)")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bootstrap", help="an external broker instead of the embedded one")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.jsonl")
    args = p.parse_args()
    args.agent_counts = [int(x) for x in args.agents.split(",") if x.strip()]
    phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    if phases - {"broker", "steady", "churn"}:
        p.error(f"unknown phases: {sorted(phases - {'broker', 'steady', 'churn'})}")
    delivery = args.delivery

    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    log(f"work dir (agent logs, broker log): {work}")
    values, frames_kind = frames(max(args.frames, args.broker_frames, 10000) if phases & {"steady", "broker"} else 10000)
    checkpoint = work / "model.pt"
    calibrated_checkpoint(MODELS[args.model], values, args.device, checkpoint)
    broker = None if args.bootstrap else EmbeddedBroker(log_file=work / "broker.log").start()
    bootstrap = args.bootstrap or broker.bootstrap
    bench = Bench(args, bootstrap, checkpoint, work)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:4]
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    header = {
        "run_id": run_id,
        "date": time.strftime("%Y-%m-%d"),
        "machine": gpu or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "cpu_cores": os.cpu_count(),
        "device": args.device,
        "model_name": args.model,
        "model": json.dumps(MODELS[args.model].to_dict()),
        "frames_kind": frames_kind,
        "partitions": args.partitions,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "torch_threads": args.torch_threads,
        "consumer": {**bench.consumer_settings, "max_poll_interval_ms": args.max_poll_interval_ms or 300000},
        "delivery_mode": delivery,
        "broker": "external " + args.bootstrap if args.bootstrap else "embedded tansu (same machine)",
        "torch": torch.__version__,
        "command": "python benchmarks/scale_bench.py " + " ".join(sys.argv[1:]),
    }
    rows: list[dict] = []
    broker_row, steady_rows, churn_row = None, [], None
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        if "broker" in phases:
            broker_row = broker_phase(bench, values)
            emit({**header, "phase": "broker", **broker_row})
        if "steady" in phases:
            for n in args.agent_counts:
                steady_rows.append(steady_phase(bench, values, n))
                emit({**header, "phase": "steady", **steady_rows[-1]})
        if "churn" in phases:
            churn_row = churn_phase(bench, values)
            emit({**header, "phase": "churn", **churn_row})
    finally:
        bench.close()
        if broker is not None:
            broker.stop()
    log(f"{len(rows)} rows appended to {args.out}")
    print(markdown(header, broker_row, steady_rows, churn_row, args.partitions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
