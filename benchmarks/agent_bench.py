"""Throughput and latency of `ama-stream serve` end to end, next to its two ceilings, in one run.

    python benchmarks/agent_bench.py                      # CPU, the small CPU model, about 2-3 minutes
    python benchmarks/agent_bench.py --model paper --device cuda:0 --frames 200000 --max-batch 1024

One broker (embedded tansu unless --bootstrap), one frame set (Fashion-MNIST test images as PNG,
or random images without the datasets), one checkpoint (random weights: speed does not depend on
training; its mu/sigma are fitted on the frames so that alerts are as rare as in real use).
Measured, in this order:

1. raw consume: kafka-python reading the frames topic with no processing (frames/s);
2. bare Scorer: Scorer.prepare + Scorer.score_tiles on the same frames, decoded beforehand, in
   batches of --max-batch (frames/s; the model-only rate is reported too), with the agent's torch
   thread count and with all cores (the better one counts), measured before and after the agent
   run, since other load on a shared machine moves both;
3. agent throughput: `ama-stream serve` as a subprocess drains the pre-published frames; frames/s
   from the records' scored_at times (the group join is not counted);
4. latency at half load: frames published at half the measured agent throughput with a fresh
   captured-at each; p50/p99 of (score record received - captured-at).

Ratios: agent / bare Scorer at the agent's own torch thread count (issue 11's target >= 0.6 on CPU; the
agent keeps a core for decoding and Kafka), agent / bare Scorer at its best thread count, and agent / raw
consume (the agent's overhead).
Results: benchmarks/results/agent_bench_<device>.json, and the block between
<!-- agent_bench:<device>:begin --> and <!-- agent_bench:<device>:end --> in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaConsumer
from kafka.structs import TopicPartition
from PIL import Image

from ama_stream.kafka_tools.broker import EMBEDDED_CONSUMER, EmbeddedBroker
from ama_stream.kafka_tools.feed import frame_headers
from ama_stream.agent.frames import JPEG, PNG, FrameLimits, decode_frame, encode_frame
from ama_stream.agent.kafka_io import ensure_topics, make_producer
from ama_stream.agent.settings import KafkaSection
from ama_stream.checkpoint import Checkpoint, save_checkpoint
from ama_stream.model import AMA, ModelConfig
from ama_stream.preprocess import PreprocessSpec
from ama_stream.scoring import Scorer
from ama_stream.sources import iter_images, parse_source, resolve_data_root

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    # the demo's CPU model and the paper's 32x32 networks
    "small": ModelConfig(image_size=32, channels=1, nz=32, enc_width=16, gen_width=16, disc_width=16),
    "paper": ModelConfig(image_size=32, channels=1, nz=128, enc_width=64, gen_width=256, disc_width=128),
    # configs/own_data.yaml's patch model: 32x32 colour patches
    "patch": ModelConfig(image_size=32, channels=3, nz=64, enc_width=32, gen_width=32, disc_width=32),
}
# the patch model tiles each frame at its working scale: configs/own_data.yaml's `scale: auto` on the
# 1130x460 ball-screw photos (short side to 128 px: 0.278, 133 patches per frame)
PATCH_SPEC = PreprocessSpec(32, 3, patch_stride=16, scale=0.278)


def frames(n: int, source: str | None = None) -> tuple[list[bytes], str]:
    """n frames: the images of `source` as JPEG (camera frames at their native size), else
    Fashion-MNIST test images as PNG (repeated if needed), else random 28x28 images."""
    root = resolve_data_root()
    if source:
        images = [img for _, img, _ in iter_images(parse_source(source), root)][:n]
        jpegs = [_jpeg(img) for img in images]
        return [jpegs[i % len(jpegs)] for i in range(n)], f"{source} as JPEG, {images[0].shape[1]}x{images[0].shape[0]}"
    if (root / "fashion-mnist").is_dir():
        images = [img for _, img, _ in iter_images(parse_source("idx:fashion-mnist").with_split("test"), root)]
        what = "Fashion-MNIST test images"
    else:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(min(n, 10000))]
        what = "random 28x28 images"
    return [encode_frame(images[i % len(images)], PNG) for i in range(n)], f"{what}, PNG"


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """A camera's JPEG of a uint8 image (encode_frame writes PNG/NPY only: what `produce` sends)."""
    out = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(
        out, format="JPEG", quality=quality)
    return out.getvalue()


def publish(producer, topic: str, values: list[bytes], rate: float | None, cameras: int = 8) -> None:
    start = time.monotonic()
    for i, value in enumerate(values):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        camera = f"cam-{i % cameras}"
        headers = frame_headers(f"f-{i}", camera, JPEG if value[:3] == b"\xff\xd8\xff" else PNG,
                                int(time.time() * 1000))
        producer.send(topic, key=camera.encode(), value=value, headers=headers)
    producer.flush()


def raw_consume_fps(bootstrap: str, topic: str, partitions: int, n: int) -> float:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=2000)
    parts = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    got, start = 0, None
    while got < n:
        for records in consumer.poll(timeout_ms=500).values():
            start = start or time.perf_counter()
            got += len(records)
    elapsed = time.perf_counter() - start
    consumer.close()
    return got / elapsed


def calibrated_checkpoint(name: str, values: list[bytes], device: str, path: Path) -> Scorer:
    """Random weights, with mu/sigma of their R-scores on the first frames (so alerts are rare)."""
    torch.manual_seed(0)
    cfg = MODELS[name]
    spec = PATCH_SPEC if name == "patch" else PreprocessSpec(cfg.image_size, cfg.channels)
    ckpt = Checkpoint(model=cfg, preprocess=spec, state_dict=AMA(cfg).state_dict(), mu=0.0, sigma=1.0)
    scorer = Scorer(ckpt, device)
    r = scorer.score_images([decode_frame(v, None, FrameLimits()) for v in values[:512]]).r
    ckpt.mu, ckpt.sigma = float(r.mean()), float(r.std())
    save_checkpoint(ckpt, path)
    return Scorer(ckpt, device)


def thread_counts() -> list[int]:
    """The agent's default (all cores but one) and all cores: the bare Scorer gets the better one."""
    cores = os.cpu_count() or 1
    return sorted({max(1, cores - 1), cores})


def bare_scorer_best(scorer: Scorer, values: list[bytes], batch: int) -> tuple[float, float, dict]:
    """The best (prepare + score, model-only) frames/s over thread_counts(), and every count's result."""
    default = torch.get_num_threads()
    runs = {}
    try:
        for n in thread_counts():
            torch.set_num_threads(n)
            runs[n] = bare_scorer(scorer, values, batch)
    finally:
        torch.set_num_threads(default)
    best = max(runs, key=lambda n: runs[n][0])
    return runs[best][0], runs[best][1], {str(n): round(r[0]) for n, r in runs.items()}


def bare_scorer(scorer: Scorer, values: list[bytes], batch: int) -> tuple[float, float]:
    """(prepare + score frames/s, score-only frames/s) on the frames decoded beforehand."""
    images = [decode_frame(v, None, FrameLimits()) for v in values]
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    scorer.score_tiles(scorer.prepare(batches[0]))  # warm-up
    t0 = time.perf_counter()
    inputs = []
    for b in batches:
        x = scorer.prepare(b)
        inputs.append(x)
        scorer.score_tiles(x)
    both = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x in inputs:
        scorer.score_tiles(x)
    if scorer.device.type == "cuda":
        torch.cuda.synchronize()
    model = time.perf_counter() - t0
    return len(images) / both, len(images) / model


class Agent:
    """`ama-stream serve` as a subprocess on the benchmark's topics."""

    def __init__(self, bootstrap: str, checkpoint: Path, tag: str, args, extra: list[str], log: Path):
        self.log = log
        cmd = [sys.executable, "-m", "ama_stream.cli", "--log-level", "WARNING", "serve", "--bootstrap", bootstrap,
               "--checkpoint", str(checkpoint), "--frames-topic", f"frames-{tag}", "--scores-topic", f"scores-{tag}",
               "--alerts-topic", f"alerts-{tag}", "--dlq-topic", f"dlq-{tag}", "--group-id", f"bench-{tag}-{uuid.uuid4().hex[:6]}",
               "--device", args.device, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--metrics-port", "0", *extra]
        for key, value in EMBEDDED_CONSUMER.items():
            cmd += ["--set", f"consumer.{key}={value}"]
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()


def read_scores(bootstrap: str, topic: str, n: int, timeout: float) -> list[tuple[float, dict]]:
    """(arrival time in ms, record) for n score records."""
    # read_committed, as every consumer of the agent's output topics must (delivery: exactly-once)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=5000,
                             fetch_max_wait_ms=EMBEDDED_CONSUMER["fetch_max_wait_ms"], isolation_level="read_committed")
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    out: list[tuple[float, dict]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            now = time.time() * 1000
            out.extend((now, json.loads(r.value)) for r in records)
    consumer.close()
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} of {n} score records arrived on {topic} within {timeout:.0f} s")
    return out


def agent_throughput(bootstrap: str, checkpoint: Path, tag: str, args, n: int, log: Path) -> float:
    agent = Agent(bootstrap, checkpoint, tag, args, ["--max-frames", str(n)], log)
    scored = read_scores(bootstrap, f"scores-{tag}", n, timeout=600)
    if agent.wait(120) != 0:
        raise RuntimeError(f"the agent failed; see {log}")
    times = sorted({rec["scored_at"] for _, rec in scored})  # one time per batch
    first_batch = sum(1 for _, rec in scored if rec["scored_at"] == times[0])
    return (n - first_batch) / ((times[-1] - times[0]) / 1000)


def latency_at(bootstrap: str, checkpoint: Path, tag: str, args, values: list[bytes], rate: float, log: Path,
               kafka: KafkaSection) -> dict:
    agent = Agent(bootstrap, checkpoint, tag, args, ["--max-frames", str(len(values) + 1)], log)  # + the probe
    wait_joined(bootstrap, f"scores-{tag}", kafka, tag)
    reader_out: list = []
    reader = threading.Thread(target=lambda: reader_out.extend(read_scores(bootstrap, f"scores-{tag}", len(values) + 1, 600)))
    reader.start()
    producer = make_producer(kafka, {"linger_ms": 0}, 10.0)
    publish(producer, f"frames-{tag}", values, rate)
    producer.close()
    reader.join()
    if agent.wait(120) != 0:
        raise RuntimeError(f"the agent failed; see {log}")
    lat = np.array([arrived - rec["captured_at"] for arrived, rec in reader_out if rec["frame_id"] != "probe"])
    return {"rate_fps": rate, "frames": len(lat), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}


def wait_joined(bootstrap: str, scores_topic: str, kafka: KafkaSection, tag: str) -> None:
    """Sends one probe frame and waits for its score: the agent has joined its group and warmed up."""
    probe = encode_frame(np.zeros((28, 28), dtype=np.uint8), PNG)
    producer = make_producer(kafka, {}, 10.0)
    producer.send(f"frames-{tag}", key=b"probe", value=probe, headers=frame_headers("probe", "probe", PNG, 0))
    producer.close()
    read_scores(bootstrap, scores_topic, 1, timeout=120)


def update_docs(block: str, device: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    begin, end = f"<!-- agent_bench:{device}:begin -->", f"<!-- agent_bench:{device}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + begin + "\n" + block + end + text[text.index(end) + len(end):]
    else:
        if "## Agent" not in text:
            text = text.rstrip("\n") + "\n\n## Agent\n"
        text = text.rstrip("\n") + f"\n\n{begin}\n{block}{end}\n"
    path.write_text(text)


def markdown(r: dict) -> str:
    lat = r["latency_half_load"]
    return (
        f"Measured {r['date']} on {r['machine']} ({r['device']}), model `{r['model']}`, "
        f"{r['frames']} frames ({r['frames_kind']}), max_batch {r['max_batch']}, max_wait_ms {r['max_wait_ms']}, "
        f"broker: {r['broker']}; 1-minute load average during the run "
        f"{', '.join(f'{x:.1f}' for x in r['load_average_1min'])}. Command: `{r['command']}`\n\n"
        "| measure | value |\n|---|---|\n"
        f"| raw kafka-python consume | {r['raw_consume_fps']:.0f} frames/s |\n"
        f"| bare Scorer (prepare + score), best thread count, mean of before/after the agent | "
        f"{r['bare_scorer_fps']:.0f} frames/s ({r['bare_scorer_fps_before_after'][0]:.0f} / "
        f"{r['bare_scorer_fps_before_after'][1]:.0f}; by torch threads {r['bare_scorer_fps_by_torch_threads'][0]} / "
        f"{r['bare_scorer_fps_by_torch_threads'][1]}) |\n"
        f"| bare Scorer, model only | {r['model_only_fps']:.0f} frames/s |\n"
        f"| agent end to end | {r['agent_fps']:.0f} frames/s |\n"
        f"| agent / bare Scorer at the agent's thread count ({r['agent_threads']}) | "
        f"{r['agent_vs_scorer_same_threads']:.2f} (target >= 0.6) |\n"
        f"| agent / bare Scorer at its best thread count | {r['agent_vs_scorer']:.2f} |\n"
        f"| agent / raw consume | {r['agent_vs_consume']:.3f} |\n"
        f"| latency at {lat['rate_fps']:.0f} frames/s (half load), p50 / p99 | "
        f"{lat['p50_ms']:.0f} ms / {lat['p99_ms']:.0f} ms (target p99 < 250 ms) |\n"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=4000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=int, default=20)
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--frames-source", metavar="SOURCE", help="frames from these images as JPEG at their native "
                                                              "size (e.g. folder:bsdata/good with --model patch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="length of the half-load run")
    p.add_argument("--bootstrap", help="an external broker instead of the embedded one")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    values, frames_kind = frames(args.frames, args.frames_source)
    checkpoint = work / "model.pt"
    scorer = calibrated_checkpoint(args.model, values, args.device, checkpoint)
    loads = [os.getloadavg()[0]]
    broker = None if args.bootstrap else EmbeddedBroker(log_file=work / "broker.log").start()
    bootstrap = args.bootstrap or broker.bootstrap
    kafka = KafkaSection(bootstrap_servers=bootstrap)
    try:
        tags = {"tp": uuid.uuid4().hex[:8], "lat": uuid.uuid4().hex[:8]}
        for tag in tags.values():
            ensure_topics(kafka, {f"frames-{tag}": args.partitions, f"scores-{tag}": 1, f"alerts-{tag}": 1, f"dlq-{tag}": 1})
        producer = make_producer(kafka, {"linger_ms": 5}, 10.0)
        publish(producer, f"frames-{tags['tp']}", values, rate=None)
        producer.close()

        raw = raw_consume_fps(bootstrap, f"frames-{tags['tp']}", args.partitions, len(values))
        print(f"raw consume: {raw:.0f} frames/s", file=sys.stderr)
        bare_before, model_before, threads_before = bare_scorer_best(scorer, values, args.max_batch)
        print(f"bare Scorer: {bare_before:.0f} frames/s (model only {model_before:.0f}; by torch threads "
              f"{threads_before})", file=sys.stderr)
        loads.append(os.getloadavg()[0])
        agent = agent_throughput(bootstrap, checkpoint, tags["tp"], args, len(values), work / "agent-throughput.log")
        print(f"agent: {agent:.0f} frames/s", file=sys.stderr)
        loads.append(os.getloadavg()[0])
        bare_after, model_after, threads_after = bare_scorer_best(scorer, values, args.max_batch)
        print(f"bare Scorer again: {bare_after:.0f} frames/s (model only {model_after:.0f}; by torch threads "
              f"{threads_after})", file=sys.stderr)
        bare, model_only = (bare_before + bare_after) / 2, (model_before + model_after) / 2
        half = agent / 2
        n_lat = max(100, int(half * args.latency_seconds))
        latency = latency_at(bootstrap, checkpoint, tags["lat"], args, [values[i % len(values)] for i in range(n_lat)],
                             half, work / "agent-latency.log", kafka)
        print(f"latency at {half:.0f} frames/s: p50 {latency['p50_ms']:.0f} ms, p99 {latency['p99_ms']:.0f} ms",
              file=sys.stderr)
        loads.append(os.getloadavg()[0])
    finally:
        if broker is not None:
            broker.stop()

    device = "cuda" if args.device.startswith("cuda") else "cpu"
    agent_threads = max(1, (os.cpu_count() or 1) - 1)
    same_threads = np.mean([t.get(str(agent_threads), t.get(agent_threads, bare)) for t in (threads_before, threads_after)])
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": gpu or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "device": args.device,
        "model": f"{args.model} ({json.dumps(scorer.checkpoint.model.to_dict())}, "
                 f"{json.dumps(scorer.spec.to_dict())})",
        "frames": len(values),
        "frames_kind": frames_kind,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "broker": "external " + args.bootstrap if args.bootstrap else "embedded tansu (same machine)",
        "command": "python benchmarks/agent_bench.py " + " ".join(sys.argv[1:]),
        "raw_consume_fps": raw,
        "bare_scorer_fps": bare,
        "bare_scorer_fps_before_after": [bare_before, bare_after],
        "bare_scorer_fps_by_torch_threads": [threads_before, threads_after],
        "model_only_fps": model_only,
        "load_average_1min": loads,
        "agent_fps": agent,
        "agent_vs_scorer": agent / bare,
        # the agent's model threads when torch_threads is unset (ama_stream.agent.runner): all cores but one
        "agent_threads": agent_threads,
        "agent_vs_scorer_same_threads": agent / same_threads,
        "agent_vs_consume": agent / raw,
        "latency_half_load": latency,
    }
    key = device if args.model != "patch" else f"{device}-patch"  # the patch model's numbers get their own block
    out = REPO / "benchmarks" / "results" / f"agent_bench_{key}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    if not args.no_docs:
        update_docs(markdown(result), key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
