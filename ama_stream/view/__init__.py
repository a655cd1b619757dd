"""The live alert page (`ama-stream view`): the newest alerts with their frames, regions and anomaly
maps, alert rates and drift per camera, and the agent's health, from Kafka and the agent's metrics."""
from __future__ import annotations

from contextlib import ExitStack

from ama_stream.agent.settings import KafkaSection

from .board import Board
from .server import ViewServer
from .tail import AlertTail, FrameStore, HealthPoller


class AlertPage:
    """The board, its readers and its server together: `start()`, then `close()`."""

    def __init__(self, kafka: KafkaSection, alerts_topic: str = "alerts", maps_topic: str | None = None,
                 metrics_url: str | None = None, host: str = "127.0.0.1", port: int = 8080,
                 read_committed: bool = False, max_alerts: int = 200):
        self.board = Board(max_alerts=max_alerts)
        self.frames = FrameStore(kafka, read_committed)
        self.tail = AlertTail(kafka, alerts_topic, maps_topic, self.board, read_committed, backlog=max_alerts)
        self.health = HealthPoller(metrics_url, self.board)
        self.server = ViewServer(self.board, self.frames, host, port)
        self._stack = ExitStack()

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> "AlertPage":
        for part in (self.server, self.tail, self.health):
            part.start()
            self._stack.callback(part.close)
        self._stack.callback(self.frames.close)
        return self

    def close(self) -> None:
        self._stack.close()


__all__ = ["AlertPage", "Board"]
