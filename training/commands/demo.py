"""`ama-stream demo`: the whole product in one command, on an embedded broker.

1. data: Fashion-MNIST as normal and MNIST digits as anomalies when the shared datasets are found
   (`--data-root`, AMA_DATA_ROOT, ../shared/datasets); otherwise generated "parts on a conveyor"
   (a bright disc; anomalies carry a scratch, a hole or a chipped edge);
2. model: a small AMA trained on the normal images (cached, so later runs start at once);
3. calibration: known-normal images the stream does not contain give mu/sigma and the two-sided
   threshold for a 1% false-alarm rate (as `ama-stream calibrate` does; docs/operations.md);
4. the embedded tansu broker, the scoring agent in this process, and a camera feed streaming
   normal frames with injected anomalies;
5. live progress on stderr, then a summary on stdout: frames scored, throughput, alert precision
   and recall against the injected truth, end-to-end latency p50/p99.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("ama_stream.demo")

CAMERAS = ("line1-cam0", "line1-cam1", "line2-cam0", "line2-cam1")
CALIBRATION_FRAMES = 3000
CALIBRATION_FPR = 0.01  # a 1% target is well resolved by 3000 scores; the product default (0.1%) needs ~10,000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=2000, help="frames to stream (default 2000)")
    p.add_argument("--rate", type=float, default=100.0, help="frames per second from the cameras (default 100)")
    p.add_argument("--anomaly-fraction", type=float, default=0.1, help="share of injected anomalies (default 0.1)")
    p.add_argument("--steps", type=int, default=150, help="training steps of the demo model (default 150)")
    p.add_argument("--synthetic", action="store_true", help="use generated images even when real datasets exist")
    p.add_argument("--data-root", help="where the datasets are (default: AMA_DATA_ROOT, ../shared/datasets)")
    p.add_argument("--cache-dir", help="model and data cache (default: $AMA_CACHE_DIR or ~/.cache/ama-stream/demo)")
    p.add_argument("--retrain", action="store_true", help="train a fresh model even if one is cached")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--view-port", type=int, default=0,
                   help="port of the live alert page on 127.0.0.1 (default 0: any free port; -1: no page)")


# --------------------------------------------------------------------------- data


def synthetic_parts(n: int, rng: np.random.Generator, defective: bool) -> np.ndarray:
    """n images [28, 28] uint8 of a bright disc on a dark belt; defective ones carry one defect."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        cy, cx = 14 + rng.uniform(-1.5, 1.5, size=2)
        radius = rng.uniform(8.0, 10.0)
        dist = np.hypot(yy - cy, xx - cx)
        part = 1.0 / (1.0 + np.exp((dist - radius) * 2.0))  # soft edge
        img = part * rng.uniform(170, 220) + 20 + rng.normal(0, 6, (28, 28))
        if defective:
            kind = rng.integers(3)
            if kind == 0:  # scratch: a dark line through the part
                angle = rng.uniform(0, np.pi)
                offset = rng.uniform(-4, 4)
                line = np.abs((xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle) - offset) < 1.0
                img[line & (dist < radius)] = 30
            elif kind == 1:  # hole
                hy, hx = cy + rng.uniform(-4, 4), cx + rng.uniform(-4, 4)
                img[np.hypot(yy - hy, xx - hx) < rng.uniform(2.5, 3.5)] = 25
            else:  # chipped edge: a wedge of the rim missing
                angle = rng.uniform(-np.pi, np.pi)
                theta = np.arctan2(yy - cy, xx - cx)
                wedge = (np.abs(np.angle(np.exp(1j * (theta - angle)))) < 0.6) & (dist > radius * 0.45)
                img[wedge] = 20 + rng.normal(0, 6, int(wedge.sum()))
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class DemoData:
    kind: str  # "fashion-mnist vs mnist" or "synthetic parts"
    train: dict  # the `data:` block of the training config
    normal_stream: str  # FORMAT:ROOT of the normal frames streamed
    anomaly_stream: str
    split: str | None  # split of the streamed sources
    calibration: str  # FORMAT:ROOT of known-normal images for the calibration (not streamed)
    calibration_split: str | None
    data_root: str | None


def demo_data(args: argparse.Namespace, cache: Path) -> DemoData:
    from ama_stream.sources import resolve_data_root

    root = resolve_data_root(args.data_root)
    if not args.synthetic and (root / "fashion-mnist").is_dir() and (root / "mnist").is_dir():
        train = {"protocol": "cross", "normal": {"format": "idx", "root": str(root / "fashion-mnist")},
                 "anomaly": {"format": "idx", "root": str(root / "mnist")}, "image_size": 32, "channels": 1,
                 "limit_train": 6000, "limit_test": 1000, "val_fraction": 0}
        # The stream is the test split; the calibration uses training-split images (about 10% of
        # them are among the 6000 the model trained on, which hardly moves the statistics).
        return DemoData("Fashion-MNIST (normal) vs MNIST digits (anomalies)", train,
                        f"idx:{root / 'fashion-mnist'}", f"idx:{root / 'mnist'}", "test",
                        f"idx:{root / 'fashion-mnist'}", "train", None)
    folder = cache / "synthetic"
    files = {name: folder / f"{name}.npz" for name in ("normal", "stream-normal", "stream-anomaly", "calibration")}
    if not all(f.is_file() for f in files.values()):
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1234)
        for name, n, defective in (("normal", 8000, False), ("stream-normal", 4000, False),
                                   ("stream-anomaly", 1000, True), ("calibration", CALIBRATION_FRAMES, False)):
            tmp = folder / f".{name}.tmp.npz"
            np.savez(tmp, images=synthetic_parts(n, rng, defective))
            tmp.replace(files[name])
    train = {"protocol": "industrial", "normal": {"format": "npz", "root": str(files["normal"])},
             "anomaly": {"format": "npz", "root": str(files["stream-anomaly"])}, "image_size": 32, "channels": 1,
             "limit_test": 1000, "val_fraction": 0}
    return DemoData("synthetic parts (anomalies: scratches, holes, chipped edges)", train,
                    f"npz:{files['stream-normal']}", f"npz:{files['stream-anomaly']}", None,
                    f"npz:{files['calibration']}", None, None)


# --------------------------------------------------------------------------- model


def train_overrides(data: DemoData, steps: int, device: str, seed: int) -> dict:
    """A CPU-sized AMA: narrow networks, spectral norm without gradient penalty, one critic step."""
    return {
        "data": data.train,
        "model": {"nz": 32, "enc_width": 16, "gen_width": 16, "disc_width": 16},
        "loss": {"gradient_penalty": {"enabled": False}, "negatives": {"enabled": False}},
        "optim": {"d_steps": 1},
        "train": {"epochs": 1000, "batch_size": 64, "max_steps": steps, "log_every": 25, "fit_max_images": 3000},
        "device": device,
        "seed": seed,
    }


def demo_model(args: argparse.Namespace, cache: Path, data: DemoData):
    """The cached demo model for these data and settings, trained first if needed."""
    from ama_stream.checkpoint import CheckpointError, load_checkpoint
    from ama_stream.settings import load_settings
    from training.config import TrainConfig
    from training.trainer import train

    overrides = train_overrides(data, args.steps, "cpu" if args.device == "auto" else args.device, args.seed)
    path = demo_model_path(args, cache, data)  # where training writes it, beside its report.html
    if path.is_file() and not args.retrain:
        try:
            ckpt = load_checkpoint(path)
            print(f"using the cached demo model {path}", file=sys.stderr)
            return ckpt
        except CheckpointError as exc:
            print(f"cached model unusable ({exc}); training a new one", file=sys.stderr)
    cfg = load_settings(TrainConfig, None, overrides)
    print(f"training a small AMA on {data.kind} for {args.steps} steps (cached afterwards in {cache})...",
          file=sys.stderr)
    t0 = time.monotonic()
    ckpt = train(cfg, out_dir=path.parent)
    auroc = ckpt.metrics.get("auroc_a")
    print(f"trained in {time.monotonic() - t0:.0f} s" + (f"; held-out AUROC (A-score) {auroc:.3f}" if auroc else ""),
          file=sys.stderr)
    return ckpt


def demo_model_path(args: argparse.Namespace, cache: Path, data: DemoData) -> Path:
    overrides = train_overrides(data, args.steps, "cpu" if args.device == "auto" else args.device, args.seed)
    return cache / f"run-{hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:12]}" / "model.pt"


def demo_calibration(ckpt, data: DemoData, cache: Path, device: str, seed: int) -> Path:
    """The calibration file the agent runs with, fitted as `ama-stream calibrate` does."""
    from ama_stream.calibration import CalibrationFitter, Policy
    from ama_stream.commands.calibrate import score_frames
    from ama_stream.scoring import Scorer
    from ama_stream.sources import iter_images, parse_source

    path = cache / f"calibration-{ckpt.model_id}.json"
    items = iter_images(parse_source(data.calibration).with_split(data.calibration_split), data.data_root, seed=seed)
    fitter = CalibrationFitter(seed=seed)
    score_frames(Scorer(ckpt, device), ((image, None) for _id, image, _label in items), fitter,
                 limit=CALIBRATION_FRAMES)
    source = {"spec": data.calibration, "limit": CALIBRATION_FRAMES}
    if data.calibration_split:
        source["split"] = data.calibration_split
    calibration, _notes = fitter.finish(ckpt.model_id, Policy.make("two-sided", CALIBRATION_FPR), source)
    calibration.save(path)
    print(calibration.summary(), file=sys.stderr)
    return path


# --------------------------------------------------------------------------- streaming


@dataclass
class ScoreLog:
    """Score records read back from the scores topic, with the time each arrived."""

    records: dict[str, dict] = field(default_factory=dict)  # frame id -> first record
    latency_ms: list[float] = field(default_factory=list)  # arrival - captured-at
    duplicates: int = 0
    last_arrival: float = 0.0


def collect_scores(bootstrap: str, topic: str, out: ScoreLog, stop: threading.Event) -> None:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    from ama_stream.kafka_tools.broker import EMBEDDED_CONSUMER

    # read_committed, as every consumer of the scores/alerts topics should: with `delivery: exactly-once`
    # it skips the records of aborted transactions (on a broker that implements that; docs/operations.md)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             fetch_max_wait_ms=EMBEDDED_CONSUMER["fetch_max_wait_ms"],
                             isolation_level="read_committed")
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=200).values():
                now_ms = time.time() * 1000
                for rec in records:
                    score = json.loads(rec.value)
                    if score["frame_id"] in out.records:
                        out.duplicates += 1
                        continue
                    out.records[score["frame_id"]] = score
                    if score["captured_at"] is not None:
                        out.latency_ms.append(now_ms - score["captured_at"])
                out.last_arrival = time.monotonic()
    finally:
        consumer.close()


def progress(agent, scores: ScoreLog, produced: list, total: int, stop: threading.Event) -> None:
    tty = sys.stderr.isatty()
    start = time.monotonic()
    while not stop.wait(1.0 if tty else 3.0):
        elapsed = time.monotonic() - start
        line = (f"[{elapsed:5.1f} s] sent {len(produced)}/{total}  scored {len(scores.records)}  "
                f"alerts {agent.stats.alerts}  dead-lettered {agent.stats.dead_lettered}")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)


def summarize(truth: list[tuple[str, int, str]], scores: ScoreLog, seconds: float) -> dict:
    labels = {frame_id: bool(anomaly) for frame_id, anomaly, _ in truth}
    scored = [fid for fid in labels if fid in scores.records]
    alerted = {fid for fid in scored if scores.records[fid]["anomaly"]}
    positives = {fid for fid in scored if labels[fid]}
    tp = len(alerted & positives)
    lat = np.array(scores.latency_ms) if scores.latency_ms else np.zeros(1)
    return {
        "frames_sent": len(truth),
        "frames_scored": len(scored),
        "anomalies_injected": len(positives),
        "alerts": len(alerted),
        "precision": tp / len(alerted) if alerted else float("nan"),
        "recall": tp / len(positives) if positives else float("nan"),
        "false_alarm_rate": len(alerted - positives) / max(1, len(scored) - len(positives)),
        "throughput_fps": len(scored) / seconds if seconds > 0 else 0.0,
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "duplicates": scores.duplicates,
        "seconds": seconds,
    }


def stream(args: argparse.Namespace, ckpt, data: DemoData, cache: Path, calibration: Path,
           finish: Callable[[dict], None]) -> dict:
    """Streams the frames through the agent on an embedded broker; `finish(summary)` runs while the
    broker (and the alert page) are still up."""
    from ama_stream.kafka_tools.broker import EMBEDDED_CONSUMER, EmbeddedBroker
    from ama_stream.kafka_tools.feed import mixed_items, publish_items, truth_row
    from ama_stream.agent.kafka_io import ensure_topics, make_producer
    from ama_stream.agent.runner import Agent
    from ama_stream.agent.settings import AgentSettings, KafkaSection
    from ama_stream.scoring import Scorer
    from ama_stream.settings import load_settings
    from ama_stream.sources import iter_images, parse_source

    with EmbeddedBroker(log_file=cache / "broker.log") as broker:
        print(f"embedded Kafka broker (tansu) on {broker.bootstrap}: in memory, for trials only "
              "(a restart loses its topics and reuses offsets)", file=sys.stderr)
        kafka = KafkaSection(bootstrap_servers=broker.bootstrap)
        ensure_topics(kafka, {"frames": 4, "scores": 1, "alerts": 1, "frames-dlq": 1, "maps": 1})
        settings = load_settings(AgentSettings, None, {
            "kafka": {"bootstrap_servers": broker.bootstrap}, "device": args.device, "consumer": EMBEDDED_CONSUMER,
            "topics": {"maps": "maps"},
            "metrics": {"port": 0}, "max_frames": args.frames, "group_id": "demo", "calibration": str(calibration),
            # the injected anomaly share is far above any false-alarm rate, so the drift monitor
            # would rightly warn on every camera; the demo shows detection, not drift
            "drift": {"enabled": False},
        })
        agent = Agent(settings, scorer=Scorer(ckpt, args.device))
        agent_thread = threading.Thread(target=agent.run, name="agent", daemon=True)
        agent_thread.start()
        # Stream once the agent holds the partitions, so the numbers show scoring, not the group join.
        deadline = time.monotonic() + 60
        while not agent.consumer or not agent.consumer.assignment():
            if time.monotonic() > deadline or not agent_thread.is_alive():
                raise RuntimeError("the agent did not join its consumer group within 60 s")
            time.sleep(0.05)
        print(f"agent ready (model {ckpt.model_id}, metrics on http://127.0.0.1:{agent.metrics_port}/metrics); "
              f"streaming {args.frames} frames at {args.rate:.0f}/s from {len(CAMERAS)} cameras", file=sys.stderr)
        page = None
        if args.view_port >= 0:
            from ama_stream.view import AlertPage

            page = AlertPage(kafka, "alerts", "maps", metrics_url=f"http://127.0.0.1:{agent.metrics_port}",
                             port=args.view_port).start()
            print(f"alert page: {page.url} (the alerts with their frames and anomaly maps)", file=sys.stderr)

        scores, stop = ScoreLog(), threading.Event()
        collector = threading.Thread(target=collect_scores, args=(broker.bootstrap, "scores", scores, stop), daemon=True)
        collector.start()
        truth: list[tuple[str, int, str]] = []
        ticker = threading.Thread(target=progress, args=(agent, scores, truth, args.frames, stop), daemon=True)
        ticker.start()
        normal = iter_images(parse_source(data.normal_stream).with_split(data.split), data.data_root, seed=args.seed)
        anomalies = iter_images(parse_source(data.anomaly_stream).with_split(data.split), data.data_root, seed=args.seed)
        items = mixed_items(normal, anomalies, args.anomaly_fraction, limit=args.frames, seed=args.seed, prefix="demo")
        producer = make_producer(kafka, {}, 10.0)
        started = time.monotonic()
        try:
            publish_items(producer, "frames", items, content_type="image/png", cameras=CAMERAS, rate=args.rate,
                          on_sent=lambda item: truth.append(truth_row(item)))
        finally:
            producer.close(timeout=10)
        agent_thread.join(timeout=300)
        deadline = time.monotonic() + 30
        while len(scores.records) < agent.stats.scored and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        collector.join(10)
        ticker.join(5)
        if agent_thread.is_alive():
            agent.stop()
            agent_thread.join(30)
        summary = summarize(truth, scores, max(scores.last_arrival - started, 1e-9))
        summary["dead_lettered"] = agent.stats.dead_lettered
        summary["bootstrap"] = broker.bootstrap
        summary["page"] = page.url if page else None
        try:
            finish(summary)
        finally:
            if page is not None:
                page.close()
        return summary


def librdkafka_version(env: dict | None = None) -> tuple[int, ...] | None:
    """The librdkafka version the `kcat` on PATH runs with (None: no kcat, or it did not say)."""
    import re
    import shutil
    import subprocess

    if shutil.which("kcat") is None:
        return None
    try:
        out = subprocess.run(["kcat", "-V"], capture_output=True, text=True, timeout=10, env=env).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(v) for v in found.groups()) if found else None


def bundled_librdkafka() -> Path | None:
    """confluent-kafka's wheel ships its own librdkafka (a current one); None where it is not installed."""
    try:
        import confluent_kafka
    except ImportError:
        return None
    libs = Path(confluent_kafka.__file__).resolve().parent.parent / "confluent_kafka.libs"
    return next(iter(sorted(libs.glob("librdkafka*.so*"))), None)


def reader_command(bootstrap: str, topic: str) -> str:
    """A command that reads `topic` with a non-Python client (kcat). The embedded broker needs
    librdkafka >= 2.2 (an older one misreads its ApiVersion reply); where the kcat on PATH links an
    older one (Debian 12's kcat: 2.0.2) and confluent-kafka's wheel is installed, kcat is started on
    the wheel's librdkafka instead (LD_PRELOAD)."""
    command = f"kcat -b {bootstrap} -C -t {topic} -e -q"
    version = librdkafka_version()
    if version is None or version >= (2, 2, 0):
        return command
    bundled = bundled_librdkafka()
    return f"LD_PRELOAD={bundled} {command}" if bundled else command


def print_summary(summary: dict, data: DemoData, ckpt, calibration: Path, model_path: Path) -> None:
    print("\nama-stream demo summary")
    print(f"  data               {data.kind}")
    print(f"  model              {ckpt.model_id}: {model_path}")
    print(f"  training report    {model_path.parent / 'report.html'}")
    print(f"  calibration        {calibration} (two-sided, target false-alarm rate {CALIBRATION_FPR:g})")
    print(f"  frames scored      {summary['frames_scored']} of {summary['frames_sent']} sent "
          f"({summary['dead_lettered']} dead-lettered, {summary['duplicates']} duplicates)")
    print(f"  throughput         {summary['throughput_fps']:.0f} frames/s over {summary['seconds']:.1f} s")
    print(f"  alerts             {summary['alerts']} for {summary['anomalies_injected']} injected anomalies")
    print(f"  precision          {summary['precision']:.3f}")
    print(f"  recall             {summary['recall']:.3f}")
    print(f"  false-alarm rate   {summary['false_alarm_rate']:.4f} of normal frames")
    print(f"  latency p50 / p99  {summary['latency_p50_ms']:.0f} ms / {summary['latency_p99_ms']:.0f} ms "
          "(camera timestamp to score record received)")
    if summary.get("page"):
        print(f"  alert page         {summary['page']}")
    print("  read the alerts with any Kafka client (librdkafka >= 2.2, Java, kafka-python), e.g. kcat:\n"
          f"    {reader_command(summary['bootstrap'], 'alerts')}")


def _cache_dir(args: argparse.Namespace) -> Path:
    base = args.cache_dir or os.environ.get("AMA_CACHE_DIR")
    path = Path(base) if base else Path.home() / ".cache" / "ama-stream" / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(args: argparse.Namespace) -> int:
    if args.frames < 1 or args.rate <= 0 or not 0 < args.anomaly_fraction < 1 or args.steps < 1:
        raise ValueError("--frames and --steps must be >= 1, --rate > 0 and --anomaly-fraction in (0, 1)")
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("ama_stream.agent").setLevel(logging.WARNING)  # the demo prints its own progress
    cache = _cache_dir(args)
    data = demo_data(args, cache)
    ckpt = demo_model(args, cache, data)
    calibration = demo_calibration(ckpt, data, cache, args.device, args.seed)
    def finish(summary: dict) -> None:
        print_summary(summary, data, ckpt, calibration, demo_model_path(args, cache, data))
        if summary.get("page") and sys.stdin.isatty():  # someone is watching: keep the page and broker up
            print("\nthe alert page and the broker stay up until Ctrl-C", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass

    summary = stream(args, ckpt, data, cache, calibration, finish)
    return 0 if summary["frames_scored"] == summary["frames_sent"] else 1
