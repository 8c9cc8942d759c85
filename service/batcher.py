"""The model replica's batching loop: a batch is what queued while the model was busy.

One consumer per replica. When the model is free it takes everything waiting (up to ``max_batch_size``) and
runs it at once; only when the model is idle and a request arrives alone does it wait, up to
``batch_wait_timeout_s`` after that request, for company. This is the dynamic batcher of Triton and LitServe:
the slower the model, the larger the batches, and a request never waits for a batch while the model idles
longer than the configured wait.

Ray Serve's ``@serve.batch`` (2.60) is not used: it closes the next batch ``batch_wait_timeout_s`` after its
first request (or when full) even while the previous batch is still running, so a batch holds about arrival
rate x wait whatever the model's latency (docs/decisions.md). It also splits batches by
``multiplexed_model_id``, which this loop ignores (SAM encodes of different image ids share encoder runs).

``process`` is awaited on the replica's event loop; it is expected to run the model off the loop (a thread),
so that requests keep arriving, and queueing, while the model computes.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await batcher(item)`` answers ``item``'s element of ``process(batch)`` for the batch it ran in.

    ``process`` must return one result per item, in order. If it raises, every request of that batch gets the
    exception (the caller's ``process`` is where per-item failures are turned into per-item answers). A request
    cancelled while it waits (a client that left, a timeout) is dropped from the queue, never run.
    """

    def __init__(self, process: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int,
                 batch_wait_timeout_s: float):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self.process = process
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queue: deque[tuple[T, asyncio.Future, float]] = deque()
        self._arrived = asyncio.Event()
        self._consumer: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for the model (not counting the batch that runs)."""
        return sum(1 for _, future, _ in self._queue if not future.done())

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.append((item, future, loop.time()))
        self._arrived.set()
        if self._consumer is None or self._consumer.done():
            # A context of its own: the consumer must not carry the first request's context (request id,
            # multiplexed model id) into every batch after it.
            self._consumer = loop.create_task(self._consume(), name="vfm-batcher", context=contextvars.Context())
        return await future

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        just_ran = False
        while True:
            if not (just_ran and self._live()):
                # The model is idle: wait for a request, then up to the wait after it for the batch to fill.
                while not self._live():
                    await self._wait_arrival(None)
                deadline = self._queue[0][2] + self.batch_wait_timeout_s
                while self._live() < self.max_batch_size and (left := deadline - loop.time()) > 0:
                    await self._wait_arrival(left)
            # Else the model just finished a batch: what queued meanwhile runs now, without waiting.
            batch = self._take()
            just_ran = bool(batch)
            if batch:
                await self._run(batch)

    def _live(self) -> int:
        """Waiting requests, after dropping the cancelled ones at the head of the queue."""
        while self._queue and self._queue[0][1].done():
            self._queue.popleft()
        return self.queued

    async def _wait_arrival(self, timeout: float | None) -> None:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            pass

    def _take(self) -> list[tuple[T, asyncio.Future, float]]:
        batch: list[tuple[T, asyncio.Future, float]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future, arrived = self._queue.popleft()
            if not future.done():
                batch.append((item, future, arrived))
        return batch

    async def _run(self, batch: list[tuple[T, asyncio.Future, float]]) -> None:
        try:
            results = await self.process([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function answered {len(results)} results for {len(batch)} inputs")
        except Exception as exc:  # noqa: BLE001 (handed to every request of the batch; the loop goes on)
            log.exception("batch of %d failed", len(batch))
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException as exc:  # the consumer is cancelled (replica shutdown): nobody waits forever
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(RuntimeError(f"the batch was interrupted ({type(exc).__name__})"))
            raise
        for (_, future, _), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
