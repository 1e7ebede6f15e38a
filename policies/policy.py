"""The contract every editing policy keeps (FLUX.1 Kontext, Qwen-Image-Edit, the ShapeEdit policy).

The learner and the rollout workers see only this. Each model writes its own explicit denoising loop
and calls policies.sde.sde_step_with_logprob at every step: each policy owns its sampling loop.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch import Tensor, nn

from policies.rollout import Rollout
from policies.sampling import SamplerConfig
from policies.sde import StepOutput


class EditingPolicy(Protocol):
    height: int  # the source images' height, in pixels (the caller resizes)
    width: int
    version: int  # bumped by load_trainable_state; stamped on every rollout row

    def sample(
        self,
        source_images: list[Image.Image],
        instructions: list[str],
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        group_ids: Tensor | None = None,
    ) -> Rollout:
        """Edit a batch, recording the trajectory and per-step log-probs under the current weights."""

    def to(self, device: torch.device | str) -> EditingPolicy:
        """Move every component, the frozen reference copy of a full fine-tune included; returns the policy."""

    def log_prob(self, rollout: Rollout, step: int) -> StepOutput:
        """Recompute step `step` of a stored rollout with the current weights (with grad if enabled).

        Equals rollout.log_probs[:, step] exactly (on-policy ratio 1) when the weights are the ones that
        sampled it and the batch is the one it was sampled in.

        Deterministic steps: a row for which the step was an ODE step (outside its SDE window, the last
        step, or noise level 0) gets log-prob 0, as stored, so the ratio is 1 there too and no gradient
        flows from it; it is not an error. If the step was stochastic for any row (rollouts with different
        windows, concatenated), `mean` and `std` are the SDE transition's for every row: mask the others
        out of a KL term with rollout.stochastic[:, step]. If it was deterministic for every row, `mean`
        is the Euler step's and `std` is 0.
        """

    def flow_velocity(self, rollout: Rollout, latents: Tensor, sigma: float) -> Tensor:
        """The velocity the sampler uses at (latents, sigma) under the current weights (with grad if enabled):
        the rollout's condition and guidance, any latents of its shape, any sigma in (0, 1]. DiffusionNFT
        trains it on forward-noised edits; at a stored step it is the velocity behind log_prob's mean."""

    def reference(self) -> contextlib.AbstractContextManager:
        """Within the block, log_prob computes the reference policy (adapters disabled)."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def decision_parameters(self) -> list[nn.Parameter]:
        """Those of trainable_parameters that set which decision a sample makes, not how it draws it (ShapeEdit's
        decision-code mean); the learner trains them at algo.decision_lr. [] for a policy without them."""

    def decision_draw(self, rollout: Rollout) -> tuple[Tensor, Tensor] | None:
        """(B,) the mean of each row's decision draw, a unit-variance Gaussian, under the current weights (with grad if
        enabled), and (B,) the values drawn: what DiffusionNFT trains for the decisions (rl/algorithms.py's NFT), as
        GRPO trains them through log_prob. None for a policy without them."""

    def trained_module(self) -> nn.Module:
        """The network that holds the trainable weights (the denoiser, its LoRA adapters inside)."""

    def drop_encoders(self) -> None:
        """Free what only sampling needs (text encoders, VAE): a learner's copy recomputes stored rollouts, whose
        condition holds their outputs. sample() refuses afterwards; log_prob and flow_velocity are unchanged."""

    def trainable_state(self) -> dict[str, Tensor]: ...

    def load_trainable_state(self, state: dict[str, Tensor], version: int) -> None: ...

    def save_pretrained(self, path: str | Path) -> None:
        """Write the trained weights, the settings they need and the version to the folder `path`."""

    def load_pretrained(self, path: str | Path) -> None:
        """Load what save_pretrained wrote onto this policy, built from the same base with the same settings."""
