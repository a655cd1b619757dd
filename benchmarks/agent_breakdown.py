"""Where the agent's time goes: one in-process agent draining a backlog, with its own metrics.

    python benchmarks/agent_breakdown.py --checkpoint ~/.cache/ama-stream/demo/model-*.pt
    python benchmarks/agent_breakdown.py --checkpoint C --set torch_threads=2 --set batching.max_batch=128

Publishes --frames Fashion-MNIST test images (PNG) to an embedded broker, runs the agent in this
process until it has handled them all, and prints frames/s next to the summed batch times of
decoding (decode thread), scoring (run loop) and publishing (publish thread, acknowledgements
included). Not a test: it measures.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

from ama_stream.kafka_tools.broker import EMBEDDED_CONSUMER, EmbeddedBroker
from ama_stream.kafka_tools.feed import mixed_items, publish_items
from ama_stream.agent.kafka_io import ensure_topics, make_producer
from ama_stream.agent.runner import Agent
from ama_stream.agent.settings import AgentSettings, KafkaSection
from ama_stream.scoring import Scorer
from ama_stream.settings import load_settings, parse_overrides
from ama_stream.sources import iter_images, parse_source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--frames", type=int, default=6000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="agent settings")
    args = p.parse_args()
    with EmbeddedBroker() as broker:
        kafka = KafkaSection(bootstrap_servers=broker.bootstrap)
        ensure_topics(kafka, {"frames": 4, "scores": 1, "alerts": 1, "frames-dlq": 1})
        images = iter_images(parse_source("idx:fashion-mnist").with_split("test"))
        producer = make_producer(kafka, {}, 10.0)
        publish_items(producer, "frames", mixed_items(images, None, 0.0, limit=args.frames, seed=0, prefix="b"),
                      content_type="image/png", cameras=["cam"])
        producer.close()
        base = {"kafka": {"bootstrap_servers": broker.bootstrap}, "device": "cpu", "consumer": EMBEDDED_CONSUMER,
                "metrics": {"port": 0}, "max_frames": args.frames, "group_id": "breakdown",
                "drift": {"enabled": False}}
        settings = load_settings(AgentSettings, None, {**base, **parse_overrides(args.set)})
        agent = Agent(settings, scorer=Scorer(args.checkpoint, "cpu"))
        runner = threading.Thread(target=agent.run)
        runner.start()
        while not agent.consumer or not agent.consumer.assignment():  # the group join is not counted
            time.sleep(0.05)
        started = time.monotonic()
        runner.join()
        wall = time.monotonic() - started
    value = agent.metrics.registry.get_sample_value
    print(json.dumps({
        "settings": args.set, "frames": args.frames, "wall_s": round(wall, 2), "frames_per_s": round(args.frames / wall),
        "batches": int(value("ama_batch_size_count")),
        "mean_batch": round(value("ama_batch_size_sum") / value("ama_batch_size_count"), 1),
        "score_s": round(value("ama_score_seconds_sum"), 2),
        "decode_s": round(value("ama_decode_seconds_sum"), 2),
        "publish_s": round(value("ama_publish_seconds_sum"), 2),
    }))


if __name__ == "__main__":
    main()
