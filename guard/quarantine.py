"""Keep flagged inputs on disk for review, capped in total size, the oldest removed first.

Writes happen on one background thread fed by a bounded queue, so a slow disk never holds up a
request: when the queue is full the input is dropped and counted. Each input is one `.npz` with
the array exactly as received (`input`) and a JSON `meta` string (request id, classes, p-value).
File names start with a zero-padded timestamp, so name order is age order.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from guard.config import QuarantineConfig

log = logging.getLogger("guard.quarantine")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STOP = object()


class Quarantine:
    def __init__(self, config: QuarantineConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.directory = Path(config.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.max_pending)
        self._files: deque[tuple[Path, int]] = deque(
            (p, p.stat().st_size) for p in sorted(self.directory.glob("*.npz"))
        )
        self._bytes = sum(size for _, size in self._files)
        self._seq = 0
        self.kept = Counter("guard_quarantined", "Flagged inputs written", registry=registry)
        self.dropped = Counter(
            "guard_quarantine_dropped",
            "Flagged inputs not kept, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in ("queue_full", "too_large", "write_error"):
            self.dropped.labels(reason)
        size = Gauge("guard_quarantine_bytes", "Bytes kept in quarantine", registry=registry)
        size.set_function(lambda: float(self._bytes))
        self._evict()
        self._thread = threading.Thread(target=self._run, name="quarantine", daemon=True)
        self._thread.start()

    def submit(self, array: np.ndarray, meta: Mapping[str, Any]) -> None:
        """Queue one flagged input for writing; never blocks."""
        try:
            self._queue.put_nowait((np.array(array, copy=True), dict(meta)))
        except queue.Full:
            self.dropped.labels("queue_full").inc()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for at most timeout_s), then stop the writer."""
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("quarantine writer is stuck; pending inputs are lost")
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._write(*item)
            except OSError as exc:
                self.dropped.labels("write_error").inc()
                log.warning("could not write a flagged input to %s: %s", self.directory, exc)

    def _write(self, array: np.ndarray, meta: dict[str, Any]) -> None:
        self._seq += 1
        rid = _UNSAFE.sub("_", str(meta.get("request_id", "")))[:64]
        stem = f"{time.time_ns():020d}-{self._seq:06d}-{rid}-{meta.get('item', 0)}"
        tmp = self.directory / f".{stem}.tmp.npz"
        np.savez(tmp, input=array, meta=np.array(json.dumps(meta)))
        size = tmp.stat().st_size
        if size > self.config.max_bytes:
            tmp.unlink()
            self.dropped.labels("too_large").inc()
            return
        final = self.directory / f"{stem}.npz"
        os.replace(tmp, final)
        self._files.append((final, size))
        self._bytes += size
        self.kept.inc()
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self.config.max_bytes and self._files:
            path, size = self._files.popleft()
            path.unlink(missing_ok=True)  # an operator may have removed it already
            self._bytes -= size
