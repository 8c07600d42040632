"""`mmguard serve` as a child process (of the demo or a benchmark): on 127.0.0.1 with ports
picked by the server (port 0, read back from its log), ready once its gRPC health check says
SERVING, read through its Prometheus endpoint, and always stopped when the `with` block ends
(SIGTERM, then SIGKILL). The child stays in the parent's process group, so Ctrl-C or a group
kill reach it.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any


def mmguard_command() -> list[str]:
    """The `mmguard` script of this interpreter's environment (else the same via -m)."""
    script = Path(sys.executable).with_name("mmguard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "guard.cli"]


class GuardProcess:
    def __init__(self, artifact_dir: Path, mode: str, flags: list[str]) -> None:
        self.mode = mode
        cmd = [
            *mmguard_command(), "serve", str(artifact_dir), "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "0", "--mode", mode, *flags,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.log: deque[str] = deque(maxlen=200)  # the last lines, for an error message
        self._lines: queue.Queue[str] = queue.Queue()  # read until ready, then no longer fed
        self._ready = False
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = 0
        self.metrics_port = 0

    def __enter__(self) -> GuardProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # drained always, so the server never blocks on a pipe
            self.log.append(line)
            if not self._ready:  # nobody reads the queue after start-up: do not let it grow
                self._lines.put(line)

    def _check(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"mmguard serve --mode {self.mode} exited with {self.proc.returncode}:\n"
                + "".join(self.log)
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"mmguard serve --mode {self.mode} is not ready:\n" + "".join(self.log)
            )

    def _wait_for(self, pattern: str, deadline: float) -> re.Match[str]:
        while True:
            self._check(deadline)
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if found := re.search(pattern, line):
                return found

    def wait_serving(self, timeout_s: float = 600.0) -> None:
        """Read the ports from the log, then poll the health check until SERVING (after the
        server's warm-up)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        self.port = int(self._wait_for(r"listening on [\d.]+:(\d+)", deadline).group(1))
        found = self._wait_for(r"metrics on http://[\d.]+:(\d+)/metrics", deadline)
        self.metrics_port = int(found.group(1))
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check(deadline)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        self._ready = True
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.2)

    def samples(self) -> list[Any]:
        """Every sample the metrics endpoint exports now."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return [s for f in text_string_to_metric_families(text) for s in f.samples]

    def batch_stats(self) -> tuple[float, float]:
        """(inputs run, inference calls) so far, from the guard_batch_size histogram."""
        values = {s.name: s.value for s in self.samples() if not s.labels}
        return values.get("guard_batch_size_sum", 0.0), values.get("guard_batch_size_count", 0.0)

    def build_info(self) -> dict[str, str]:
        """The labels of guard_build_info: provider, mode, model, version."""
        return next(dict(s.labels) for s in self.samples() if s.name == "guard_build_info")

    def close(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
