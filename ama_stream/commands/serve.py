"""`ama-stream serve`: the long-running Kafka scoring agent (its flags are a contract: docs/operations.md)."""
from __future__ import annotations

import argparse
import logging
import signal

from ama_stream.runtimes import RUNTIMES
from ama_stream.settings import load_settings, parse_overrides, set_dotted

DELIVERY_MODES = ("at-least-once", "exactly-once")  # ama_stream.agent.settings.Delivery (not imported: no kafka here)

log = logging.getLogger("ama_stream.serve")

# flag dest -> dotted settings key
_FLAGS = {
    "bootstrap": "kafka.bootstrap_servers",
    "checkpoint": "checkpoint",
    "calibration": "calibration",
    "model_reload": "model_reload",
    "frames_topic": "topics.frames",
    "scores_topic": "topics.scores",
    "alerts_topic": "topics.alerts",
    "dlq_topic": "topics.dead_letter",
    "maps_topic": "topics.maps",
    "group_id": "group_id",
    "delivery": "delivery",
    "agent_id": "agent_id",
    "device": "device",
    "runtime": "runtime",
    "max_batch": "batching.max_batch",
    "max_wait_ms": "batching.max_wait_ms",
    "metrics_port": "metrics.port",
    "max_frames": "max_frames",
    "idle_exit_s": "idle_exit_s",
    "give_up_after_s": "retry.give_up_after_s",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="agent YAML (see configs/agent.yaml); env AMA_* and flags win")
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers, comma-separated")
    parser.add_argument("--checkpoint", metavar="FILE", help="model checkpoint to score with")
    parser.add_argument("--calibration", metavar="FILE", help="calibration file (default: the checkpoint's statistics)")
    parser.add_argument("--model-reload", action="store_true", default=None,
                        help="swap in a new version of the checkpoint file (with its calibration) or a model named on "
                             "the control topic without a restart (docs/operations.md)")
    parser.add_argument("--frames-topic", metavar="T", help="topic to read frames from")
    parser.add_argument("--scores-topic", metavar="T", help="topic for one score record per frame ('' disables)")
    parser.add_argument("--alerts-topic", metavar="T", help="topic for the records of anomalous frames")
    parser.add_argument("--dlq-topic", metavar="T", help="dead-letter topic for frames that cannot be scored")
    parser.add_argument("--maps-topic", metavar="T", help="topic for a small PNG anomaly map per alert, keyed by "
                                                          "frame id (off by default)")
    parser.add_argument("--group-id", metavar="G", help="consumer group (agents in one group share partitions)")
    parser.add_argument("--delivery", choices=DELIVERY_MODES,
                        help="at-least-once (default): a crash can repeat a frame's records; exactly-once: a batch's "
                             "records and offsets in one Kafka transaction (consumers of the output topics must "
                             "read with isolation_level=read_committed; docs/operations.md)")
    parser.add_argument("--agent-id", metavar="ID",
                        help="exactly-once: this agent's stable id, unique in its group and kept across restarts "
                             "(transactional id ama-stream-GROUP-ID; default: the host name)")
    parser.add_argument("--device", metavar="D", help="auto, cpu or cuda:N")
    parser.add_argument("--runtime", choices=RUNTIMES,
                        help="scoring runtime: torch (default), or onnxruntime / openvino (CPU; the exported graph, "
                             "extras ama-stream[onnx] / [openvino])")
    parser.add_argument("--max-batch", type=int, metavar="N", help="frames per micro-batch")
    parser.add_argument("--max-wait-ms", type=int, metavar="MS", help="longest wait to fill a micro-batch")
    parser.add_argument("--metrics-port", type=int, metavar="P", help="port of /metrics, /healthz, /readyz (0: any)")
    parser.add_argument("--max-frames", type=int, metavar="N", help="exit after handling N frames")
    parser.add_argument("--idle-exit-s", type=float, metavar="S", help="exit after S seconds without a frame")
    parser.add_argument("--give-up-after-s", type=float, metavar="S",
                        help="exit non-zero when the broker cannot be reached at start-up for S seconds "
                             "(default: keep retrying)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="any setting by dotted key, value parsed as YAML (e.g. consumer.session_timeout_ms=6000)")


def build_overrides(args: argparse.Namespace) -> dict:
    overrides = parse_overrides(args.set)
    for dest, key in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_dotted(overrides, key, value)
    return overrides


def run(args: argparse.Namespace) -> int:
    from ama_stream.agent.runner import Agent  # heavy imports (torch, kafka) only when serving
    from ama_stream.agent.settings import AgentSettings

    settings = load_settings(AgentSettings, args.config, build_overrides(args))
    agent = Agent(settings)

    def on_signal(signum, _frame):
        log.info("received %s: finishing the batches in flight, then exiting", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return agent.run()
