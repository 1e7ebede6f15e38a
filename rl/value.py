"""PPO's value model V(x_t, t, condition): a small MLP over pooled features of any policy's latents.

Policy-agnostic on purpose: the latents x_t and every batch tensor of the rollout's condition record
are flattened and average-pooled to fixed sizes, so the same value model serves the ShapeEdit policy,
FLUX.1 Kontext and Qwen-Image-Edit. It is a baseline, not a critic of image quality: it only has to
predict the reward well enough to lower the variance of R - V.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.rollout import Rollout

LATENT_FEATURES = 256
CONDITION_FEATURES = 256
TIME_FEATURES = 32


def _pool(x: Tensor, size: int) -> Tensor:
    return F.adaptive_avg_pool1d(x.float().flatten(1).unsqueeze(1), size).squeeze(1)


def value_inputs(rollout: Rollout, step: int) -> Tensor:
    """(B, F) features of (x_t, t, condition) for step `step` of a rollout."""
    cond = [
        getattr(rollout.condition, f.name).float().reshape(rollout.batch_size, -1)  # (B,) fields too
        for f in dataclasses.fields(rollout.condition)
        if isinstance(getattr(rollout.condition, f.name), Tensor) and f.metadata.get("batch", True)
    ]
    sigma = rollout.sigmas[step].float().expand(rollout.batch_size)
    freqs = torch.exp(
        torch.arange(TIME_FEATURES // 2, dtype=torch.float32, device=sigma.device)
        * (-math.log(1000.0) / (TIME_FEATURES // 2))
    )
    angles = sigma[:, None] * 1000.0 * freqs[None]
    return torch.cat(
        [
            _pool(rollout.latents[:, step], LATENT_FEATURES),
            _pool(torch.cat(cond, 1), CONDITION_FEATURES),
            angles.sin(),
            angles.cos(),
        ],
        1,
    )


class ValueModel(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(LATENT_FEATURES + CONDITION_FEATURES + TIME_FEATURES),
            nn.Linear(LATENT_FEATURES + CONDITION_FEATURES + TIME_FEATURES, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        """(B, F) -> (B,) predicted reward."""
        return self.net(features).squeeze(-1)
