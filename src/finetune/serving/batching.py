"""Dynamic batching for a server: single items from concurrent requests are collected into one call of a batch
function, run in its own thread so the event loop stays free. A batch starts with the first waiting item and
closes after a short wait or at its size limit; the queue of waiting items is bounded (a full queue refuses at
once rather than letting latency grow without end)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class Busy(Exception):
    """The queue cannot take the items now; the caller should answer 503 and let the client retry."""


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0


class Batcher:
    """await submit(items) -> their results, computed by run(list of items) -> list of results, in batches."""

    def __init__(self, run: Callable[[list], Sequence], max_batch: int = 16, max_wait_s: float = 0.01,
                 max_queue: int = 256):
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="finetune-inference")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop after the batch being computed; items still queued get Busy."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(Busy())
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    @property
    def in_flight(self) -> int:
        """Items submitted whose results are not back yet (queued, collected or computing)."""
        return self._in_flight

    async def submit(self, items: Sequence) -> list:
        """The results of items (all or none are queued), in order. Raises Busy when the queue is full."""
        if self._queue is None:
            raise Busy()
        if self._queue.qsize() + len(items) > self.max_queue:
            raise Busy()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self._queue.put_nowait((item, future))
        self._in_flight += len(items)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self._in_flight -= len(items)

    async def _collect(self) -> list:
        """The next batch: the first waiting item, then whatever arrives within max_wait, up to max_batch."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # done: its client went away

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self.run, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - every waiting request hears of the failure, the loop goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
