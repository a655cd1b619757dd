"""`ama-stream produce`: publish image frames from a data source to a Kafka topic.

Connection security and producer tuning come from the environment (AMA_KAFKA__*, AMA_PRODUCER__*)
or `--config` (the `kafka:` / `producer:` sections of configs/agent.yaml).
"""
from __future__ import annotations

import argparse
import logging
import time

log = logging.getLogger("ama_stream.produce")

FORMATS = {"png": "image/png", "npy": "application/x-npy"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", required=True, metavar="HOST:PORT", help="Kafka bootstrap servers")
    parser.add_argument("--topic", required=True, metavar="T", help="topic to publish frames to")
    parser.add_argument("--source", required=True, metavar="SPEC",
                        help="FORMAT:ROOT (idx:fashion-mnist, folder:/data/line3/good, npz:/x.npz, elpv:elpv)")
    parser.add_argument("--classes", metavar="A,B", help="class selection of --source")
    parser.add_argument("--split", choices=["train", "test", "all"], help="split of --source (default: all)")
    parser.add_argument("--data-root", metavar="DIR", help="where relative roots resolve (default: $AMA_DATA_ROOT)")
    parser.add_argument("--rate", type=float, metavar="N", help="frames per second (default: as fast as possible)")
    parser.add_argument("--limit", type=int, metavar="N", help="publish at most N frames")
    parser.add_argument("--camera-id", default="camera-0", metavar="ID", help="camera-id header and record key")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png", help="frame encoding (default png)")
    parser.add_argument("--anomaly-source", metavar="SPEC", help="second source mixed in as anomalies")
    parser.add_argument("--anomaly-classes", metavar="A,B", help="class selection of --anomaly-source")
    parser.add_argument("--anomaly-fraction", type=float, default=0.1, metavar="F",
                        help="share of frames drawn from --anomaly-source (default 0.1)")
    parser.add_argument("--truth", metavar="FILE", help="write the ground truth CSV frame_id,anomaly,item_id")
    parser.add_argument("--seed", type=int, default=0, help="seed of the anomaly mixing")
    parser.add_argument("--config", metavar="FILE", help="YAML with kafka:/producer: sections (security, tuning)")
    parser.add_argument("--connect-timeout-s", type=float, default=10.0, metavar="S",
                        help="give up when the broker cannot be reached for this long (default 10)")


def _check(args: argparse.Namespace) -> None:
    if args.rate is not None and args.rate <= 0:
        raise ValueError(f"--rate must be positive, got {args.rate}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if not 0 <= args.anomaly_fraction <= 1:
        raise ValueError(f"--anomaly-fraction must be in [0, 1], got {args.anomaly_fraction}")
    if args.anomaly_classes and not args.anomaly_source:
        raise ValueError("--anomaly-classes needs --anomaly-source")


def run(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from ama_stream.kafka_tools.feed import mixed_items, publish_items, truth_row, write_truth
    from ama_stream.agent.kafka_io import make_producer
    from ama_stream.agent.settings import ProduceSettings
    from ama_stream.settings import load_settings
    from ama_stream.sources import iter_images, parse_source

    _check(args)
    settings = load_settings(ProduceSettings, args.config, {"kafka": {"bootstrap_servers": args.bootstrap}})
    normal_spec = parse_source(args.source, args.classes).with_split(args.split)
    normal = iter_images(normal_spec, args.data_root, seed=args.seed)
    anomalies = None
    if args.anomaly_source:
        anomaly_spec = parse_source(args.anomaly_source, args.anomaly_classes).with_split(args.split)
        anomalies = iter_images(anomaly_spec, args.data_root, seed=args.seed)
    prefix = f"{args.camera_id}-{int(time.time() * 1000):x}"
    items = mixed_items(normal, anomalies, args.anomaly_fraction, limit=args.limit, seed=args.seed, prefix=prefix)

    try:
        producer = make_producer(settings.kafka, settings.producer, connect_timeout_s=args.connect_timeout_s)
    except KafkaError as exc:
        raise RuntimeError(f"cannot connect to the broker at {settings.kafka.bootstrap_servers}: {exc}") from None
    truth: list[tuple[str, int, str]] = []
    started = time.monotonic()
    try:
        count = publish_items(producer, args.topic, items, content_type=FORMATS[args.format], cameras=[args.camera_id],
                              rate=args.rate, on_sent=lambda item: truth.append(truth_row(item)))
    finally:
        producer.close(timeout=10)
        if args.truth:
            write_truth(args.truth, truth)  # even when interrupted: what was sent is what was published
    elapsed = time.monotonic() - started
    anomalous = sum(row[1] for row in truth)
    log.info("published %d frames (%d anomalies) to %s in %.1f s (%.0f frames/s)",
             count, anomalous, args.topic, elapsed, count / elapsed if elapsed > 0 else 0.0)
    return 0
