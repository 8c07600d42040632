"""Faults (reliability), each under load:

- SIGTERM to `mmguard serve` (a child process whose device is slowed, so the drain lasts long
  enough to watch) while 64 clients in another process keep it busy: every request accepted
  before the signal is answered, and answered right; later ones are answered or refused with
  UNAVAILABLE, none lost, none cancelled; health says NOT_SERVING while the queue drains, and the
  Watch stream then ends; the process exits 0 within the grace period;
- clients cancelling and hitting their deadlines all the while: no task, queued request or
  in-flight count is left behind, and the server answers at once afterwards;
- a request over the message limit: a clean RESOURCE_EXHAUSTED, and the channel goes on;
- the metrics endpoint scraped concurrently, jammed with stalled connections and hung up on
  mid-answer: serving unaffected; a metrics port already taken: startup refused, naming it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from benchmarks.checked_load import LoadProcess, load_command, save_pool
from benchmarks.reliability import (
    Answer,
    answers,
    build_pool,
    check_records,
    expected_answers,
    metric,
    read_records,
)
from guard.artifact import Artifact
from guard.engine import Outputs
from guard.process import ServerProcess, serve_command
from tests.conftest import Samples
from tests.helpers import run_cli
from tests.serving import ServerThread, infer_request, raw_stub, running, serve_config

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # the artifact is calibrated with torch
MODEL = "tiny"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE_S = 10.0
BATCH_DELAY_S = 0.03  # the slowed device of the SIGTERM test: batches of at most 4 take this


@pytest.fixture(scope="module")
def pool(
    engine: Any, samples: Samples, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Answer]]:
    """Single images and batches of up to 4, triggered and clean, saved for the load process,
    with in-process inference's answers."""
    candidates = [*samples.triggered_u8, *samples.clean]
    entries = build_pool(engine, candidates, max_batch_size=4, singles=8)
    path = tmp_path_factory.mktemp("pool") / "pool.npz"
    save_pool(path, entries)
    return path, expected_answers(engine, entries)


def _wait_for_ok_answers(server: ServerProcess, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    ok = 0.0
    while (ok := metric(server.metrics(), "guard_requests_total", method="ModelInfer",
                        outcome="success", code="OK")) < count:  # fmt: skip
        assert time.monotonic() < deadline, f"only {ok:.0f} answers after {timeout_s} s"
        time.sleep(0.1)


class HealthWatch:
    """A Health.Watch stream read by a thread: each status with its time.monotonic(), and how
    (status code name) and when the stream ended."""

    def __init__(self, url: str) -> None:
        self.channel = grpc.insecure_channel(url)
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)
        self.events: list[tuple[int, float]] = []
        self.ended: tuple[str, float] | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.events.append((message.status, time.monotonic()))
            self.ended = ("OK", time.monotonic())
        except grpc.RpcError as exc:
            self.ended = (exc.code().name, time.monotonic())

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)
        self.channel.close()


def test_sigterm_under_load_answers_every_accepted_request_and_exits_within_the_grace(
    artifact_dir: Path, tmp_path: Path, pool: tuple[Path, list[Answer]]
) -> None:
    pool_path, expected = pool
    slow_device = [sys.executable, "-m", "tests.faulty_serve", "--batch-delay-s",
                   str(BATCH_DELAY_S)]  # fmt: skip
    flags = ["--threads", "1", "--max-batch-size", "4", "--warmup-batch-sizes", "1",
             "--shutdown-grace-s", str(GRACE_S), "--log-format", "json"]  # fmt: skip
    records = tmp_path / "records.jsonl"
    command = serve_command(artifact_dir, flags, program=slow_device)
    with ServerProcess(command, cwd=Path(__file__).resolve().parents[1]) as server:
        server.wait_serving()
        watch = HealthWatch(server.url)
        load = LoadProcess(load_command(server.url, MODEL, pool_path, records, clients=64,
                                        duration_s=300, until_refused=True))  # fmt: skip
        try:
            _wait_for_ok_answers(server, 200)
            assert [s for s, _ in watch.events] == [SERVING]
            t_term = time.monotonic()
            code, exit_s = server.terminate(timeout_s=GRACE_S + 30)
            summary = load.result(timeout_s=120)
            watch.thread.join(10)
        finally:
            load.kill()
            watch.close()
    log = server.tail()

    verdict = check_records(records, expected, summary["sent"], allowed=("OK", "UNAVAILABLE"))
    assert verdict.problems == [], verdict  # none lost, twice, wrong, cancelled or failed
    recs = list(read_records(records))
    accepted = [r for r in recs if r["t_sent"] < t_term - 0.05]  # on the server at the signal
    assert len(accepted) >= 200 and {r["status"] for r in accepted} == {"OK"}
    drained = [r for r in accepted if r["t_done"] > t_term]
    assert len(drained) >= 16, "the queue should hold many requests at the signal"
    # health said NOT_SERVING at once, while the accepted requests were still being answered,
    # and then ended the stream (it does not hold the shutdown until the grace runs out)
    assert [s for s, _ in watch.events] == [SERVING, NOT_SERVING]
    t_not_serving = watch.events[1][1]
    assert t_term < t_not_serving < max(r["t_done"] for r in drained)
    assert watch.ended is not None and watch.ended[0] == "OK"
    assert code == 0 and exit_s < GRACE_S, (code, exit_s, log)
    assert '"message": "stopped"' in log


# ---------------------------------------------------------------------------------------------
# cancellations and deadlines


class SlowEngine:
    """The real engine with each batch 20 ms slower: requests queue up, so cancellations and
    deadlines catch them both waiting and running."""

    def __init__(self, artifact: Artifact, device: Any, threads: int) -> None:
        from guard.engine import GuardEngine

        self._engine = GuardEngine(artifact, device, threads)
        self.providers = self._engine.providers

    def logits(self, x: np.ndarray) -> Outputs:
        time.sleep(0.02)
        return self._engine.logits(x)

    def original_logits(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x)[0]


async def _other_tasks() -> list[str]:
    """What the server's event loop runs besides this coroutine, described."""
    return sorted(
        f"{t.get_name()}: {t.get_coro()!r}"
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task()
    )


def _settle(srv: ServerThread, max_tasks: int, timeout_s: float = 20) -> None:
    """Wait until nothing is in flight or queued, the loop runs no more tasks than `max_tasks`
    (gRPC's own, the batcher's) and none of this package's coroutines but the batcher's loop.
    A task left behind per cancelled or expired request would show in thousands."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = srv.call(_other_tasks())
        ours = [t for t in running if "<coroutine object" in t and not t.startswith("batcher:")]
        state = (
            srv.sample("guard_inflight_requests"),
            srv.server.dataplane.batcher.depth,
            len(running) <= max_tasks and not ours,
        )
        if state == (0, 0, True):
            return
        assert time.monotonic() < deadline, (
            f"(in flight, queued, tasks ok) stays {state}; {len(running)} tasks, "
            f"at most {max_tasks} expected: {running[:20]}"
        )
        time.sleep(0.05)


def test_cancellations_and_deadlines_under_load_leak_nothing_and_serving_goes_on(
    artifact_dir: Path, tmp_path: Path, pool: tuple[Path, list[Answer]], samples: Samples,
    engine: Any,
) -> None:  # fmt: skip
    """The server runs in this process (its event loop can be inspected), the 48 clients in the
    load process: a third wait for their answers, a third give each request a 5-100 ms deadline,
    a third cancel each request after 2-50 ms."""
    pool_path, expected = pool
    records = tmp_path / "records.jsonl"
    x = samples.triggered[:1]
    with running(serve_config(artifact_dir), SlowEngine) as srv:
        channel, stub = raw_stub(srv.url)
        stub.ModelInfer(infer_request(MODEL, x), timeout=30)
        baseline = len(srv.call(_other_tasks()))
        kinds = ("plain", "deadline", "cancel")
        cmd = load_command(srv.url, MODEL, pool_path, records, clients=48, duration_s=4.0,
                           kinds=kinds)  # fmt: skip
        load = LoadProcess(cmd)
        try:
            summary = load.result(timeout_s=120)
        finally:
            load.kill()
        allowed = ("OK", "DEADLINE_EXCEEDED", "CLIENT_CANCELLED")
        verdict = check_records(records, expected, summary["sent"], allowed=allowed)
        assert verdict.problems == []  # every answer once, OK ones right, no other status
        by_kind: dict[str, Counter[str]] = {}
        for rec in read_records(records):
            by_kind.setdefault(rec["kind"], Counter())[rec["status"]] += 1
        assert set(by_kind["plain"]) == {"OK"} and by_kind["plain"]["OK"] > 50, by_kind
        assert by_kind["deadline"]["DEADLINE_EXCEEDED"] > 0, by_kind
        assert by_kind["cancel"]["CLIENT_CANCELLED"] > 0, by_kind
        _settle(srv, baseline)
        # the server saw both, and dropped some requests from the queue before they ran
        for code in ("CANCELLED", "DEADLINE_EXCEEDED"):
            assert srv.sample("guard_requests_total", method="ModelInfer", outcome="cancelled",
                              code=code) > 0, code  # fmt: skip
        assert srv.sample("guard_dropped_requests_total", reason="cancelled") > 0
        started = time.monotonic()
        result = stub.ModelInfer(infer_request(MODEL, x), timeout=30)
        assert time.monotonic() - started < 5
        label = np.frombuffer(result.raw_output_contents[0], "<i8").tolist()
        assert label == answers(engine, x).label.tolist()
        channel.close()


# ---------------------------------------------------------------------------------------------
# the message limit


def test_a_request_over_the_message_limit_gets_resource_exhausted_and_the_channel_goes_on(
    artifact_dir: Path, samples: Samples, engine: Any
) -> None:
    # one 3x16x16 FP32 image is 3 KiB: two and their framing are just over a 6 KiB limit
    limit = 6 * 1024
    x = np.concatenate([samples.triggered, samples.clean])
    with running(serve_config(artifact_dir, max_message_bytes=limit)) as srv:
        channel, stub = raw_stub(srv.url)
        for over in (x[:2], x, np.concatenate([x, x])):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(infer_request(MODEL, over), timeout=30)
            err: Any = info.value
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in err.details()
            ok = stub.ModelInfer(infer_request(MODEL, x[:1]), timeout=30)  # the same channel
            label = np.frombuffer(ok.raw_output_contents[0], "<i8")
            assert label.tolist() == answers(engine, x[:1]).label.tolist()
        channel.close()
        client = tc.InferenceServerClient(srv.url)  # stock tritonclient sees the same
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as tinfo:
            client.infer(MODEL, [inp], client_timeout=30)
        assert tinfo.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        client.close()
        assert srv.sample("guard_inferences_total") == 3  # only the three that fit ran
        assert srv.sample("guard_requests_total", method="ModelInfer", outcome="error",
                          code="INTERNAL") == 0  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the metrics endpoint


@pytest.fixture()
def real_server(artifact_dir: Path) -> Iterator[ServerProcess]:
    flags = ["--threads", "1", "--max-batch-size", "4", "--warmup-batch-sizes", "1"]
    with ServerProcess(serve_command(artifact_dir, flags)) as server:
        server.wait_serving()
        yield server


def _jam(port: int) -> list[socket.socket]:
    """Connections that leave the metrics server hanging: 8 that never send a byte, 8 that send
    half a request and stop, 4 that ask and never read (a tiny receive window)."""
    jams = []
    for kind in ["silent"] * 8 + ["half"] * 8 + ["unread"] * 4:
        s = socket.socket()
        if kind == "unread":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(("127.0.0.1", port))
        if kind == "half":
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        elif kind == "unread":
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        jams.append(s)
    return jams


def _hang_up_mid_answer(port: int) -> None:
    """Ask for the metrics and reset the connection (RST) before reading any of it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    s.close()


def test_concurrent_and_jammed_metrics_scrapes_leave_serving_unaffected(
    real_server: ServerProcess, tmp_path: Path, pool: tuple[Path, list[Answer]]
) -> None:
    pool_path, expected = pool
    port = real_server.metrics_port
    jams = _jam(port)
    scrapes: Counter[str] = Counter()
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                    ok = r.status == 200 and b"guard_requests_total" in r.read()
                scrapes["ok" if ok else "bad"] += 1
            except OSError as exc:
                scrapes[type(exc).__name__] += 1
            _hang_up_mid_answer(port)

    scrapers = [threading.Thread(target=scrape) for _ in range(6)]
    records = tmp_path / "records.jsonl"
    load = LoadProcess(load_command(real_server.url, MODEL, pool_path, records, clients=16,
                                    duration_s=3.0, server_pid=real_server.pid))  # fmt: skip
    for t in scrapers:
        t.start()
    try:
        summary = load.result(timeout_s=120)
    finally:
        stop.set()
        for t in scrapers:
            t.join(60)
        load.kill()
    verdict = check_records(records, expected, summary["sent"])
    assert verdict.problems == [] and summary["errors"] == 0 and summary["sent"] > 100
    assert scrapes["ok"] > 10 and set(scrapes) == {"ok"}, scrapes
    for s in jams:
        s.close()
    samples = real_server.metrics()  # still answers after all that
    assert metric(samples, "guard_requests_total", method="ModelInfer", outcome="success",
                  code="OK") == verdict.ok  # fmt: skip


def test_a_taken_metrics_port_refuses_startup_naming_the_port(artifact_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(["serve", str(artifact_dir), "--host", "127.0.0.1", "--port", "0",
                                "--metrics-port", str(port), "--threads", "1",
                                "--warmup-batch-sizes", "1"])  # fmt: skip
    assert code == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in err and "Traceback" not in err
