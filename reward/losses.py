"""The two halves of JRM's joint objective, L = L_pref + lambda * L_LM (arXiv 2602.07533; REFERENCE.md §1).

Pure functions on tensors, so each can be checked against its closed form.
"""

from __future__ import annotations

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
    strict = -F.logsigmoid(diff - margin)
    if tie_mode == "drop":
        weights = (~ties).float()
        per_pair = strict
    elif tie_mode == "model":
        weights = torch.ones_like(diff)
        per_pair = torch.where(ties, -(F.logsigmoid(diff) + F.logsigmoid(-diff)) / 2, strict)
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
