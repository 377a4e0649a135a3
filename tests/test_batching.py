"""The batcher behind finetune serve: concurrent items share calls, results come back to their own callers in
order, batches and the queue stay bounded, a failure reaches every waiting caller and the loop goes on."""

import asyncio
import threading

import pytest

from finetune.serving.batching import Batcher, Busy


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_calls_run_off_the_event_loop_and_return_in_order():
    calls, threads = [], set()

    def square(items):
        calls.append(list(items))
        threads.add(threading.current_thread().name)
        return [x * x for x in items]

    async def main():
        b = Batcher(square, max_batch=4, max_wait_s=0.05, max_queue=100)
        await b.start()
        results = await asyncio.gather(*(b.submit([i]) for i in range(10)), b.submit([20, 21]))
        await b.stop()
        return results, b.stats

    results, stats = _run(main())
    assert results == [[i * i] for i in range(10)] + [[400, 441]]
    assert all(len(c) <= 4 for c in calls) and len(calls) == 3  # 12 items, at most 4 a call
    assert stats.items == 12 and stats.batches == 3 and stats.largest == 4
    assert threads == {"finetune-inference_0"} and threading.main_thread().name not in threads


def test_a_lone_item_waits_at_most_max_wait():
    async def main():
        b = Batcher(lambda items: items, max_batch=64, max_wait_s=0.02, max_queue=10)
        await b.start()
        t0 = asyncio.get_running_loop().time()
        await b.submit(["x"])
        waited = asyncio.get_running_loop().time() - t0
        await b.stop()
        return waited

    assert _run(main()) < 1.0  # the batch closed after max_wait, not when 64 items had come


def test_a_full_queue_refuses_at_once_and_a_failure_reaches_every_caller_then_the_loop_goes_on():
    release = threading.Event()
    fail = [True]

    def run(items):
        release.wait(5)
        if fail[0]:
            raise RuntimeError("model broke")
        return items

    async def main():
        b = Batcher(run, max_batch=2, max_wait_s=0.0, max_queue=3)
        await b.start()
        first = asyncio.ensure_future(b.submit([1]))  # taken by the loop, blocks in run()
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit([2, 3, 4]))  # fills the queue of 3
        await asyncio.sleep(0.01)
        with pytest.raises(Busy):
            await b.submit([5])
        release.set()
        outcomes = await asyncio.gather(first, queued, return_exceptions=True)
        fail[0] = False
        after = await b.submit([6])
        await b.stop()
        return outcomes, after

    outcomes, after = _run(main())
    assert all(isinstance(o, RuntimeError) and str(o) == "model broke" for o in outcomes)
    assert after == [6]
