"""The actor set the RL driver drives (rl/loop.py `train(cfg, actor_set)`), and the set that runs in this process.

`ActorSet` is the interface: plain methods that take and return values (rollout, update, send_weights, evaluate,
save, load). Two sets implement it, each made by a context manager `f(cfg, algorithm) -> ActorSet`:

- rl/ray_actors.py `ray_actors`: the Ray topology over any number of nodes (the only module of rl/ that imports
  Ray). It turns Ray's failures into the driver's own exceptions below.
- `local_actors` here: one rollout worker, one reward worker and one learner as plain objects in this process, for
  tests and for launch/bench_rl_step.py's measure of what Ray costs.

The driver splits each call's work across the set's workers and learner ranks itself (the split decides seeds
and the global minibatch order, which must not depend on where the actors live), so both sets run the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from torch import Tensor

from rl.algorithms import MicroTargets
from rl.config import RLConfig
from rl.learner import Learner
from rl.prompts import Prompt
from rl.refresh import RefreshRequest, RewardTrainer
from rl.rewards import RewardWorker
from rl.workers import EvalResult, RolloutResult, RolloutWorker


class Redo(Exception):
    """This step's rollouts cannot be used (a worker died or restarted, or its rollouts were lost): redo it."""


class ActorLost(RuntimeError):
    """An actor is gone for good: a learner (its optimizer state died with it), or a rollout worker whose restarts
    are used up."""


class NodeLost(RuntimeError):
    """A node of the job died: its actors cannot be restarted where their placement group is pinned."""


@dataclass
class RolloutShare:
    """One rollout worker's share of a step."""

    prompts: list[Prompt]  # already repeated per group
    group_ids: Tensor  # (n,)
    seed: int  # seeds the worker's sampling noise


class ActorSet(Protocol):
    """What the driver drives. Workers and learner ranks are counted job-wide; each `shares` list holds one entry
    per rollout worker (rollout, evaluate) or per learner rank (update), in order."""

    num_rollout_workers: int
    num_learners: int

    def rollout(self, shares: list[RolloutShare], micro_batch_size: int, overlap: bool) -> list[RolloutResult]:
        """Each worker samples its share in micro-batches, scored by its node's reward actor. Raises Redo when a
        worker died during the call."""

    def update(self, shares: list[tuple[list, list[MicroTargets]]]) -> list[dict]:
        """Each learner rank trains on its micro-batches (rollouts or references to them) and targets; returns each
        rank's statistics. Raises ActorLost when a learner died."""

    def send_weights(self, version: int) -> None:
        """Learner rank 0's trainable weights to every rollout worker, as `version`. Raises ActorLost when a worker
        is gone for good."""

    def evaluate(self, shares: list[list[Prompt]], seed: int, batch_size: int, grid_rows: int) -> list[EvalResult]:
        """ODE edits of each worker's prompts (an empty share is skipped), judged on the worker's node."""

    def save(self, staging: str) -> list:
        """Every learner rank writes its part of the checkpoint into `staging`; returns what each rank answered."""

    def load(self, path: str) -> None:
        """Every learner rank loads the checkpoint at `path`."""

    def refresh(self, request: RefreshRequest) -> dict:
        """The reward trainer labels and trains (rl/refresh.py); when it trained, every reward actor loads its new
        weights before the call returns. Returns the refresh/* metrics."""

    def reward_batch_sizes(self) -> list[list[int] | None]:
        """Per node, the edits of each scoring call of its reward actor since the last call (None: no answer)."""

    def check_nodes(self, grace_s: float = 0.0) -> None:
        """Raise NodeLost if a node of the job is dead, giving Ray's health checks `grace_s` to tell."""


class LocalActors:
    """The actor set in this process: the components called directly, one of each (and a reward trainer when the
    run refreshes its reward)."""

    num_rollout_workers = 1
    num_learners = 1

    def __init__(
        self, worker: RolloutWorker, learner: Learner, reward: RewardWorker, trainer: RewardTrainer | None = None
    ):
        self.worker, self.learner, self.reward, self.trainer = worker, learner, reward, trainer

    def rollout(self, shares: list[RolloutShare], micro_batch_size: int, overlap: bool) -> list[RolloutResult]:
        return [self.worker.rollout(s.prompts, s.group_ids, micro_batch_size, s.seed, overlap) for s in shares]

    def update(self, shares: list[tuple[list, list[MicroTargets]]]) -> list[dict]:
        return [self.learner.update(micro, targets) for micro, targets in shares]

    def send_weights(self, version: int) -> None:
        self.worker.set_weights(self.learner.trainable_state(), version)

    def evaluate(self, shares: list[list[Prompt]], seed: int, batch_size: int, grid_rows: int) -> list[EvalResult]:
        return [self.worker.evaluate(prompts, seed, batch_size, grid_rows) for prompts in shares if prompts]

    def refresh(self, request: RefreshRequest) -> dict:
        metrics = self.trainer.refresh(request)
        if metrics["refresh/trained"]:
            self.reward.load_term_weights(self.trainer.cfg.term, self.trainer.trainable_state())
        return metrics

    def save(self, staging: str) -> list:
        if self.trainer is not None:
            self.trainer.save(reward_trainer_dir(staging))
        return [self.learner.save(staging)]

    def load(self, path: str) -> None:
        self.learner.load(path)
        if self.trainer is not None and self.trainer.load(checked_reward_trainer_dir(path)):
            self.reward.load_term_weights(self.trainer.cfg.term, self.trainer.trainable_state())

    def reward_batch_sizes(self) -> list[list[int] | None]:
        return [self.reward.take_batch_sizes()]

    def check_nodes(self, grace_s: float = 0.0) -> None:
        """One process: its node is alive while this runs."""


class LocalRewardClient:
    """A rollout worker's reward client without Ray: scores at submit, in this process (no overlap with sampling)."""

    def __init__(self, worker: RewardWorker):
        self.worker = worker

    def submit(self, sources, instructions, edited, method: str = "score_batched"):
        return (self.worker.score if method == "score_batched" else self.worker.judge)(sources, instructions, edited)

    def result(self, done):
        return done


@contextlib.contextmanager
def local_actors(cfg: RLConfig, algorithm) -> Iterator[LocalActors]:
    """One rollout worker, one reward worker and one learner training with `algorithm` (a 1-rank DeepSpeed group on
    127.0.0.1), as plain objects in this process."""
    c = cfg.cluster
    if c.num_nodes != 1 or c.num_rollout_workers != 1 or c.num_learners != 1:
        raise ValueError(
            "local_actors runs one node with one rollout worker and one learner: set cluster.num_nodes, "
            "num_rollout_workers and num_learners to 1"
        )
    reward = RewardWorker(
        cfg.reward.terms,
        c.device,
        cfg.reward.max_batch_size,
        cfg.reward.max_wait_s,
        c.threads_per_worker,
        gold=cfg.reward.gold,
    )
    worker = RolloutWorker(
        cfg.policy,
        cfg.seed,
        LocalRewardClient(reward),
        c.threads_per_worker,
        c.device,
        final_only=cfg.algo.name == "nft",
    )
    learner = Learner(cfg, algorithm, 0, 1, "127.0.0.1", free_port("127.0.0.1"), threads=c.threads_per_worker)
    trainer = RewardTrainer(cfg, c.device, c.threads_per_worker) if cfg.reward.refresh.term else None
    try:
        yield LocalActors(worker, learner, reward, trainer)
    finally:
        learner.close()


def reward_trainer_dir(checkpoint: str | Path) -> Path:
    """Where a checkpoint keeps the reward trainer's state."""
    return Path(checkpoint) / "reward_trainer"


def checked_reward_trainer_dir(checkpoint: str | Path) -> Path:
    """reward_trainer_dir, refused when the checkpoint was saved by a run that did not refresh its reward."""
    folder = reward_trainer_dir(checkpoint)
    if not (folder / "refresh.json").is_file():
        raise ValueError(
            f"{checkpoint} holds no reward trainer state: it was saved without reward.refresh; resume it without "
            f"reward.refresh, or start a new run"
        )
    return folder


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def payload_bytes(obj) -> int:
    """Bytes of data in `obj`: tensors and arrays by their buffers, an object reference (Ray's ObjectRef, known by
    its `binary()` id, so that this module needs no Ray) by its id (28 bytes), strings by length, other scalars 8;
    containers and dataclasses summed over their members. The driver logs what it receives per step
    (perf/driver_bytes), the learners what they fetch (perf/rollout_bytes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (str, bytes)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(payload_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(payload_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if callable(getattr(type(obj), "binary", None)):
        return len(obj.binary())
    return 8
