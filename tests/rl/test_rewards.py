"""rl/rewards.py: named terms, weighted sum, batching of concurrent requests, optional-term failures."""

import asyncio
import time

import pytest
from PIL import Image

from rl.config import RewardTerm
from rl.rewards import RewardWorker, SourcePreservation


def slow(worker: RewardWorker, seconds: float) -> RewardWorker:
    """The worker, each of its scoring calls taking `seconds` longer (so that requests arrive during a call)."""
    score = worker.score

    def slow_score(*args):
        time.sleep(seconds)
        return score(*args)

    worker.score = slow_score
    return worker


def _images(n, value=0):
    return [Image.new("RGB", (8, 8), (value, value, value)) for _ in range(n)]


def test_source_preservation():
    s = SourcePreservation().score(_images(2, 0), ["a", "b"], [Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("L", (4, 4), 0)])
    assert s.tolist() == [0.0, 1.0]


class Broken:
    def score(self, *args, **kwargs):
        raise RuntimeError("judge down")


def test_weighted_sum_and_optional_failures(monkeypatch):
    worker = RewardWorker([RewardTerm("keep", "preservation", 0.5), RewardTerm("keep2", "preservation", 2.0, required=False)])
    out = worker.score(_images(2), ["a", "b"], _images(2, 255))
    assert out.total == [0.0, 0.0] and out.terms["keep"] == [0.0, 0.0]
    out = worker.score(_images(1), ["a"], _images(1))
    assert out.total == [2.5]
    worker.terms[1] = (worker.terms[1][0], Broken())
    out = worker.score(_images(3), ["a"] * 3, _images(3))
    assert out.total == [0.5] * 3 and out.errors == {"keep2": 3} and out.terms["keep2"] == [0.0] * 3
    worker.terms[0] = (worker.terms[0][0], Broken())
    with pytest.raises(RuntimeError, match="judge down"):
        worker.score(_images(1), ["a"], _images(1))
    with pytest.raises(ValueError, match="distinct names"):
        RewardWorker([RewardTerm("a", "preservation"), RewardTerm("a", "preservation")])


def test_concurrent_requests_are_batched():
    worker = RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=8, max_wait_s=0.2)

    async def many():
        # 3 requests of 2 arrive together: one call of 6 after max_wait; then 8 at once flush immediately
        first = await asyncio.gather(*[worker.score_batched(_images(2), ["a", "b"], _images(2, 255 * (i % 2))) for i in range(3)])
        second = await asyncio.gather(*[worker.score_batched(_images(4), ["a"] * 4, _images(4)) for _ in range(2)])
        return first, second

    first, second = asyncio.run(many())
    assert worker.batch_sizes == [6, 8]
    assert [r.total for r in first] == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]  # each caller gets its own rows
    assert all(r.total == [1.0] * 4 for r in second)


def test_requests_arriving_during_a_call_fill_the_next_one():
    worker = slow(RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=4, max_wait_s=0.01), 0.3)

    async def staggered():
        async def request(i):
            await asyncio.sleep(0.04 * i)  # 6 arrive one by one, each more than max_wait_s after the last
            return await worker.score_batched(_images(1), [f"{i}"], _images(1, 255 * (i % 2)))

        return await asyncio.gather(*[request(i) for i in range(7)])

    results = asyncio.run(staggered())
    # the first is scored alone; the 6 arriving during its call go as full batches (4, then the 2 left)
    assert worker.batch_sizes == [1, 4, 2]
    assert [r.total for r in results] == [[1.0 - (i % 2)] for i in range(7)]


def test_a_failed_batch_reaches_every_caller():
    worker = RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=4, max_wait_s=0.05)
    working = worker.terms[0]
    worker.terms[0] = (working[0], Broken())

    async def two_then_one():
        failed = await asyncio.gather(worker.score_batched(_images(1), ["a"], _images(1)), worker.score_batched(_images(1), ["b"], _images(1)), return_exceptions=True)
        worker.terms[0] = working  # the judge is back: the worker serves again after a failed call
        return failed, await worker.score_batched(_images(1), ["c"], _images(1))

    failed, later = asyncio.run(two_then_one())
    assert all(isinstance(r, RuntimeError) for r in failed)
    assert later.total == [1.0]


def test_a_request_cancelled_during_its_call_leaves_the_others_answered():
    """Ray cancels a request whose caller timed out; the rest of its batch still get their scores."""
    worker = slow(RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=8, max_wait_s=0.01), 0.2)

    async def three_cancel_one():
        tasks = [asyncio.ensure_future(worker.score_batched(_images(1), [f"{i}"], _images(1))) for i in range(3)]
        await asyncio.sleep(0.1)  # the call of three is running
        tasks[1].cancel()
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        return answers, await worker.score_batched(_images(2), ["a", "b"], _images(2))

    answers, later = asyncio.run(three_cancel_one())
    assert isinstance(answers[1], asyncio.CancelledError)
    assert answers[0].total == [1.0] and answers[2].total == [1.0]
    assert later.total == [1.0, 1.0] and worker.batch_sizes == [3, 2]
