"""The reward side of RL: named reward terms, and the worker that scores edits in batches.

A term is anything with reward's `score(source_images, instructions, edited_images, batch_size)`:
JRM (`jrm:PATH`), the generative judge (`generative:PATH`), the ShapeEdit oracle (`oracle:DIR`) or the
source-preservation term below. The worker's `score_batched` gathers requests from all rollout workers
(up to `max_batch_size` edits or `max_wait_s`) and scores them in one call; requests that arrive while a call
runs wait for it and go together into the next. It is a plain asyncio method, so the same class runs in a
unit test and as a Ray async actor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from reward.evaluate import load_reward
from rl.config import RewardTerm


class SourcePreservation:
    """1 - mean |edit - source| over pixels (0-1 scale): rewards leaving the image alone. Use it as a small
    weighted term next to an instruction-following reward, never alone (doing nothing maximises it)."""

    def score(self, source_images, instructions, edited_images, batch_size: int = 0) -> torch.Tensor:
        out = []
        for source, edited in zip(source_images, edited_images):
            edited = edited.convert("RGB")
            if edited.size != source.size:
                edited = edited.resize(source.size, Image.BILINEAR)
            diff = np.abs(np.asarray(source.convert("RGB"), dtype=np.float32) - np.asarray(edited, dtype=np.float32))
            out.append(1.0 - float(diff.mean()) / 255.0)
        return torch.tensor(out, dtype=torch.float32)


def build_reward(spec: str, device: str = "cpu"):
    """`preservation`, or a reward/ spec (jrm:PATH, generative:PATH, oracle:DIR)."""
    if spec == "preservation":
        return SourcePreservation()
    return load_reward(spec, device)


@dataclass
class Scores:
    total: list[float]  # the weighted sum, one per edit
    terms: dict[str, list[float]]  # each term's raw score, by name
    errors: dict[str, int]  # failures of optional terms in this call (scored 0)


class RewardWorker:
    """Scores edits with every term; batches concurrent requests (see module docstring)."""

    def __init__(self, terms: list[RewardTerm], device: str = "cpu", max_batch_size: int = 64, max_wait_s: float = 0.05, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        names = [t.name for t in terms]
        if not terms or len(set(names)) != len(names):
            raise ValueError(f"reward terms need distinct names and at least one term, got {names}")
        self.terms = [(t, build_reward(t.spec, device)) for t in terms]
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._pending: list[tuple[list, list, list, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None  # the scoring call running, if any (held: the loop keeps weak references)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one scoring call at a time
        self.batch_sizes: list[int] = []

    def score(self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image]) -> Scores:
        """Every term on this batch, now. A required term that raises propagates; an optional one scores 0."""
        total = np.zeros(len(edited_images))
        terms, errors = {}, {}
        for term, reward in self.terms:
            try:
                values = reward.score(source_images, instructions, edited_images, batch_size=self.max_batch_size).float().numpy()
                if values.shape != (len(edited_images),):
                    raise ValueError(f"reward term {term.name!r} returned shape {values.shape} for {len(edited_images)} edits")
            except Exception:
                if term.required:
                    raise
                values = np.zeros(len(edited_images))
                errors[term.name] = errors.get(term.name, 0) + len(edited_images)
            terms[term.name] = values.tolist()
            total += term.weight * values
        self.batch_sizes.append(len(edited_images))
        return Scores(total.tolist(), terms, errors)

    async def score_batched(self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image]) -> Scores:
        """Like score(), but requests arriving together are scored in one call.

        While no call runs, a call starts once max_batch_size edits wait, or max_wait_s after the first of them
        arrived. One call runs at a time: requests arriving meanwhile gather, and when it ends the same rule
        applies with the wait counted from its end (with closed-loop clients, that is what lets the batch
        refill). A request the caller cancelled (Ray's cancel on a timeout) is dropped, not scored.
        """
        future = asyncio.get_running_loop().create_future()
        self._pending.append((source_images, instructions, edited_images, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if self._task is not None or not self._pending:
            return
        if sum(len(p[0]) for p in self._pending) >= self.max_batch_size:
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
            part = Scores(scores.total[start : start + n], {k: v[start : start + n] for k, v in scores.terms.items()}, {})
            if start == 0:
                part.errors = scores.errors  # counted once
            if not p[3].done():
                p[3].set_result(part)
            start += n

