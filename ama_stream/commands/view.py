"""`ama-stream view`: the live alert page for operators (ama_stream.view)."""
from __future__ import annotations

import argparse
import signal
import threading

from ama_stream.agent.settings import KafkaSection


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", required=True, metavar="HOST:PORT", help="Kafka bootstrap servers")
    parser.add_argument("--alerts-topic", default="alerts", metavar="T", help="the agent's alerts topic")
    parser.add_argument("--maps-topic", metavar="T", help="the agent's heatmaps topic (serve --maps-topic), if on")
    parser.add_argument("--metrics-url", metavar="URL", help="the agent's metrics/health server, e.g. "
                                                            "http://127.0.0.1:9400 (readiness and drift per camera)")
    parser.add_argument("--read-committed", action="store_true",
                        help="read as read_committed (needed when the agent runs --delivery exactly-once)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default loopback: the "
                                                          "page shows production frames; put a proxy with "
                                                          "authentication in front to share it)")
    parser.add_argument("--port", type=int, default=8080, help="port of the page (0: any free port)")
    parser.add_argument("--max-alerts", type=int, default=200, help="alerts kept and shown, newest first")


def run(args: argparse.Namespace) -> int:
    from ama_stream.view import AlertPage

    if args.max_alerts < 1:
        raise ValueError(f"--max-alerts must be >= 1, got {args.max_alerts}")
    page = AlertPage(KafkaSection(bootstrap_servers=args.bootstrap), args.alerts_topic, args.maps_topic,
                     args.metrics_url, args.host, args.port, args.read_committed, args.max_alerts).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"alert page on {page.url} (Ctrl-C to stop)", flush=True)
    try:
        stop.wait()
    finally:
        page.close()
    return 0
