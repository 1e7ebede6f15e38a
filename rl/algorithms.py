"""The RL math, as pure functions: group-relative advantages, the clipped surrogate, KL, PPO's value loss.

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470):
    A_i = clip((R_i - mean_group) / (std + eps), -adv_clip, adv_clip), the same for every step of trajectory i
    r = exp(logp_new - logp_old),  L = mean(max(-A r, -A clip(r, 1 - c, 1 + c))) + beta KL
    KL = mean over latent dims of (mean_theta - mean_ref)^2 / (2 std^2)    (std: the step's transition std)
PPO for the denoising MDP (DPOK / DDPO-style, terminal reward): advantages R - V(x_t, t, condition) per
step, the same surrogate, and a clipped value loss.
DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117), on the forward process of the clean edits x0 only:
    r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)            (optimality weight from the group advantages)
    x_t = (1 - t) x0 + t eps,  v = eps - x0           (flow-matching path and target)
    v+ = (1 - beta) v_old + beta v_theta,  v- = (1 + beta) v_old - beta v_theta
    L = r ||v+ - v||^2 + (1 - r) ||v- - v||^2         (no likelihoods: any sampler, ODE included)
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


def clipped_surrogate(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float, clip_range_high: float | None = None
) -> tuple[Tensor, SurrogateStats]:
    """PPO's clipped objective as a loss to minimise.

    Args: log_probs (B,) under the current weights (with grad); old_log_probs (B,) from sampling;
        advantages (B,); clip_range c (the lower side, c_low); clip_range_high c_high, None: c (symmetric).
        Asymmetric clipping (c_high > c_low, DAPO's "clip higher") lets good rows raise their probability
        further than bad rows may lower it.
    Returns: the scalar loss mean(max(-A r, -A clip(r, 1 - c_low, 1 + c_high))) and its diagnostics.
    """
    high_range = clip_range if clip_range_high is None else clip_range_high
    delta = log_probs - old_log_probs
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        r = ratio.detach()
        high = (r > 1.0 + high_range).float().mean().item()
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


def nft_optimality(advantages: Tensor, adv_clip: float) -> Tensor:
    """DiffusionNFT's optimality weight r = 1/2 + 1/2 clip(A / adv_clip, -1, 1) in [0, 1], per row.

    Args: advantages (B,) group-normalised rewards (group_advantages); adv_clip > 0 the advantage that
        counts as certainly optimal (r = 1) or certainly not (r = 0). A zero-variance group gets r = 1/2.
    """
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be > 0 for NFT's optimality weight, got {adv_clip}")
    return 0.5 + 0.5 * (advantages / adv_clip).clamp(-1.0, 1.0)


@dataclass
class NFTStats:
    positive_error: float  # mean ||v+ - v||^2
    negative_error: float  # mean ||v- - v||^2
    drift: float  # mean ||v_theta - v_old||^2: how far training has moved from the sampling policy


def nft_loss(v_theta: Tensor, v_old: Tensor, target: Tensor, optimality: Tensor, beta: float) -> tuple[Tensor, NFTStats]:
    """DiffusionNFT's negative-aware flow-matching loss, per row, as a loss to minimise.

    Args:
        v_theta: (B, ...) the trained policy's velocity at the noised clean edit x_t (with grad).
        v_old: (B, ...) the sampling (old) policy's velocity at the same x_t, t and condition (no grad).
        target: (B, ...) the flow-matching target eps - x0.
        optimality: (B,) r in [0, 1] (nft_optimality).
        beta: > 0, how far the implicit positive and negative policies sit from the old one.
    Returns:
        (B,) r ||v+ - v||^2 + (1 - r) ||v- - v||^2 with v+ = (1 - beta) v_old + beta v_theta and
        v- = (1 + beta) v_old - beta v_theta (squared norms averaged over latent dims), and diagnostics.
        At v_theta = v_old both terms equal the old policy's flow-matching error, and the gradient with
        respect to v_theta is 2 beta (2r - 1) (v_old - v) / D (D latent dims): rows with r > 1/2 pull the
        velocity towards their own edit's target, rows with r < 1/2 push it away.
    """
    if beta <= 0:
        raise ValueError(f"NFT beta must be > 0, got {beta}")
    dims = tuple(range(1, v_theta.ndim))
    v_old = v_old.detach()
    positive = (1 - beta) * v_old + beta * v_theta
    negative = (1 + beta) * v_old - beta * v_theta
    pos_err = ((positive - target) ** 2).mean(dim=dims)
    neg_err = ((negative - target) ** 2).mean(dim=dims)
    loss = optimality * pos_err + (1 - optimality) * neg_err
    with torch.no_grad():
        stats = NFTStats(pos_err.mean().item(), neg_err.mean().item(), ((v_theta - v_old) ** 2).mean().item())
    return loss, stats
