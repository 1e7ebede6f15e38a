"""The two halves of JRM's joint objective, L = (1 - alpha) L_rank + alpha L_LM (arXiv 2602.07533).

L_rank is Bradley-Terry (`preference_loss`) or HPSv3's uncertainty-aware ranking (arXiv 2508.03789,
`uncertainty_preference_loss`); L_LM is next-token cross-entropy on the critique (`critique_lm_loss`).
Pure functions on tensors, so each can be checked against its closed form; `joint_loss` combines them on a
JRM's outputs, as `LossConfig` says (reward/train.py trains with it, and so does RL's online refresh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def preference_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    ties: torch.Tensor,
    margin: float = 0.0,
    tie_mode: str = "drop",
) -> torch.Tensor:
    """Bradley-Terry loss: mean of -log sigmoid(r_chosen - r_rejected - margin) over strict pairs.

    Args:
        chosen_rewards: (B,) rewards of the preferred edits.
        rejected_rewards: (B,) rewards of the other edits.
        ties: (B,) bool, pairs the labels could not separate.
        margin: required reward gap for strict pairs.
        tie_mode: "drop" ignores tie pairs; "model" gives them target 1/2, i.e.
            -(log sigmoid(d) + log sigmoid(-d)) / 2, which pulls their rewards together.

    Returns:
        scalar; 0 (with a gradient path) when no pair counts.
    """
    diff = chosen_rewards - rejected_rewards
    return _pair_nll(diff - margin, diff, ties, tie_mode)


def uncertainty_preference_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_std: torch.Tensor,
    rejected_std: torch.Tensor,
    ties: torch.Tensor,
    margin: float = 0.0,
    tie_mode: str = "drop",
) -> torch.Tensor:
    """HPSv3's uncertainty-aware ranking loss (arXiv 2508.03789), in closed form.

    Each candidate's reward is r ~ N(mu, sigma^2), independently; the difference d = r_c - r_r is then
    N(m, s^2) with m = mu_c - mu_r and s^2 = sigma_c^2 + sigma_r^2, and

        P(chosen > rejected) = E[sigmoid(d)] ~= sigmoid(m / sqrt(1 + pi s^2 / 8)),    loss = -log P,

    the probit approximation: sigmoid(x) ~= Phi(x sqrt(pi / 8)), whose expectation under N(m, s^2) has
    this closed form. It is off by at most ~0.018 in probability (the s -> infinity limit, where it is the
    gap between Phi and the scaled sigmoid). sigma -> 0 gives `preference_loss`; a large sigma pulls P towards 1/2, so
    pairs the head cannot rank cost little once it says it is unsure, and sigma gets a gradient.
    The margin and ties work as in `preference_loss`, on m: strict pairs use m - margin, modelled ties
    target 1/2.

    Args:
        chosen_rewards: (B,) mu of the preferred edits.
        rejected_rewards: (B,) mu of the other edits.
        chosen_std: (B,) sigma >= 0 of the preferred edits.
        rejected_std: (B,) sigma >= 0 of the other edits.
        ties: (B,) bool, pairs the labels could not separate.
        margin: required gap in mu for strict pairs.
        tie_mode: "drop" or "model", as in `preference_loss`.

    Returns:
        scalar; 0 (with a gradient path) when no pair counts.
    """
    diff = chosen_rewards - rejected_rewards
    scale = torch.sqrt(1.0 + (math.pi / 8.0) * (chosen_std.square() + rejected_std.square()))
    return _pair_nll((diff - margin) / scale, diff / scale, ties, tie_mode)


def _pair_nll(strict_logits: torch.Tensor, tie_logits: torch.Tensor, ties: torch.Tensor, tie_mode: str) -> torch.Tensor:
    """Mean negative log-likelihood over the pairs that count: -log sigmoid(strict_logits) for strict pairs;
    for ties, nothing ("drop") or -(log sigmoid(t) + log sigmoid(-t)) / 2 ("model"). All (B,)."""
    strict = -F.logsigmoid(strict_logits)
    if tie_mode == "drop":
        weights = (~ties).float()
        per_pair = strict
    elif tie_mode == "model":
        weights = torch.ones_like(strict)
        per_pair = torch.where(ties, -(F.logsigmoid(tie_logits) + F.logsigmoid(-tie_logits)) / 2, strict)
    else:
        raise ValueError(f"tie_mode must be 'drop' or 'model', got {tie_mode!r}")
    return (per_pair * weights).sum() / weights.sum().clamp(min=1.0)


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions predict a labelled token, and those tokens.

    Args:
        labels: (N, L) token ids, -100 where masked (prompt, score token, padding).

    Returns:
        positions: (N, L) bool, True at i when labels[:, i + 1] is a real token.
        targets: (M,) the tokens at i + 1, in row-major order of `positions`.
    """
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != -100
    return positions, labels[:, 1:][labels[:, 1:] != -100]


def critique_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens: the same quantity as a transformers causal
    LM's `labels=` loss, computed only where needed (a full (N, L, vocab) logits tensor is what runs a
    7B model out of memory).

    Args:
        logits: (M, V) logits at the positions from `next_token_targets`.
        targets: (M,) the tokens to predict.

    Returns:
        scalar; 0 (with a gradient path) when M == 0.
    """
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, ties: torch.Tensor) -> float:
    """Share of strict pairs ranked right; an exact score tie counts one half."""
    strict = ~ties
    if strict.sum() == 0:
        return float("nan")
    diff = (chosen_rewards - rejected_rewards)[strict]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


@dataclass
class LossConfig:
    alpha: float = 1 / 3
    """Share of the critique LM loss in L = (1 - alpha) L_rank + alpha L_LM, in [0, 1); 0 is the
    discriminative-only baseline; the paper uses 0.7. The default 1/3 weighs L_LM half as much as L_rank."""
    ranking: str = "bt"
    """L_rank: bt (Bradley-Terry on the rewards) or uncertainty (HPSv3; needs model.uncertainty=true)."""
    margin: float = 0.0
    """Required reward gap for strict pairs (on mu under uncertainty ranking)."""
    ties: str = "drop"
    """Tie pairs: drop, or model (target 1/2)."""
    dimension_weight: float = 0.5
    """Weight, inside L_rank, of the per-dimension ranking losses (when model.dimension_heads > 0)."""

    def __post_init__(self) -> None:
        if self.ties not in ("drop", "model"):
            raise ValueError(f"loss.ties must be 'drop' or 'model', got {self.ties!r}")
        if self.ranking not in ("bt", "uncertainty"):
            raise ValueError(f"loss.ranking must be 'bt' or 'uncertainty', got {self.ranking!r}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"loss.alpha must be in [0, 1) (1 would leave no ranking loss), got {self.alpha}")


@dataclass
class JointLoss:
    """One batch's L = (1 - alpha) L_rank + alpha L_LM and its parts (rewards detached)."""

    loss: torch.Tensor  # () what backward() runs on
    pref: torch.Tensor  # () the ranking loss of the reward alone
    lm: torch.Tensor | None  # () the critique LM loss; None when the batch has no critiques
    chosen: torch.Tensor  # (n,) rewards of the chosen edits
    rejected: torch.Tensor  # (n,) rewards of the rejected edits
    reward_std: torch.Tensor | None  # (2n,) the uncertainty head's sigma; None under bt


def ranking_loss(
    cfg: LossConfig, mu: torch.Tensor, std: torch.Tensor | None, n: int, ties: torch.Tensor, margin: float, mode: str
) -> torch.Tensor:
    """The configured L_rank of chosen rows mu[:n] against rejected rows mu[n:] (both (2n,)); `std` (2n,) is the
    head's sigma under uncertainty ranking, None under bt."""
    if cfg.ranking == "uncertainty":
        return uncertainty_preference_loss(mu[:n], mu[n:], std[:n], std[n:], ties, margin, mode)
    return preference_loss(mu[:n], mu[n:], ties, margin, mode)


def joint_loss(model, inputs: dict, cfg: LossConfig) -> JointLoss:
    """JRM's training objective on a PairCollator batch (chosen rows first, then rejected) for a JRM `model`: the
    loss every JRM trains with, in reward/train.py and in RL's online refresh. Pops `ties` and the dimension
    fields."""
    ties = inputs.pop("ties")
    dim_inputs = {k: inputs.pop(k) for k in ("dims_known", "chosen_dims", "rejected_dims") if k in inputs}
    out = model(**inputs)
    n = ties.shape[0]
    pref = ranking_loss(cfg, out.rewards, out.reward_std, n, ties, cfg.margin, cfg.ties)
    rank = pref
    if out.dimension_rewards is not None:
        for d in range(out.dimension_rewards.shape[1]):
            # Orient each pair by its dimension scores; pairs without them, or tied on them, do not count.
            sign = torch.sign(dim_inputs["chosen_dims"][:, d] - dim_inputs["rejected_dims"][:, d])
            usable = dim_inputs["dims_known"] & (sign != 0)
            oriented = out.dimension_rewards[:, d] * torch.cat([sign, sign])
            std = None if out.dimension_std is None else out.dimension_std[:, d]
            rank = rank + cfg.dimension_weight * ranking_loss(cfg, oriented, std, n, ~usable, 0.0, "drop")
    loss = rank if out.lm_loss is None else (1 - cfg.alpha) * rank + cfg.alpha * out.lm_loss
    rewards = out.rewards.detach()
    std = None if out.reward_std is None else out.reward_std.detach()
    return JointLoss(
        loss, pref.detach(), None if out.lm_loss is None else out.lm_loss.detach(), rewards[:n], rewards[n:], std
    )
