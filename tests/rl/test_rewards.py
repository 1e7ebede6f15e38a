"""rl/rewards.py: named terms, weighted sum, batching of concurrent requests, optional-term failures left out
of whole GRPO groups."""

import asyncio
import threading

import pytest
import torch
from PIL import Image

from reward.evaluate import SourcePreservation
from rl.algorithms import group_advantages
from rl.config import RewardTerm
from rl.rewards import RewardWorker, Scores, total_rewards


def _images(n, value=0):
    return [Image.new("RGB", (8, 8), (value, value, value)) for _ in range(n)]


def total(scores: Scores, worker: RewardWorker) -> list[float]:
    """The weighted sum with every edit its own group."""
    weights = {term.name: term.weight for term, _ in worker.terms}
    return total_rewards(scores.terms, weights, torch.arange(len(next(iter(scores.terms.values()))))).total.tolist()


def test_source_preservation():
    s = SourcePreservation().score(
        _images(2, 0), ["a", "b"], [Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("L", (4, 4), 0)]
    )
    assert s.tolist() == [0.0, 1.0]


class Broken:
    def score(self, *args, **kwargs):
        raise RuntimeError("judge down")


def test_weighted_sum_and_optional_failures(capsys):
    worker = RewardWorker(
        [RewardTerm("keep", "preservation", 0.5), RewardTerm("keep2", "preservation", 2.0, required=False)]
    )
    out = worker.score(_images(2), ["a", "b"], _images(2, 255))
    assert total(out, worker) == [0.0, 0.0] and out.terms["keep"] == [0.0, 0.0]
    out = worker.score(_images(1), ["a"], _images(1))
    assert total(out, worker) == [2.5]
    worker.terms[1] = (worker.terms[1][0], Broken())
    out = worker.score(_images(3), ["a"] * 3, _images(3))
    assert out.errors == {"keep2": 3} and out.terms["keep2"] == [None] * 3 and total(out, worker) == [0.5] * 3
    assert "optional reward term 'keep2' failed on 3 edits" in capsys.readouterr().out
    worker.terms[1] = (worker.terms[1][0], PartlyNone())
    out = worker.score(_images(2), ["x", "b"], _images(2))
    assert out.terms["keep2"] == [None, 1.0] and out.errors == {"keep2": 1}
    worker.terms[0] = (worker.terms[0][0], Broken())
    with pytest.raises(RuntimeError, match="judge down"):
        worker.score(_images(1), ["a"], _images(1))
    worker.terms[0] = (worker.terms[0][0], PartlyNone())
    with pytest.raises(ValueError, match="required reward term 'keep' could not score 1 of 2 edits"):
        worker.score(_images(2), ["x", "b"], _images(2))
    with pytest.raises(ValueError, match="distinct names"):
        RewardWorker([RewardTerm("a", "preservation"), RewardTerm("a", "preservation")])


class PartlyNone:
    """A term that cannot score instructions starting with 'x' (TRL's None: not applicable)."""

    def score(self, source_images, instructions, edited_images, batch_size=0):
        return [None if i.startswith("x") else 1.0 for i in instructions]


class Recording:
    """A term that remembers the batch sizes it was asked to forward."""

    def __init__(self):
        self.batch_sizes = []

    def score(self, source_images, instructions, edited_images, batch_size=0):
        self.batch_sizes.append(batch_size)
        return torch.ones(len(instructions))


def test_each_term_forwards_its_own_micro_batch():
    """reward.max_batch_size is how many edits the actor gathers; each term forwards its micro_batch_size."""
    worker = RewardWorker(
        [RewardTerm("a", "preservation", micro_batch_size=3), RewardTerm("b", "preservation", micro_batch_size=5)],
        max_batch_size=8,
    )
    a, b = Recording(), Recording()
    worker.terms = [(worker.terms[0][0], a), (worker.terms[1][0], b)]
    worker.score(_images(8), ["i"] * 8, _images(8))
    assert a.batch_sizes == [3] and b.batch_sizes == [5] and worker.batch_sizes == [8]


def test_a_term_missing_in_part_of_a_group_is_left_out_of_that_whole_group():
    """Group 1's first two rows lack the optional term: the group's advantages are exactly those of a run
    without the term, and groups 0 and 2 are unchanged (GRPO's group std; the batch std would couple them)."""
    group_ids = torch.arange(3).repeat_interleave(4)
    judge = [0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.4, 0.6, 0.7, 0.7, 0.1, 0.0]
    aux = [0.3, 0.9, 0.2, 0.4, 0.5, 0.1, 0.9, 0.3, 0.6, 0.2, 0.8, 0.1]
    weights = {"judge": 1.0, "aux": 0.5}
    gap = aux[:4] + [None, None] + aux[6:]
    with_gap = total_rewards({"judge": judge, "aux": gap}, weights, group_ids)
    everywhere = total_rewards({"judge": judge, "aux": aux}, weights, group_ids).total
    nowhere = total_rewards({"judge": judge}, weights, group_ids).total
    assert with_gap.dropped_groups == {"judge": 0, "aux": 1}
    group = group_ids == 1
    assert torch.equal(with_gap.total[group], nowhere[group]) and torch.equal(
        with_gap.total[~group], everywhere[~group]
    )
    adv = group_advantages(with_gap.total, group_ids, "group", clip=5.0).advantages
    assert torch.equal(adv[group], group_advantages(nowhere, group_ids, "group", clip=5.0).advantages[group])
    assert torch.equal(adv[~group], group_advantages(everywhere, group_ids, "group", clip=5.0).advantages[~group])
    # with every row of a group scored alone (evaluation), only the rows that lack the term go without it
    alone = total_rewards({"judge": judge, "aux": gap}, weights, torch.arange(12)).total
    assert torch.equal(alone[4:6], nowhere[4:6]) and torch.equal(alone[6:8], everywhere[6:8])


def test_a_failing_call_that_splits_a_group_drops_the_term_for_the_group():
    """The actor's calls split groups (micro-batches of 2, groups of 4): the optional term raising on one call
    costs its group that term for all 4 rows, through the worker's Scores and the driver's sum."""
    worker = RewardWorker(
        [RewardTerm("keep", "preservation", 1.0), RewardTerm("flaky", "preservation", 1.0, required=False)]
    )
    flaky = worker.terms[1]
    group_ids = torch.arange(2).repeat_interleave(4)
    parts = []
    for i in range(0, 8, 2):
        worker.terms[1] = (flaky[0], Broken()) if i == 2 else flaky  # fails on rows 2-3: half of group 0
        parts.append(worker.score(_images(2), ["a", "b"], _images(2, 255 * (i // 2 % 2))))
    scores = Scores.cat(parts)
    assert scores.errors == {"flaky": 2}
    result = total_rewards(scores.terms, {"keep": 1.0, "flaky": 1.0}, group_ids)
    assert result.total.tolist() == [1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0] and result.dropped_groups == {
        "keep": 0,
        "flaky": 1,
    }


def test_concurrent_requests_are_batched():
    worker = RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=8, max_wait_s=0.2)

    async def many():
        # 3 requests of 2 arrive together: one call of 6 after max_wait; then 8 at once flush immediately
        first = await asyncio.gather(
            *[worker.score_batched(_images(2), ["a", "b"], _images(2, 255 * (i % 2))) for i in range(3)]
        )
        second = await asyncio.gather(*[worker.score_batched(_images(4), ["a"] * 4, _images(4)) for _ in range(2)])
        return first, second

    first, second = asyncio.run(many())
    assert worker.batch_sizes == [6, 8]
    assert [r.terms["keep"] for r in first] == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]  # each caller gets its own rows
    assert all(r.terms["keep"] == [1.0] * 4 for r in second)


def test_a_request_from_every_client_starts_the_call_without_waiting():
    """max_wait_s is an hour: the call can only have started because every client's request was in."""
    worker = RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=64, max_wait_s=3600.0, clients=2)

    async def two_clients():
        both = [worker.score_batched(_images(2), ["a", "b"], _images(2)) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*both), timeout=60)  # a hang guard, not a timing
        taken = worker.take_batch_sizes()
        one = asyncio.create_task(worker.score_batched(_images(1), ["c"], _images(1)))
        for _ in range(20):  # let the loop run whatever it has to run
            await asyncio.sleep(0)
        done = one.done()
        one.cancel()
        return taken, done

    taken, one_done = asyncio.run(two_clients())
    assert taken == [4]  # both clients' requests: scored together at once
    assert not one_done  # one request of two clients: the other may still come, so it waits


def gated(worker: RewardWorker) -> tuple[RewardWorker, threading.Semaphore]:
    """The worker, each of its scoring calls waiting for a permit of the returned semaphore (so the test decides
    which requests arrive during a call)."""
    gate = threading.Semaphore(0)
    score = worker.score

    def gated_score(*args):
        assert gate.acquire(timeout=60), "the test never opened the gate"
        return score(*args)

    worker.score = gated_score
    return worker, gate


def test_requests_arriving_during_a_call_fill_the_next_one():
    worker, gate = gated(
        RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=4, max_wait_s=3600.0, clients=1)
    )

    async def during_a_call():
        def request(i):
            return asyncio.ensure_future(worker.score_batched(_images(1), [f"{i}"], _images(1, 255 * (i % 2))))

        first = request(0)
        while worker._task is None:  # the first call has started (a lone request of a lone client never waits)
            await asyncio.sleep(0)
        rest = [request(i) for i in range(1, 7)]  # 6 arrive while it runs
        for _ in range(3):
            gate.release()
        return await asyncio.wait_for(asyncio.gather(first, *rest), timeout=60)

    results = asyncio.run(during_a_call())
    # the first is scored alone; the 6 that arrived during its call go as full batches (4, then the 2 left)
    assert worker.batch_sizes == [1, 4, 2]
    assert [r.terms["keep"] for r in results] == [[1.0 - (i % 2)] for i in range(7)]


def test_a_failed_batch_reaches_every_caller():
    worker = RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=4, max_wait_s=0.05)
    working = worker.terms[0]
    worker.terms[0] = (working[0], Broken())

    async def two_then_one():
        failed = await asyncio.gather(
            worker.score_batched(_images(1), ["a"], _images(1)),
            worker.score_batched(_images(1), ["b"], _images(1)),
            return_exceptions=True,
        )
        worker.terms[0] = working  # the judge is back: the worker serves again after a failed call
        return failed, await worker.score_batched(_images(1), ["c"], _images(1))

    failed, later = asyncio.run(two_then_one())
    assert all(isinstance(r, RuntimeError) for r in failed)
    assert later.terms["keep"] == [1.0]


def test_a_request_cancelled_during_its_call_leaves_the_others_answered():
    """Ray cancels a request whose caller timed out; the rest of its batch still get their scores."""
    worker, gate = gated(
        RewardWorker([RewardTerm("keep", "preservation")], max_batch_size=8, max_wait_s=3600.0, clients=3)
    )

    async def three_cancel_one():
        tasks = [asyncio.ensure_future(worker.score_batched(_images(1), [f"{i}"], _images(1))) for i in range(3)]
        while worker._task is None:  # the call of three is running (held at the gate)
            await asyncio.sleep(0)
        tasks[1].cancel()
        gate.release()
        answers = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
        gate.release()
        worker.clients = 1  # the later request comes alone
        return answers, await asyncio.wait_for(worker.score_batched(_images(2), ["a", "b"], _images(2)), timeout=60)

    answers, later = asyncio.run(three_cancel_one())
    assert isinstance(answers[1], asyncio.CancelledError)
    assert answers[0].terms["keep"] == [1.0] and answers[2].terms["keep"] == [1.0]
    assert later.terms["keep"] == [1.0, 1.0] and worker.batch_sizes == [3, 2]
