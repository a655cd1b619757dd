"""Settings of the Kafka agent (`serve`) and of `produce`: YAML file < AMA_* environment < flags.

Every key is documented in configs/agent.yaml. Kafka client tuning that the agent does not
manage itself passes through `consumer:` / `producer:` to kafka-python unchanged; keys the agent
owns (offsets, serialisation, acknowledgements, credentials, the transactional id) are refused
there so the delivery rule (acks=all, commit only after the records are acknowledged, or with them
in one transaction) cannot be switched off by accident.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaConsumer, KafkaProducer
from pydantic import Field, SecretStr, field_validator, model_validator

from ama_stream.settings import AmaSettings, Section

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"]
Delivery = Literal["at-least-once", "exactly-once"]  # also serve's --delivery choices

# Keys set from other settings or fixed by the delivery rule; never taken from the pass-through maps.
_MANAGED_COMMON = {
    "bootstrap_servers", "client_id", "security_protocol", "sasl_mechanism", "sasl_plain_username",
    "sasl_plain_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname",
    "kafka_client",
}
_MANAGED_CONSUMER = _MANAGED_COMMON | {
    "group_id", "enable_auto_commit", "key_deserializer", "value_deserializer", "max_poll_records",
}
_MANAGED_PRODUCER = _MANAGED_COMMON | {"acks", "key_serializer", "value_serializer", "transactional_id"}


def _check_pass_through(section: str, values: dict[str, Any], known: dict, managed: set[str]) -> dict[str, Any]:
    for key in values:
        if key in managed:
            raise ValueError(f"{section}.{key} is managed by the agent and cannot be set here")
        if key not in known:
            raise ValueError(f"{section}.{key} is not a kafka-python {section} setting")
    return values


class KafkaSection(Section):
    """Connection and security, shared by the consumer and the producer."""

    bootstrap_servers: str = "localhost:9092"  # comma-separated HOST:PORT list
    client_id: str = "ama-stream"  # client id shown in broker logs and quotas
    security_protocol: SecurityProtocol = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    sasl_mechanism: SaslMechanism | None = None  # PLAIN, SCRAM-SHA-256/512, GSSAPI or OAUTHBEARER (SASL only)
    sasl_plain_username: str | None = None  # SASL user (PLAIN/SCRAM)
    sasl_plain_password: SecretStr | None = None  # SASL password (PLAIN/SCRAM); masked in logs
    ssl_cafile: Path | None = None  # CA bundle that signs the brokers' certificates (SSL)
    ssl_certfile: Path | None = None  # client certificate (mutual TLS)
    ssl_keyfile: Path | None = None  # client key (mutual TLS)
    ssl_password: SecretStr | None = None  # password of the client key; masked in logs
    ssl_check_hostname: bool = True  # verify that the broker certificate matches its host name

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str) -> str:
        servers = [s.strip() for s in v.split(",") if s.strip()]
        if not servers or any(":" not in s for s in servers):
            raise ValueError("expected a comma-separated list of HOST:PORT")
        return ",".join(servers)

    @model_validator(mode="after")
    def _sasl_complete(self):
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
            if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
                self.sasl_plain_username and self.sasl_plain_password
            ):
                raise ValueError(f"sasl_mechanism {self.sasl_mechanism} needs sasl_plain_username and sasl_plain_password")
        return self

    def client_config(self) -> dict[str, Any]:
        """kafka-python keyword arguments for connection and security."""
        cfg: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            cfg["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_plain_username is not None:
                cfg["sasl_plain_username"] = self.sasl_plain_username
            if self.sasl_plain_password is not None:
                cfg["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        if self.security_protocol.endswith("SSL"):
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, key) is not None:
                    cfg[key] = str(getattr(self, key))
            if self.ssl_password is not None:
                cfg["ssl_password"] = self.ssl_password.get_secret_value()
            cfg["ssl_check_hostname"] = self.ssl_check_hostname
        return cfg


class TopicsSection(Section):
    frames: str = "frames"  # the topic cameras publish frames to
    scores: str | None = "scores"  # one record per frame; null disables
    alerts: str = "alerts"  # the score record of anomalous frames only
    dead_letter: str = "frames-dlq"  # undecodable or refused frames, with an error header
    calibration: str | None = None  # control topic carrying calibration documents and (model_reload) model messages; null disables
    # a small PNG heatmap per alert (keyed by frame id; docs/wire-format.md); null (default) disables
    maps: str | None = None

    @field_validator("frames", "alerts", "dead_letter", "scores", "calibration", "maps")
    @classmethod
    def _topic_name(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if len(v) > 249 or not all(c.isalnum() or c in "._-" for c in v):
            raise ValueError("a topic name uses only letters, digits, '.', '_' and '-' (at most 249)")
        return v

    @model_validator(mode="after")
    def _required(self):
        for name in ("frames", "alerts", "dead_letter"):
            if getattr(self, name) is None:
                raise ValueError(f"topics.{name} must be set")
        if self.frames in {self.scores, self.alerts, self.dead_letter}:
            raise ValueError("the frames topic cannot also be an output topic")
        if self.calibration is not None and self.calibration in {self.frames, self.scores, self.alerts, self.dead_letter}:
            raise ValueError("the calibration control topic must be a topic of its own")
        if self.maps is not None and self.maps in {self.frames, self.scores, self.alerts, self.dead_letter,
                                                   self.calibration}:
            raise ValueError("the maps topic must be a topic of its own")
        return self


class BatchingSection(Section):
    max_batch: int = Field(64, ge=1, le=65536)  # frames per micro-batch
    max_wait_ms: int = Field(20, ge=0)  # close a partial batch this long after its first frame
    decode_ahead: int = Field(2, ge=1, le=16)  # batches decoded while one is scored


class LimitsSection(Section):
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1)  # larger frame values are dead-lettered undecoded
    # a compressed record batch may inflate to at most this many bytes (checked while inflating; past
    # it, the batch's offsets are dead-lettered as too-large): a gzip bomb cannot take the memory
    max_inflated_batch_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(4096 * 4096, ge=1)  # width x height, checked from the header before decoding
    # decoded pixels per micro-batch (64 frames of 2048x2048, or 16 of 4096x4096): bounds a batch's
    # decoding time; a frame past it is dead-lettered (batch-too-many-pixels) with its value, for `replay`
    max_batch_pixels: int = Field(256 * 1024 * 1024, ge=1)

    @model_validator(mode="after")
    def _one_frame_fits_a_batch(self) -> "LimitsSection":
        if self.max_batch_pixels < self.max_pixels:  # else a frame that passes max_pixels could never be scored
            raise ValueError(f"max_batch_pixels ({self.max_batch_pixels}) must be at least max_pixels ({self.max_pixels})")
        return self


class MetricsSection(Section):
    enabled: bool = True  # serve /metrics, /healthz and /readyz over HTTP
    # address the metrics/health server binds; unauthenticated, so loopback by default: set 0.0.0.0
    # (or the host's address) for a Prometheus on another host, behind a firewall
    host: str = "127.0.0.1"
    port: int = Field(9400, ge=0, le=65535)  # 0: any free port (logged at start-up)
    stall_s: float = Field(60.0, gt=0)  # /healthz fails when the run loop made no progress for this long
    # /readyz and ama_ready go to 0 when frames are waiting but no commit moved for this long
    commit_stall_s: float = Field(120.0, gt=0)


class RetrySection(Section):
    """Backoff while the broker is unreachable: initial_s doubling up to max_s."""

    initial_s: float = Field(0.5, gt=0)  # first backoff after a broker failure
    max_s: float = Field(30.0, gt=0)  # longest backoff
    connect_timeout_s: float = Field(10.0, gt=0)  # one connection attempt at start-up
    lag_every_s: float = Field(5.0, gt=0)  # consumer lag / broker liveness probe interval
    # start-up: exit non-zero when the broker stays unreachable this long; null = keep retrying
    give_up_after_s: float | None = Field(None, gt=0)

    @property
    def attempt_timeout_s(self) -> float:
        """One connection attempt's limit: connect_timeout_s, but never past give_up_after_s."""
        return min(self.connect_timeout_s, self.give_up_after_s or self.connect_timeout_s)


class DriftSection(Section):
    """When a camera's live scores count as drifted from the calibration (ama_stream.drift)."""

    enabled: bool = True  # watch each camera's scores for drift and log when recalibration is due
    window: int = Field(1000, ge=2)  # frames per camera in the rolling statistics
    min_frames: int = Field(200, ge=1)  # a camera is judged once its windows hold this many
    mean_tolerance: float = Field(0.5, gt=0)  # |mean z of normal frames - expected| in z units
    std_ratio: tuple[float, float] = (0.75, 1.33)  # allowed spread of z relative to the calibration's
    alert_sigmas: float = Field(4.0, gt=0)  # alert-rate band: binomial sigmas above the expected rate
    max_cameras: int = Field(1000, ge=1)  # cameras tracked (bounds the metric labels)

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_frames > self.window:
            raise ValueError(f"drift.min_frames ({self.min_frames}) must not exceed drift.window ({self.window})")
        low, high = self.std_ratio
        if not 0 < low < 1 < high:
            raise ValueError(f"drift.std_ratio must be (low, high) with 0 < low < 1 < high, got {self.std_ratio}")
        return self


class AgentSettings(AmaSettings):
    kafka: KafkaSection = KafkaSection()
    topics: TopicsSection = TopicsSection()
    group_id: str = Field("ama-stream", min_length=1)  # consumer group: agents in one group share the partitions
    # at-least-once: offsets committed after the records are acknowledged (a crash can repeat a
    # frame's records); exactly-once: a batch's records and its offsets in one Kafka transaction
    # (downstream consumers must read with isolation_level=read_committed; docs/operations.md)
    delivery: Delivery = "at-least-once"
    # exactly-once: this agent's stable id, unique in its group and the same across restarts; the
    # transactional id is ama-stream-{group_id}-{agent_id}. null = the host name
    agent_id: str | None = Field(None, min_length=1, max_length=200)
    batching: BatchingSection = BatchingSection()
    limits: LimitsSection = LimitsSection()
    metrics: MetricsSection = MetricsSection()
    retry: RetrySection = RetrySection()
    device: str = "auto"  # auto (first CUDA device, else CPU), cpu or cuda:N
    runtime: Literal["torch", "onnxruntime", "openvino"] = "torch"  # scoring runtime (ama_stream.runtimes); the last two: CPU, extras [onnx]/[openvino]
    # CPU threads for the model; null = auto: on the CPU all cores but one (decoding and Kafka I/O
    # run beside the model, and a thread team that has to wait for a preempted member stalls)
    torch_threads: int | None = Field(None, ge=1)
    checkpoint: Path | None = None  # model.pt to score with (required to serve)
    calibration: Path | None = None  # calibration JSON from `ama-stream calibrate`, watched for changes; none: the checkpoint's |z| > 3
    calibration_check_s: float = Field(1.0, gt=0)  # how often the calibration file, checkpoint file and control topic are checked
    # swap models while running: a new version of the checkpoint file (with the calibration file, or
    # without one the checkpoint's own statistics), or a model message on the control topic; loaded and
    # warmed off the loop, swapped between batches, refused if its calibration is for another model
    model_reload: bool = False
    # model messages on the control topic may only name files inside these folders (symbolic links
    # resolved first, so a link cannot lead out); empty: the folder of `checkpoint`
    model_dirs: list[Path] = []
    # shared key (AMA_CONTROL_KEY): control messages must carry its HMAC-SHA256 in a `signature`
    # header (`calibrate --publish` adds it); null: unsigned messages are accepted
    control_key: SecretStr | None = None
    drift: DriftSection = DriftSection()
    max_frames: int | None = Field(None, ge=1)  # stop after this many frames were handled
    idle_exit_s: float | None = Field(None, gt=0)  # stop after this long without a frame
    consumer: dict[str, Any] = {}  # passed to kafka-python's KafkaConsumer
    producer: dict[str, Any] = {}  # passed to kafka-python's KafkaProducer

    def allowed_model_dirs(self) -> list[Path]:
        """The folders model messages may name files in (model_dirs, else the checkpoint's folder)."""
        dirs = self.model_dirs or ([self.checkpoint.parent] if self.checkpoint is not None else [])
        return [Path(os.path.realpath(d)) for d in dirs]

    @field_validator("consumer")
    @classmethod
    def _consumer_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_pass_through("consumer", v, KafkaConsumer.DEFAULT_CONFIG, _MANAGED_CONSUMER)

    @field_validator("producer")
    @classmethod
    def _producer_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_pass_through("producer", v, KafkaProducer.DEFAULT_CONFIG, _MANAGED_PRODUCER)

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, v: str | None) -> str | None:
        if v is not None and not all(c.isalnum() or c in "._-" for c in v):
            raise ValueError("an agent id uses only letters, digits, '.', '_' and '-'")
        return v

    @model_validator(mode="after")
    def _exactly_once_clients(self):
        """exactly-once needs a read_committed consumer, an idempotent producer and a group that starts
        at the oldest frame; refuse pass-through values that would silently undo any of them."""
        if self.delivery != "exactly-once":
            return self
        if self.consumer.get("isolation_level", "read_committed") != "read_committed":
            raise ValueError("delivery exactly-once reads with consumer.isolation_level read_committed; "
                             f"remove consumer.isolation_level={self.consumer['isolation_level']!r}")
        if self.producer.get("enable_idempotence", True) is not True:
            raise ValueError("delivery exactly-once needs an idempotent producer; remove producer.enable_idempotence")
        if self.consumer.get("auto_offset_reset", "earliest") in ("latest", "largest"):
            # after a rebalance the loop re-reads each partition from its committed offset; a
            # partition with none would be re-read from the end, skipping the frames dropped with
            # the stale batches
            raise ValueError("delivery exactly-once re-reads a partition without a committed offset from its "
                             "beginning after a rebalance, so consumer.auto_offset_reset "
                             f"{self.consumer['auto_offset_reset']!r} would lose frames; use earliest (the default)")
        return self

    @property
    def exactly_once(self) -> bool:
        return self.delivery == "exactly-once"

    @property
    def transactional_id(self) -> str | None:
        """The producer's transactional id in exactly-once mode: stable per agent and group, so a
        restarted agent aborts what its previous run left open and fences a zombie of itself."""
        if not self.exactly_once:
            return None
        agent = self.agent_id or "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
        return f"ama-stream-{self.group_id}-{agent}"

    def for_log(self) -> dict[str, Any]:
        """Plain data for the start-up log line (SecretStr values come out as '**********')."""
        return self.model_dump(mode="json")


class ProduceSettings(AmaSettings):
    """What `produce` reads from the environment / a config: connection, security, producer tuning."""

    kafka: KafkaSection = KafkaSection()
    producer: dict[str, Any] = {}

    @field_validator("producer")
    @classmethod
    def _producer_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_pass_through("producer", v, KafkaProducer.DEFAULT_CONFIG, _MANAGED_PRODUCER)
