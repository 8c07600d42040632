"""`mmguard serve` as a child process (of the demo or a benchmark): on 127.0.0.1 with ports
picked by the server (port 0, read back from its log), ready once its gRPC health check says
SERVING, read through its Prometheus endpoint, and always stopped when the `with` block ends
(SIGTERM, then SIGKILL). The child stays in the parent's process group, so Ctrl-C or a group
kill reach it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self


def mmguard_command() -> list[str]:
    """The `mmguard` script of this interpreter's environment (else the same via -m)."""
    script = Path(sys.executable).with_name("mmguard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "guard.cli"]


def serve_command(
    artifact_dir: Path, flags: Sequence[str] = (), program: Sequence[str] | None = None
) -> list[str]:
    """`mmguard serve` (or `program serve`) on 127.0.0.1 with both ports picked by the server
    (read back from its log)."""
    return [
        *(program or mmguard_command()), "serve", str(artifact_dir), "--host", "127.0.0.1",
        "--port", "0", "--metrics-port", "0", *flags,
    ]  # fmt: skip


class ServerProcess:
    """A server command as a child process. Its stderr is drained all along by a thread that
    reads the ports from the log and keeps only the last lines (a long run logging every flagged
    input must not grow this process)."""

    def __init__(
        self, command: Sequence[str], log_lines: int = 400, cwd: Path | None = None
    ) -> None:
        self.command = list(command)
        self.proc = subprocess.Popen(
            self.command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log: deque[str] = deque(maxlen=log_lines)
        self.port = 0
        self.metrics_port = 0
        self._changed = threading.Condition()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.log.append(line)
                if found := re.search(r"listening on [\d.]+:(\d+)", line):
                    self.port = int(found.group(1))
                if found := re.search(r"metrics on http://[\d.]+:(\d+)/metrics", line):
                    self.metrics_port = int(found.group(1))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def tail(self) -> str:
        """The last lines of the server's log."""
        with self._changed:
            return "".join(self.log)

    def _name(self) -> str:
        return "mmguard serve" if "serve" in self.command else Path(self.command[0]).name

    def _check(self, deadline: float, what: str) -> None:
        if self.proc.poll() is not None:
            self._pump_thread.join(5)
            raise RuntimeError(f"{self._name()} exited with {self.proc.returncode}:\n{self.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{self._name()} is not {what}:\n{self.tail()}")

    def wait_serving(self, timeout_s: float = 600.0, metrics: bool = True) -> None:
        """Wait for the ports in the log, then poll the health check until SERVING (after the
        server's warm-up)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self.port or (metrics and not self.metrics_port):
                self._check(deadline, "listening")
                self._changed.wait(0.5)
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check(deadline, "serving")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # warming up
                time.sleep(0.1)

    def samples(self) -> list[Any]:
        """Every sample the metrics endpoint exports now."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            text = resp.read().decode()
        return [s for f in text_string_to_metric_families(text) for s in f.samples]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the metrics endpoint now, by (name, sorted labels)."""
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in self.samples()}

    def batch_stats(self) -> tuple[float, float]:
        """(inputs run, inference calls) so far, from the guard_batch_size histogram."""
        values = {s.name: s.value for s in self.samples() if not s.labels}
        return values.get("guard_batch_size_sum", 0.0), values.get("guard_batch_size_count", 0.0)

    def build_info(self) -> dict[str, str]:
        """The labels of guard_build_info: provider, mode, model, version."""
        return next(dict(s.labels) for s in self.samples() if s.name == "guard_build_info")

    def terminate(self, timeout_s: float) -> tuple[int, float]:
        """SIGTERM, then wait; returns (exit status, seconds from the signal to the exit)."""
        sent = time.monotonic()
        self.proc.terminate()
        code = self.proc.wait(timeout_s)
        return code, time.monotonic() - sent

    def close(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump_thread.join(10)


class GuardProcess(ServerProcess):
    """`mmguard serve ARTIFACT_DIR --mode MODE FLAGS...` on loopback ports."""

    def __init__(self, artifact_dir: Path, mode: str, flags: Sequence[str]) -> None:
        self.mode = mode
        super().__init__(serve_command(artifact_dir, ["--mode", mode, *flags]))

    def _name(self) -> str:
        return f"mmguard serve --mode {self.mode}"
