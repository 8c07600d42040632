"""The dynamic batcher alone, on asyncio: batch functions are gated on events, not sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from guard.batcher import Batcher
from guard.errors import DeadlineExceeded, InferenceFailed, InvalidInput, NotReady, QueueFull


class Recorder:
    """A batch function that records its batches and waits on `gate` before answering."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.error: BaseException | None = None
        self.short = False  # answer one result too few

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        results = [f"r{item}" for item in items]
        return results[:-1] if self.short else results


class Observer:
    def __init__(self) -> None:
        self.queued: list[float] = []
        self.sizes: list[int] = []
        self.dropped: list[str] = []

    def on_queued(self, wait_s: float) -> None:
        self.queued.append(wait_s)

    def on_batch(self, items: int) -> None:
        self.sizes.append(items)

    def on_dropped(self, reason: str) -> None:
        self.dropped.append(reason)


def run(
    test: Callable[[Batcher[Any, Any], Recorder, Observer], Awaitable[None]], **kw: Any
) -> None:
    async def main() -> None:
        fn, obs = Recorder(), Observer()
        options = {"max_batch_size": 4, "max_delay_s": 0.0, "max_queue_size": 8, **kw}
        batcher: Batcher[Any, Any] = Batcher(fn, observer=obs, **options)
        batcher.start()
        try:
            await asyncio.wait_for(test(batcher, fn, obs), 30)
        finally:
            fn.gate.set()
            await batcher.close(timeout_s=5)

    asyncio.run(main())


async def hold(batcher: Batcher[Any, Any], fn: Recorder) -> asyncio.Task[Any]:
    """Close the gate and put a first request inside the batch function."""
    fn.gate.clear()
    first = asyncio.create_task(batcher.submit("first"))
    await fn.started.wait()
    return first


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_queued_behind_a_running_batch_merge() -> None:
    async def test(b: Batcher[Any, Any], fn: Recorder, obs: Observer) -> None:
        first = await hold(b, fn)
        rest = [asyncio.create_task(b.submit(i)) for i in range(3)]
        await settle()
        assert b.depth == 3
        fn.gate.set()
        assert await first == "rfirst"
        assert await asyncio.gather(*rest) == ["r0", "r1", "r2"]
        assert fn.batches == [["first"], [0, 1, 2]]
        assert obs.sizes == [1, 3] and len(obs.queued) == 4

    run(test)


def test_the_first_request_waits_for_others_up_to_the_delay() -> None:
    async def test(b: Batcher[Any, Any], fn: Recorder, obs: Observer) -> None:
        tasks = [asyncio.create_task(b.submit("a"))]
        await settle()
        assert fn.batches == [] and b.depth == 1  # waiting for company, still counted
        tasks.append(asyncio.create_task(b.submit("b")))
        assert await asyncio.gather(*tasks) == ["ra", "rb"]
        assert fn.batches == [["a", "b"]]

    run(test, max_delay_s=0.5)  # the second request arrives long before the delay ends


def test_a_full_batch_runs_without_waiting_for_the_delay() -> None:
    async def test(b: Batcher[Any, Any], fn: Recorder, obs: Observer) -> None:
        results = await asyncio.gather(b.submit("a", size=2), b.submit("b", size=2))
        assert results == ["ra", "rb"] and fn.batches == [["a", "b"]]

    run(test, max_delay_s=60.0)


def test_sizes_are_items_and_a_request_that_does_not_fit_waits() -> None:
    async def test(b: Batcher[Any, Any], fn: Recorder, obs: Observer) -> None:
        first = await hold(b, fn)
        rest = [asyncio.create_task(b.submit(n, size=s)) for n, s in (("x", 3), ("y", 2), ("z", 1))]
        await settle()
        fn.gate.set()
        await asyncio.gather(first, *rest)
        assert fn.batches == [["first"], ["x"], ["y", "z"]]
        assert obs.sizes == [1, 3, 3]

    run(test)


def test_oversized_requests_and_a_full_queue_are_refused_at_once() -> None:
    async def test(b: Batcher[Any, Any], fn: Recorder, obs: Observer) -> None:
        with pytest.raises(InvalidInput, match=r"outside 1\.\.max_batch_size"):
            await b.submit("big", size=5)
        first = await hold(b, fn)
        queued = [asyncio.create_task(b.submit(i)) for i in range(2)]
        await settle()
        with pytest.raises(QueueFull, match="2 waiting"):
            await b.submit("one too many")
        fn.gate.set()
        await asyncio.gather(first, *queued)

    run(test, max_queue_size=2)


def test_cancelled_and_expired_requests_are_dropped_before_the_batch() -> None:
    clock = [100.0]

    async def test(b: Batcher[Any, Any], fn: Recorder, obs: Observer) -> None:
        first = await hold(b, fn)
        cancelled = asyncio.create_task(b.submit("cancelled"))
        expired = asyncio.create_task(b.submit("expired", deadline_s=101.0))
        kept = asyncio.create_task(b.submit("kept", deadline_s=200.0))
        await settle()
        cancelled.cancel()
        await settle()
        assert b.depth == 2  # the cancelled request left the queue at once
        clock[0] = 150.0
        fn.gate.set()
        with pytest.raises(DeadlineExceeded):
            await expired
        assert await kept == "rkept" and await first == "rfirst"
        assert fn.batches == [["first"], ["kept"]]
        assert sorted(obs.dropped) == ["cancelled", "deadline"]

    run(test, clock=lambda: clock[0])


def test_a_failing_batch_fails_every_request_with_the_same_error() -> None:
    async def test(b: Batcher[Any, Any], fn: Recorder, obs: Observer) -> None:
        first = await hold(b, fn)
        rest = [asyncio.create_task(b.submit(i)) for i in range(3)]
        await settle()
        fn.error = RuntimeError("device lost")
        fn.gate.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert len({id(o) for o in outcomes[1:]}) == 1  # one exception, set on each future
        fn.error = None
        assert await b.submit("after") == "rafter"

    run(test)


def test_a_wrong_number_of_results_fails_the_batch() -> None:
    async def test(b: Batcher[Any, Any], fn: Recorder, obs: Observer) -> None:
        fn.short = True
        outcomes = await asyncio.gather(b.submit("a", size=2), b.submit("b", size=2),
                                        return_exceptions=True)  # fmt: skip
        assert all(isinstance(o, InferenceFailed) for o in outcomes)
        assert "1 results for 2 requests" in str(outcomes[0])

    run(test)


def test_close_drains_then_refuses_and_nothing_is_left_waiting() -> None:
    async def main() -> None:
        fn = Recorder()
        b: Batcher[Any, Any] = Batcher(fn, max_batch_size=1, max_delay_s=60.0, max_queue_size=8)
        with pytest.raises(NotReady):
            await b.submit("before start")
        b.start()
        first = await hold(b, fn)
        queued = [asyncio.create_task(b.submit(i)) for i in range(3)]
        await settle()
        closing = asyncio.create_task(b.close(timeout_s=0.05))
        await asyncio.sleep(0.2)  # the gate is still shut: close() gives up waiting
        await closing
        outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
        assert all(isinstance(o, NotReady) for o in outcomes[1:]), outcomes
        with pytest.raises(NotReady):
            await b.submit("after close")

    asyncio.run(asyncio.wait_for(main(), 30))


def test_construction_rejects_bad_limits() -> None:
    async def fn(items: list[Any]) -> list[Any]:
        return items

    for kw, word in (({"max_batch_size": 0}, "max_batch_size"),
                     ({"max_delay_s": -1.0}, "max_delay_s"),
                     ({"max_queue_size": 0}, "max_queue_size")):  # fmt: skip
        options = {"max_batch_size": 2, "max_delay_s": 0.0, "max_queue_size": 2, **kw}
        with pytest.raises(ValueError, match=word):
            Batcher(fn, **options)
