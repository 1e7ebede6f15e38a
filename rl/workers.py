"""The rollout worker: holds one copy of the policy, samples edits, has them scored, takes new weights.

A plain class (Ray applies `ray.remote` in rl/ray_actors.py). Its reward client is anything with
`submit(sources, instructions, edited) -> handle` and `result(handle) -> Scores`: in a run, its node's Ray
reward actor with timeout and retries (rl/ray_actors.py:RayRewardClient). Under Ray (`store=ray.put`)
each micro-batch's rollout goes into the object store and only its reference goes back to the driver, which
hands it to a learner: rollouts never pass through the driver. Micro-batch k's scoring is submitted before
micro-batch k + 1 is sampled, so with a remote reward actor the two overlap (`cluster.async_reward`, on by default).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from policies.images import tensor_to_images
from policies.registry import load_policy
from policies.rollout import Rollout
from rl.config import PolicyConfig
from rl.prompts import Prompt
from rl.rewards import Scores


def build_policy(cfg: PolicyConfig, seed: int):
    """The policy named by the config (policies/registry.py), with fresh LoRA adapters drawn from `seed` (identical
    in every actor)."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    torch.manual_seed(seed)
    return load_policy(cfg.kind, cfg.path, cfg.kind_options(), cfg.trainable, dtype, cfg.height, cfg.width)


@dataclass
class RolloutResult:
    # one per micro-batch, as sampled (the learner recomputes them in these shapes), or what `store` made of it
    rollouts: list
    scores: list[Scores]  # one per micro-batch
    versions: list[int]  # the policy versions that sampled them
    sample_s: float  # seconds sampling
    wait_s: float  # seconds waiting for rewards after the last micro-batch was sampled


@dataclass
class EvalResult:
    """One rollout worker's share of an evaluation, as the driver receives it: scores and a few thumbnails."""

    scores: Scores  # every reward term, one per prompt
    gold: list[float] | None  # the gold judge's score per prompt; None: no gold judge
    version: int  # the policy version that made the edits
    grid: Tensor  # (n, 3, THUMBNAIL, 2 THUMBNAIL) uint8: source | edit of the first prompts, at a fixed size


THUMBNAIL = 128  # pixels a side of each image in an evaluation grid, whatever the policy's size


def pair_thumbnail(source: Image.Image, edited: Image.Image) -> Tensor:
    """Source | edit side by side at THUMBNAIL pixels each, (3, THUMBNAIL, 2 THUMBNAIL) uint8."""
    pair = Image.new("RGB", (2 * THUMBNAIL, THUMBNAIL))
    for k, image in enumerate((source, edited)):
        image = image.convert("RGB")
        # pixel art stays sharp when enlarged (ShapeEdit's 64 px); photographs are averaged when reduced
        pair.paste(
            image.resize((THUMBNAIL, THUMBNAIL), Image.NEAREST if image.width <= THUMBNAIL else Image.BILINEAR),
            (k * THUMBNAIL, 0),
        )
    return torch.from_numpy(np.asarray(pair).copy()).permute(2, 0, 1)


class RolloutWorker:
    def __init__(
        self,
        cfg: PolicyConfig,
        seed: int,
        reward_client,
        threads: int = 0,
        device: str = "cpu",
        final_only: bool = False,
        store: Callable[[Rollout], Any] | None = None,
    ):
        """`final_only`: hand back rollouts without their intermediate latents (DiffusionNFT needs the edits only).
        `store`: what to hand back for each micro-batch's rollout instead of the rollout itself (Ray actors get
        `ray.put`: the rollouts stay in this node's object store and the driver receives references)."""
        if threads:
            torch.set_num_threads(threads)
        self.policy = build_policy(cfg, seed)
        if device != "cpu":
            self.policy.to(device)
        self.device = device
        self.sampler = cfg.sampler
        self.eval_sampler = cfg.eval_sampler()
        self.eval_samples = cfg.eval_samples
        self.reward = reward_client
        self.final_only = final_only
        self.store = store

    def set_weights(self, state: dict[str, np.ndarray], version: int) -> int:
        """Load the learner's trainable weights (numpy arrays by name); returns the version now held."""
        self.policy.load_trainable_state(
            {k: torch.tensor(v) for k, v in state.items()}, version
        )  # object-store arrays are read-only
        return version

    def rollout(
        self, prompts: list[Prompt], group_ids: Tensor, micro_batch_size: int, seed: int, overlap: bool = True
    ) -> RolloutResult:
        """Sample `prompts` (already repeated per group) in micro-batches and have each scored.

        With `overlap`, micro-batch k is scored while k + 1 is sampled; without, each score is awaited first.
        """
        generator = torch.Generator(self.device).manual_seed(seed)
        rollouts, handles = [], []
        start = time.perf_counter()
        for i in range(0, len(prompts), micro_batch_size):
            chunk = prompts[i : i + micro_batch_size]
            sources = [p.source for p in chunk]
            instructions = [p.instruction for p in chunk]
            rollout = self.policy.sample(
                sources, instructions, self.sampler, generator, group_ids[i : i + micro_batch_size]
            ).to("cpu")
            if self.final_only:
                rollout = rollout.final_only()
            handles.append(self.reward.submit(sources, instructions, tensor_to_images(rollout.edited_images)))
            if not overlap:
                handles[-1] = self.reward.result(handles[-1])
            rollouts.append(rollout)
        sampled = time.perf_counter()
        scores = [self.reward.result(h) if overlap else h for h in handles]
        versions = sorted({int(v) for r in rollouts for v in r.policy_versions.unique()})
        if self.store is not None:
            rollouts = [self.store(r) for r in rollouts]
        return RolloutResult(rollouts, scores, versions, sampled - start, time.perf_counter() - sampled)

    def evaluate(self, prompts: list[Prompt], seed: int, batch_size: int, grid_rows: int) -> EvalResult:
        """ODE (noise 0) edits of `prompts`, `eval_samples` each, judged by this node's reward actor (every term
        and the gold judge), each prompt's scores the mean of its samples: the edits stay on this node, and what
        leaves it does not grow with the images (EvalResult). The grid shows each prompt's first sample."""
        generator = torch.Generator(self.device).manual_seed(seed)
        k = self.eval_samples
        samples = [p for p in prompts for _ in range(k)]
        handles, grid = [], []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            sources = [p.source for p in chunk]
            edits = self.policy.sample(
                sources, [p.instruction for p in chunk], self.eval_sampler, generator
            ).edited_images.cpu()
            edited = tensor_to_images(edits)
            handles.append(self.reward.submit(sources, [p.instruction for p in chunk], edited, method="judge"))
            firsts = [(s, e) for j, (s, e) in enumerate(zip(sources, edited)) if (i + j) % k == 0]
            grid += [pair_thumbnail(s, e) for s, e in firsts][: grid_rows - len(grid)]
        judged = [self.reward.result(h) for h in handles]
        scores = Scores.cat([j.scores for j in judged])
        terms = {name: per_prompt_means(values, k) for name, values in scores.terms.items()}
        gold = None if judged[0].gold is None else per_prompt_means([g for j in judged for g in j.gold], k)
        return EvalResult(Scores(terms, scores.errors), gold, self.policy.version, torch.stack(grid))


def per_prompt_means(values: list[float | None], k: int) -> list[float | None]:
    """The mean of each run of k consecutive values (one prompt's samples); None where any of them is None."""
    runs = [values[i : i + k] for i in range(0, len(values), k)]
    return [None if any(v is None for v in run) else float(np.mean(run)) for run in runs]
