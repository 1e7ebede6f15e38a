"""The RL math, as pure functions: group-relative advantages, the clipped surrogate, KL, PPO's value loss.

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470):
    A_i = clip((R_i - mean_group) / (std + eps), -adv_clip, adv_clip), the same for every step of trajectory i
    r = exp(logp_new - logp_old),  L = mean(max(-A r, -A clip(r, 1 - c, 1 + c))) + beta KL
    KL = mean over latent dims of (mean_theta - mean_ref)^2 / (2 std^2)    (std: the step's transition std)
PPO for the denoising MDP (DPOK / DDPO-style, terminal reward): advantages R - V(x_t, t, condition) per
step, the same surrogate, and a clipped value loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Advantages:
    advantages: Tensor  # (B,) one per trajectory
    zero_std: Tensor  # (B,) bool: the row's group has rewards that are all equal (no learning signal)


def group_advantages(rewards: Tensor, group_ids: Tensor, std: str = "group", clip: float = 5.0, eps: float = 1e-4) -> Advantages:
    """Rewards normalised within their group (GRPO).

    Args:
        rewards: (B,) float; group_ids: (B,) int, rows sharing a prompt share an id.
        std: "group" divides by each group's std, "batch" by the whole batch's (Dr. GRPO-style, steadier
            when groups are small); the mean is always the group's.
        clip: advantages are clipped to [-clip, clip]; 0 = no clip.
    Returns:
        Advantages with (B,) advantages and the (B,) zero-variance mask.
    """
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    if std not in ("group", "batch"):
        raise ValueError(f"advantage std must be 'group' or 'batch', got {std!r}")
    rewards = rewards.double()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"every group needs at least 2 samples; group sizes seen: {sorted(set(counts.tolist()))}")
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, rewards)
    means = sums / counts
    centred = rewards - means[inverse]
    sq = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, centred**2)
    group_std = (sq / (counts - 1)).sqrt()  # unbiased, as torch.std
    zero_std = group_std[inverse] == 0
    scale = group_std[inverse] if std == "group" else rewards.std().expand_as(rewards)
    adv = centred / (scale + eps)
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    return Advantages(adv.float(), zero_std)


@dataclass
class SurrogateStats:
    clipfrac: float  # fraction of rows whose ratio left [1 - c, 1 + c]
    clipfrac_high: float  # ... above 1 + c
    clipfrac_low: float  # ... below 1 - c
    approx_kl: float  # 0.5 mean((logp_new - logp_old)^2)
    ratio_mean: float
    ratio_min: float
    ratio_max: float


def clipped_surrogate(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, SurrogateStats]:
    """PPO's clipped objective as a loss to minimise.

    Args: log_probs (B,) under the current weights (with grad); old_log_probs (B,) from sampling;
        advantages (B,); clip_range c.
    Returns: the scalar loss mean(max(-A r, -A clip(r, 1 - c, 1 + c))) and its diagnostics.
    """
    delta = log_probs - old_log_probs
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        r = ratio.detach()
        high = (r > 1.0 + clip_range).float().mean().item()
        low = (r < 1.0 - clip_range).float().mean().item()
        stats = SurrogateStats(
            clipfrac=high + low,
            clipfrac_high=high,
            clipfrac_low=low,
            approx_kl=0.5 * (delta.detach() ** 2).mean().item(),
            ratio_mean=r.mean().item(),
            ratio_min=r.min().item(),
            ratio_max=r.max().item(),
        )
    return loss, stats


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL between the policy's and the reference's Gaussian steps of equal std: (B,) per row.

    Args: mean, ref_mean (B, ...) transition means; std () the transition std (> 0).
    """
    dims = tuple(range(1, mean.ndim))
    return ((mean - ref_mean) ** 2).mean(dim=dims) / (2 * std**2)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float) -> Tensor:
    """PPO's clipped value loss 0.5 mean(max((V - R)^2, (V_clip - R)^2)), V_clip = old + clip(V - old, +-c).

    Args: values (B,) with grad; old_values (B,) at rollout time; returns (B,) the targets.
    """
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2).mean()
