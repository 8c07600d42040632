"""Dynamic batching on asyncio: concurrent requests are merged into one inference call.

After the first request of a batch arrives, the batcher waits at most `max_delay_s` for others,
up to `max_batch_size` items (a request may carry several). The queue is bounded: a request that
finds it full is refused at once with QueueFull. Requests cancelled or past their deadline while
they waited are dropped before the batch runs. The batch function must return one result per
request; when it fails (or returns the wrong number of results) every request of the batch gets
the same exception, so no caller is left waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from guard.errors import DeadlineExceeded, InferenceFailed, InvalidInput, NotReady, QueueFull

T = TypeVar("T")
R = TypeVar("R")


class BatchObserver(Protocol):
    """What the batcher reports (guard.metrics.GuardMetrics implements it)."""

    def on_queued(self, wait_s: float) -> None: ...
    def on_batch(self, items: int) -> None: ...
    def on_dropped(self, reason: str) -> None: ...


class _NoObserver:
    def on_queued(self, wait_s: float) -> None:
        pass

    def on_batch(self, items: int) -> None:
        pass

    def on_dropped(self, reason: str) -> None:
        pass


@dataclass(eq=False)  # identity comparison: deque.remove() must find this very request
class _Pending(Generic[T, R]):
    item: T
    size: int
    future: asyncio.Future[R]
    enqueued_s: float
    deadline_s: float | None


class Batcher(Generic[T, R]):
    """Merge concurrent `submit()` calls into calls of `fn(items) -> results`."""

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        clock: Callable[[], float] = time.monotonic,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not max_delay_s >= 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self._fn = fn
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue_size = max_queue_size
        self._clock = clock
        self._observer: BatchObserver = observer or _NoObserver()
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush = False  # run what is queued without waiting for more
        self._closed = False  # refuse new requests; the loop ends once the queue is empty

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not those being run)."""
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def submit(self, item: T, size: int = 1, deadline_s: float | None = None) -> R:
        """Queue `item` (carrying `size` items) and wait for its result. `deadline_s` is on the
        batcher's clock; past it the item is dropped before it runs."""
        if self._closed or self._task is None:
            raise NotReady("the server is not accepting inference requests")
        if not 1 <= size <= self._max_batch_size:
            raise InvalidInput(
                f"batch of {size} inputs is outside 1..max_batch_size ({self._max_batch_size})"
            )
        if len(self._queue) >= self._max_queue_size:
            raise QueueFull(f"the request queue is full ({self._max_queue_size} waiting)")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, size, future, self._clock(), deadline_s)
        self._queue.append(pending)
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            if pending in self._queue:  # still waiting: free its place now
                self._queue.remove(pending)
                self._observer.on_dropped("cancelled")
            raise

    def drain(self) -> None:
        """From now on run queued requests at once, without waiting for others to join them
        (shutdown has begun; requests already accepted are still taken)."""
        self._flush = True
        self._wakeup.set()

    async def close(self, timeout_s: float | None = None) -> None:
        """Refuse new requests, give the queued ones `timeout_s` to finish, then fail any still
        waiting with NotReady."""
        self._closed = True
        self.drain()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            except asyncio.TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_queued(NotReady("the server shut down before the request ran"))

    async def _loop(self) -> None:
        try:
            while not (self._closed and not self._queue):
                batch = await self._collect()
                if batch:
                    await self._run(batch)
        finally:
            self._fail_queued(NotReady("the batcher stopped before the request ran"))

    async def _collect(self) -> list[_Pending[T, R]]:
        """Wait for a first request, then for more until the batch is full, the next request
        does not fit, or max_delay_s has passed since the first one arrived. Requests stay in
        the queue (counted by `depth` and the queue bound) until the batch is taken."""
        while not self._queue:
            if self._closed:
                return []
            self._wakeup.clear()
            await self._wakeup.wait()
        close_at = self._queue[0].enqueued_s + self._max_delay_s
        while True:
            count, total = self._fitting()
            full = total >= self._max_batch_size or count < len(self._queue)
            remaining = close_at - self._clock()
            if full or self._flush or remaining <= 0 or count == 0:
                return [self._queue.popleft() for _ in range(count)]
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _fitting(self) -> tuple[int, int]:
        """How many requests from the head of the queue fit in one batch, and their items."""
        count = total = 0
        for pending in self._queue:
            if total + pending.size > self._max_batch_size:
                break
            count += 1
            total += pending.size
        return count, total

    def _live(self, batch: list[_Pending[T, R]]) -> list[_Pending[T, R]]:
        """Drop the requests cancelled or past their deadline; report the others' queue time."""
        now = self._clock()
        live = []
        for pending in batch:
            if pending.future.done():
                self._observer.on_dropped("cancelled")
            elif pending.deadline_s is not None and now >= pending.deadline_s:
                pending.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it waited in the queue")
                )
                self._observer.on_dropped("deadline")
            else:
                self._observer.on_queued(now - pending.enqueued_s)
                live.append(pending)
        return live

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        live = self._live(batch)
        if not live:
            return
        self._observer.on_batch(sum(p.size for p in live))
        try:
            results = await self._fn([p.item for p in live])
            if len(results) != len(live):
                raise InferenceFailed(
                    f"the batch function returned {len(results)} results for {len(live)} requests"
                )
        except BaseException as exc:  # the loop itself cancelled included: nobody may hang
            error = exc if isinstance(exc, Exception) else NotReady("the batcher was stopped")
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for pending, result in zip(live, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _fail_queued(self, error: Exception) -> None:
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)
