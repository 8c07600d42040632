"""`mmguard serve` as its own process: SIGTERM while a request is in flight (the request
completes, the process exits 0), and torch (or the calibrate package) is never imported."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as tc

from tests.conftest import Samples
from tests.serving import fire

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
ROOT = Path(__file__).resolve().parents[1]
# runs `mmguard` and then reports which modules of torch or calibrate were ever imported
WRAPPER = (
    "import sys\n"
    "from guard.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'calibrate'))\n"
    "print('IMPORTED=' + ','.join(bad), flush=True)\n"
    "sys.exit(code)\n"
)


class ServeProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-c", WRAPPER, "serve", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        assert self.proc.stderr is not None
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc.stderr,))
        self._pump_thread.daemon = True
        self._pump_thread.start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout_s: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.proc.poll() is None, "".join(self.log)
            try:
                line = self.lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            self.log.append(line)
            if found := re.search(pattern, line):
                return found

    def finish(self) -> str:
        """The whole stderr log once the process has exited."""
        self._pump_thread.join(30)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return "".join(self.log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture()
def serve_process(artifact_dir: Path) -> Iterator[ServeProcess]:
    # a long queue delay keeps a single request waiting in the batcher: in flight at SIGTERM
    p = ServeProcess(
        str(artifact_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--threads", "1", "--max-batch-size", "4", "--warmup-batch-sizes", "1,4",
        "--max-queue-delay-ms", "20000", "--shutdown-grace-s", "30", "--log-format", "json",
    )  # fmt: skip
    try:
        yield p
    finally:
        p.kill()


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_sigterm_lets_the_in_flight_request_finish_and_torch_is_never_imported(
    serve_process: ServeProcess, samples: Samples
) -> None:
    p = serve_process
    port = int(p.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    metrics_port = int(p.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
    p.wait_for(r"ready: model")
    client = tc.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_ready()
    result = fire(client, samples.triggered[:1], client_timeout=60)
    deadline = time.monotonic() + 30
    while _metric(metrics_port, "guard_queue_depth") != 1:
        assert not result.done(), result.exception() or "answered before it was queued?"
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.05)
    sent = time.monotonic()
    os.kill(p.proc.pid, signal.SIGTERM)
    answer = result.result(timeout=30)
    assert answer.as_numpy("flagged").tolist() == [True]
    assert time.monotonic() - sent < 15  # drained at once, not after the 20 s batching delay
    client.close()
    assert p.proc.wait(timeout=60) == 0
    assert p.proc.stdout is not None
    out = p.proc.stdout.read()
    assert "IMPORTED=\n" in out, out
    log = p.finish()
    assert '"message": "stopped"' in log
    flagged = [line for line in log.splitlines() if '"message": "flagged input"' in line]
    assert len(flagged) == 1 and '"p_value"' in flagged[0] and '"request_id"' in flagged[0]
