"""The replica's batching loop (``service.batcher.Batcher``): batches are what queued while the model was busy."""
from __future__ import annotations

import asyncio
import time

import pytest

from vfm.service.batcher import Batcher


class SlowModel:
    """A batch function that takes ``seconds`` whatever the batch (in a thread, as the replica's model does) and
    records the batches it saw."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.to_thread(time.sleep, self.seconds)
        return [item * 10 for item in items]


async def _staggered(batcher: Batcher, count: int, gap_s: float) -> list[int]:
    async def one(i: int) -> int:
        await asyncio.sleep(i * gap_s)
        return await batcher(i)

    return await asyncio.gather(*(one(i) for i in range(count)))


def test_requests_that_queue_while_the_model_runs_form_the_next_batch() -> None:
    """No wait at all (0 s): the first request runs alone, and the ones that arrive during its 0.3 s model call
    run together as soon as it ends, in one batch, not one by one."""
    model = SlowModel(0.3)

    async def scenario() -> list[int]:
        return await _staggered(Batcher(model, max_batch_size=16, batch_wait_timeout_s=0.0), 9, 0.02)

    answers = asyncio.run(scenario())
    assert answers == [i * 10 for i in range(9)]
    assert model.batches == [[0], list(range(1, 9))]


def test_a_batch_is_capped_at_max_batch_size_and_the_rest_runs_next() -> None:
    model = SlowModel(0.2)

    async def scenario() -> list[int]:
        return await _staggered(Batcher(model, max_batch_size=4, batch_wait_timeout_s=0.0), 11, 0.01)

    assert asyncio.run(scenario()) == [i * 10 for i in range(11)]
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_an_idle_model_waits_for_company_up_to_the_wait_and_a_full_batch_leaves_at_once() -> None:
    model = SlowModel(0.0)

    async def scenario() -> tuple[float, float]:
        batcher = Batcher(model, max_batch_size=4, batch_wait_timeout_s=5.0)
        started = time.monotonic()
        await _staggered(batcher, 4, 0.05)            # full after 0.15 s: leaves then, not after 5 s
        full = time.monotonic() - started
        lone = Batcher(model, max_batch_size=4, batch_wait_timeout_s=0.3)
        started = time.monotonic()
        assert await lone(7) == 70                    # alone: runs when the wait is over
        return full, time.monotonic() - started

    full, alone = asyncio.run(scenario())
    assert model.batches == [[0, 1, 2, 3], [7]]
    assert full < 2.5
    assert alone >= 0.3


def test_a_cancelled_request_is_dropped_and_the_others_are_answered() -> None:
    model = SlowModel(0.2)

    async def scenario() -> list[int]:
        batcher = Batcher(model, max_batch_size=8, batch_wait_timeout_s=0.0)
        first = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.05)                     # 0 is running; 1, 2, 3 queue behind it
        waiting = [asyncio.create_task(batcher(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        waiting[1].cancel()                           # the client of 2 leaves
        done = await asyncio.gather(first, waiting[0], waiting[2])
        with pytest.raises(asyncio.CancelledError):
            await waiting[1]
        return done

    assert asyncio.run(scenario()) == [0, 10, 30]
    assert model.batches == [[0], [1, 3]]


def test_a_failing_batch_fails_its_own_requests_and_the_loop_goes_on() -> None:
    calls: list[list[str]] = []

    async def model(items: list[str]) -> list[str]:
        calls.append(list(items))
        await asyncio.sleep(0.1)
        if "bad" in items:
            raise RuntimeError("the model broke")
        return [item.upper() for item in items]

    async def scenario() -> tuple[list, str]:
        batcher = Batcher(model, max_batch_size=8, batch_wait_timeout_s=0.0)
        first = await asyncio.gather(batcher("bad"), return_exceptions=True)
        after = await batcher("good")
        return first, after

    first, after = asyncio.run(scenario())
    assert isinstance(first[0], RuntimeError) and "the model broke" in str(first[0])
    assert after == "GOOD"


def test_a_batch_function_must_answer_every_item() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario() -> None:
        batcher = Batcher(short, max_batch_size=8, batch_wait_timeout_s=0.05)
        await asyncio.gather(batcher(1), batcher(2))

    with pytest.raises(RuntimeError, match="answered 1 results for 2 inputs"):
        asyncio.run(scenario())


@pytest.mark.parametrize("size, wait", [(0, 0.01), (4, -1.0)])
def test_bad_settings_are_refused(size: int, wait: float) -> None:
    with pytest.raises(ValueError):
        Batcher(SlowModel(0), max_batch_size=size, batch_wait_timeout_s=wait)
