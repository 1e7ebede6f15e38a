"""The reward side of RL: named reward terms, the worker that scores edits in batches, and their weighted sum.

A term is anything with reward's `score(source_images, instructions, edited_images, batch_size)`:
JRM (`jrm:PATH`), the generative judge (`generative:PATH`), the ShapeEdit oracle (`oracle:DIR`) or the
source-preservation term (`preservation`), all built by reward/evaluate.py load_reward; it forwards
`batch_size` (the term's `micro_batch_size`) edits at a time.
The worker's `score_batched` gathers requests from all rollout workers (up to `max_batch_size` edits or
`max_wait_s`) and scores them in one call; requests that arrive while a call runs wait for it and go together
into the next. It is a plain asyncio method, so the same class runs in a unit test and as a Ray async actor.

An optional term that cannot score an edit gives None for it (TRL's convention for reward functions: not
applicable); one that raises gives None for every edit of the call. The worker returns each term's scores;
the driver sums them with `total_rewards`, which knows the GRPO groups and leaves a term out of every row of
a group where it is missing for any row (scoring rows of one group with different terms would invent
advantages).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torch import Tensor

from reward.evaluate import load_reward
from rl.config import RewardTerm


@dataclass
class Scores:
    terms: dict[
        str, list[float | None]
    ]  # each term's raw score per edit, by name; None: the (optional) term could not score it
    errors: dict[str, int]  # per optional term, the edits it could not score (only terms with some)

    @staticmethod
    def cat(parts: list[Scores]) -> Scores:
        """The scores of consecutive batches as one (terms concatenated in order, errors added)."""
        errors: dict[str, int] = {}
        for p in parts:
            for name, n in p.errors.items():
                errors[name] = errors.get(name, 0) + n
        return Scores({name: [x for p in parts for x in p.terms[name]] for name in parts[0].terms}, errors)


@dataclass
class Judged:
    """What an evaluation's edits got from a reward actor: every term's scores and the gold judge's."""

    scores: Scores
    gold: list[float] | None  # one per edit; None: the run has no gold judge


@dataclass
class RewardTotal:
    total: Tensor  # (B,) float32: the weighted sum of the terms each row's group kept
    dropped_groups: dict[str, int]  # per term, the groups scored without it (one of their rows lacked its score)


def total_rewards(terms: dict[str, list[float | None]], weights: dict[str, float], group_ids: Tensor) -> RewardTotal:
    """The reward of each row: the weighted sum of its terms, a term left out of a whole group when it is
    missing (None) for any row of the group.

    GRPO's advantages compare the rows of a group, so every row of a group must be scored by the same terms:
    a group that lacks a term is scored exactly as if the term were absent (its weight dropped for that
    group), and the other groups keep it. A NaN score is not "missing": it stays, and the driver skips the step.

    Args:
        terms: name -> B scores (floats, or None where the term could not score the row).
        weights: name -> the term's weight.
        group_ids: (B,) int, rows with one id form a group (edits of one prompt); `torch.arange(B)` scores rows alone.
    Returns:
        RewardTotal: the (B,) totals and, per term, how many groups went without it.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if len(inverse) else 0
    total = torch.zeros(len(group_ids), dtype=torch.float64)
    dropped = {}
    for name, values in terms.items():
        if len(values) != len(group_ids):
            raise ValueError(f"reward term {name!r} has {len(values)} scores for {len(group_ids)} rows")
        missing = torch.tensor([v is None for v in values], dtype=torch.bool)
        group_lacks = torch.zeros(num_groups, dtype=torch.bool)
        group_lacks[inverse[missing]] = True
        kept = ~group_lacks[inverse]
        scores = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float64)
        total += torch.where(kept, weights[name] * scores, 0.0)
        dropped[name] = int(group_lacks.sum())
    return RewardTotal(total.float(), dropped)


class RewardWorker:
    """Scores edits with every term; batches concurrent requests (see module docstring)."""

    def __init__(
        self,
        terms: list[RewardTerm],
        device: str = "cpu",
        max_batch_size: int = 64,
        max_wait_s: float = 0.05,
        threads: int = 0,
        clients: int = 0,
        gold: str = "",
        refreshed: Callable[[], tuple[str, dict] | None] | None = None,
    ):
        """`max_batch_size`: edits gathered into one call (reward.max_batch_size); each term then forwards them
        `term.micro_batch_size` at a time. `clients`: the rollout workers this actor serves (its node's), 0 if
        unknown: once that many requests wait, no more can be coming soon, so the call starts without waiting.
        `gold`: the held-out judge of evaluations (a reward spec, '' = none), which only `judge` calls.
        `refreshed`: in a reward actor that Ray restarted during a run whose reward is refreshed, the refreshed
        term's name and latest tensors (rl/refresh.py latest_weights), loaded before it scores anything."""
        if threads:
            torch.set_num_threads(threads)
        names = [t.name for t in terms]
        if not terms or len(set(names)) != len(names):
            raise ValueError(f"reward terms need distinct names and at least one term, got {names}")
        self.terms = [(t, load_reward(t.spec, device)) for t in terms]
        self.gold = load_reward(gold, device) if gold else None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.clients = clients
        self._pending: list[tuple[list, list, list, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = (
            None  # the scoring call running, if any (held: the loop keeps weak references)
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one scoring call at a time
        self.batch_sizes: list[int] = []
        found = refreshed() if refreshed is not None else None
        if found is not None:
            self.load_term_weights(*found)

    def score(
        self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image]
    ) -> Scores:
        """Every term on this batch, now. A required term that raises propagates, and one that gives None for an
        edit raises; an optional term that raises gives None for every edit (printed and counted)."""
        n = len(edited_images)
        terms, errors = {}, {}
        for term, reward in self.terms:
            try:
                values = reward.score(source_images, instructions, edited_images, batch_size=term.micro_batch_size)
                if isinstance(values, torch.Tensor):
                    if values.shape != (n,):
                        raise ValueError(
                            f"reward term {term.name!r} returned shape {tuple(values.shape)} for {n} edits"
                        )
                    values = values.float().tolist()
                values = [None if v is None else float(v) for v in values]
                if len(values) != n:
                    raise ValueError(f"reward term {term.name!r} returned {len(values)} scores for {n} edits")
            except Exception as e:
                if term.required:
                    raise
                print(
                    f"optional reward term {term.name!r} failed on {n} edits (left out of their groups): "
                    f"{type(e).__name__}: {e}",
                    flush=True,
                )
                values = [None] * n
            missing = sum(v is None for v in values)
            if missing and term.required:
                raise ValueError(
                    f"required reward term {term.name!r} could not score {missing} of {n} edits (returned None)"
                )
            if missing:
                errors[term.name] = missing
            terms[term.name] = values
        self.batch_sizes.append(n)
        return Scores(terms, errors)

    def judge(
        self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image]
    ) -> Judged:
        """An evaluation's edits: every term's scores and the gold judge's, in one unbatched call (evaluations are
        rare; their edits never leave the node that made them)."""
        gold = None
        if self.gold is not None:
            gold = [
                float(v)
                for v in self.gold.score(source_images, instructions, edited_images, batch_size=self.max_batch_size)
            ]
        return Judged(self.score(source_images, instructions, edited_images), gold)

    def load_term_weights(self, name: str, state: dict) -> None:
        """A refreshed term's new tensors (rl/refresh.py RewardTrainer.trainable_state), loaded between RL steps."""
        model = next(reward for term, reward in self.terms if term.name == name)
        params = dict(model.named_parameters())
        if not state.keys() <= params.keys():
            raise ValueError(f"reward term {name!r}: the refreshed tensors are not this model's parameters")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(torch.as_tensor(value))

    def take_batch_sizes(self) -> list[int]:
        """The edits of each scoring call since the last take (the driver logs their mean per node and step)."""
        sizes, self.batch_sizes = self.batch_sizes, []
        return sizes

    async def score_batched(
        self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image]
    ) -> Scores:
        """Like score(), but requests arriving together are scored in one call.

        While no call runs, a call starts once max_batch_size edits wait, or as many requests as the actor has
        clients (a lone rollout worker never waits), or max_wait_s after the first of them arrived. One call runs at a
        time: requests arriving meanwhile gather, and when it ends the same rule applies with the wait counted from its
        end (with closed-loop clients, that is what lets the batch refill). A request the caller cancelled (Ray's cancel
        on a timeout) is dropped, not scored.
        """
        future = asyncio.get_running_loop().create_future()
        self._pending.append((source_images, instructions, edited_images, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if self._task is not None or not self._pending:
            return
        if sum(len(p[0]) for p in self._pending) >= self.max_batch_size or (
            self.clients and len(self._pending) >= self.clients
        ):
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._flush)

    def _flush(self) -> None:
        """Start a call on the oldest requests: up to max_batch_size edits, and at least one request."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = [p for p in self._pending if not p[3].done()]  # cancelled by their callers
        if self._task is not None or not self._pending:
            return
        take, edits = 1, len(self._pending[0][0])
        while take < len(self._pending) and edits + len(self._pending[take][0]) <= self.max_batch_size:
            edits += len(self._pending[take][0])
            take += 1
        pending, self._pending = self._pending[:take], self._pending[take:]
        self._task = asyncio.get_running_loop().create_task(self._score_pending(pending))

    async def _score_pending(self, pending: list) -> None:
        sources = [x for p in pending for x in p[0]]
        instructions = [x for p in pending for x in p[1]]
        edited = [x for p in pending for x in p[2]]
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self._executor, self.score, sources, instructions, edited)
        except Exception as e:  # every waiting request learns why
            for p in pending:
                if not p[3].done():  # a caller that gave up has cancelled its future
                    p[3].set_exception(e)
            return
        finally:
            self._task = None
            self._schedule()
        start = 0
        for p in pending:
            n = len(p[0])
            terms = {k: v[start : start + n] for k, v in scores.terms.items()}
            errors = {k: missing for k, v in terms.items() if (missing := sum(x is None for x in v))}
            if not p[3].done():
                p[3].set_result(Scores(terms, errors))
            start += n
