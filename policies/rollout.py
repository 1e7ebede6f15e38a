"""The record a policy's sampler hands to the reward and the learner: one batch of edits and how they were made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from policies.sampling import SamplerConfig


def _map_tensors(record: Any, fn, shared_too: bool = False) -> Any:
    """A copy of a dataclass whose batch-first tensor fields (all tensor fields with shared_too), nested
    dataclasses' included, went through fn."""
    changes = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, Tensor) and (shared_too or f.metadata.get("batch", True)):
            changes[f.name] = fn(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, SamplerConfig):
            changes[f.name] = _map_tensors(value, fn, shared_too)
    return dataclasses.replace(record, **changes)


def _cat_records(records: list[Any]) -> Any:
    first = records[0]
    changes = {}
    for f in dataclasses.fields(first):
        values = [getattr(r, f.name) for r in records]
        if isinstance(values[0], Tensor) and f.metadata.get("batch", True):
            changes[f.name] = torch.cat(values)
        elif isinstance(values[0], list):
            changes[f.name] = [x for v in values for x in v]
        elif dataclasses.is_dataclass(values[0]) and not isinstance(values[0], SamplerConfig):
            changes[f.name] = _cat_records(values)
        elif isinstance(values[0], Tensor):
            if not all(torch.equal(values[0], v) for v in values[1:]):
                raise ValueError(f"cannot concatenate rollouts whose shared field {f.name!r} differs")
        elif not all(v == values[0] for v in values[1:]):
            raise ValueError(f"cannot concatenate rollouts whose {f.name!r} differs: {values}")
    return dataclasses.replace(first, **changes)


def shared(default=dataclasses.MISSING):
    """A tensor field that is the same for the whole batch (not indexed or concatenated)."""
    return dataclasses.field(default=default, metadata={"batch": False})


@dataclass
class Rollout:
    """One sampled batch. Latents are the policy's own (packed VAE latents, pixel-unshuffled pixels...)."""

    source_images: Tensor  # (B, 3, H, W) uint8
    instructions: list[str]  # B strings
    latents: Tensor  # (B, T + 1, *L) float32: x at sigmas[0] (noise), ..., x at sigmas[T] (the edit)
    log_probs: Tensor  # (B, T) float32: log-prob of latents[:, t + 1] given latents[:, t]; 0 on ODE steps
    stochastic: Tensor  # (B, T) bool: steps sampled with noise, the only ones the learner trains
    edited_images: Tensor  # (B, 3, H, W) uint8
    group_ids: Tensor  # (B,) int64: samples of one group share source and instruction
    policy_versions: Tensor  # (B,) int64: the weight version that sampled each row
    condition: Any  # the policy's typed record of (B, ...) tensors: text embeddings, image latents
    sigmas: Tensor = shared()  # (T + 1,) float32, 1 -> 0
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def select(self, index: Tensor | list[int] | slice) -> Rollout:
        """The rows `index` of every batch field (a minibatch for the learner)."""
        if isinstance(index, slice):
            index = list(range(self.batch_size))[index]
        index = torch.as_tensor(index, dtype=torch.long)
        out = _map_tensors(self, lambda t: t[index.to(t.device)])
        out.instructions = [self.instructions[i] for i in index.tolist()]
        return out

    def final_only(self) -> Rollout:
        """The rollout without its intermediate latents (latents (B, 1, *L): the edit's): all that methods
        training on the clean edits need (DiffusionNFT), a (T + 1)-th of the trajectory to ship."""
        return dataclasses.replace(self, latents=self.latents[:, -1:].clone())

    def to(self, device: torch.device | str) -> Rollout:
        return _map_tensors(self, lambda t: t.to(device), shared_too=True)

    @staticmethod
    def cat(rollouts: list[Rollout]) -> Rollout:
        """One rollout from several (of one policy and sampler), rows in order."""
        if not rollouts:
            raise ValueError("cannot concatenate an empty list of rollouts")
        return _cat_records(rollouts)
