"""The joint objective's pure functions: Bradley-Terry, HPSv3's uncertainty-aware ranking, the critique LM loss."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reward.losses import critique_lm_loss, next_token_targets, preference_loss, uncertainty_preference_loss


def test_loss_functions_match_closed_forms():
    chosen = torch.tensor([2.0, 0.5, 1.0])
    rejected = torch.tensor([1.0, 1.5, 1.0])
    ties = torch.tensor([False, False, True])
    dropped = preference_loss(chosen, rejected, ties)
    assert dropped.item() == pytest.approx(
        (-F.logsigmoid(torch.tensor(1.0)) - F.logsigmoid(torch.tensor(-1.0))).item() / 2
    )
    margin = preference_loss(chosen, rejected, ties, margin=0.5)
    assert margin.item() == pytest.approx(
        (-F.logsigmoid(torch.tensor(0.5)) - F.logsigmoid(torch.tensor(-1.5))).item() / 2
    )
    modelled = preference_loss(chosen, rejected, ties, tie_mode="model")
    expected = (-F.logsigmoid(torch.tensor(1.0)) - F.logsigmoid(torch.tensor(-1.0)) + np.log(2)).item() / 3
    assert modelled.item() == pytest.approx(expected)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    positions, targets = next_token_targets(labels)
    assert positions.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert targets.tolist() == [5, 6, 7, 8]
    logits = torch.randn(4, 10)
    assert critique_lm_loss(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets).item())


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_uncertainty_loss_matches_its_closed_form():
    mu_c, mu_r = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, 1.5, 0.2])
    sd_c, sd_r = torch.tensor([0.6, 1.0, 2.0]), torch.tensor([0.8, 0.0, 1.0])
    ties = torch.tensor([False, False, True])
    # s^2 per pair: 1.0, 1.0, 5.0; the scale sqrt(1 + pi s^2 / 8)
    k = [math.sqrt(1 + math.pi / 8), math.sqrt(1 + math.pi / 8), math.sqrt(1 + 5 * math.pi / 8)]
    nll = lambda z: -math.log(sigmoid(z))  # noqa: E731
    dropped = uncertainty_preference_loss(mu_c, mu_r, sd_c, sd_r, ties)
    assert dropped.item() == pytest.approx((nll(1.0 / k[0]) + nll(-1.0 / k[1])) / 2, rel=1e-6)
    margin = uncertainty_preference_loss(mu_c, mu_r, sd_c, sd_r, ties, margin=0.5)
    assert margin.item() == pytest.approx((nll(0.5 / k[0]) + nll(-1.5 / k[1])) / 2, rel=1e-6)
    modelled = uncertainty_preference_loss(mu_c, mu_r, sd_c, sd_r, ties, tie_mode="model")
    tie = (nll(0.8 / k[2]) + nll(-0.8 / k[2])) / 2
    assert modelled.item() == pytest.approx((nll(1.0 / k[0]) + nll(-1.0 / k[1]) + tie) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="tie_mode"):
        uncertainty_preference_loss(mu_c, mu_r, sd_c, sd_r, ties, tie_mode="half")


# The probit approximation is off by at most ~0.018 in probability over every (m, s): its s -> infinity
# limit, sup |Phi(x) - sigmoid(x sqrt(8 / pi))| = 0.0177. At the points below it is within 0.004, and a
# wrong formula (s for s^2, pi/8 left out, sigma_c + sigma_r for the root of the sum of squares, sigma
# ignored) misses by more than 0.02 at one point or more.
TOLERANCE = 0.02
POINTS = [(1.0, 0.6, 0.8), (2.0, 1.2, 1.6), (1.5, 2.4, 1.8), (-1.0, 0.3, 0.4), (3.0, 3.2, 2.4)]  # (m, sigma_c, sigma_r)


def expected_sigmoid(m: float, s: float, nodes: int = 120) -> float:
    """E[sigmoid(d)] for d ~ N(m, s^2) by Gauss-Hermite quadrature (exact to ~1e-12 at these s)."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    return float((w * (1.0 / (1.0 + np.exp(-(m + s * z))))).sum() / w.sum())


def test_uncertainty_probability_agrees_with_numerical_integration():
    for m, sd_c, sd_r in POINTS:
        loss = uncertainty_preference_loss(
            torch.tensor([m], dtype=torch.float64),
            torch.zeros(1, dtype=torch.float64),
            torch.tensor([sd_c], dtype=torch.float64),
            torch.tensor([sd_r], dtype=torch.float64),
            torch.tensor([False]),
        )
        exact = expected_sigmoid(m, math.hypot(sd_c, sd_r))
        assert math.exp(-loss.item()) == pytest.approx(exact, abs=TOLERANCE), (m, sd_c, sd_r)
    # The points are where sigma matters: Bradley-Terry on mu alone would fail the same tolerance.
    assert max(abs(expected_sigmoid(m, math.hypot(c, r)) - sigmoid(m)) for m, c, r in POINTS) > TOLERANCE
    assert (
        max(
            abs(expected_sigmoid(m, math.hypot(c, r)) - sigmoid(m / math.sqrt(1 + math.pi * (c + r) ** 2 / 8)))
            for m, c, r in POINTS
        )
        > TOLERANCE
    )


def test_uncertainty_loss_is_bradley_terry_as_sigma_vanishes():
    torch.manual_seed(0)
    mu_c, mu_r = torch.randn(16) * 2, torch.randn(16) * 2
    ties = torch.rand(16) < 0.3
    zero = torch.zeros(16)
    for margin, tie_mode in [(0.0, "drop"), (0.5, "drop"), (0.0, "model")]:
        bt = preference_loss(mu_c, mu_r, ties, margin, tie_mode)
        assert torch.equal(uncertainty_preference_loss(mu_c, mu_r, zero, zero, ties, margin, tie_mode), bt)
        small = uncertainty_preference_loss(mu_c, mu_r, zero + 1e-3, zero + 1e-3, ties, margin, tie_mode)
        assert small.item() == pytest.approx(bt.item(), rel=1e-5)
        large = uncertainty_preference_loss(mu_c, mu_r, zero + 1.0, zero + 1.0, ties, margin, tie_mode)
        assert abs(large.item() - bt.item()) > 1e-2


def test_gradient_reaches_sigma():
    # Pair 0 is ranked right (m = 1): more sigma pulls P towards 1/2 and costs. Pair 1 is ranked wrong
    # (m = -1): more sigma is the head admitting doubt and pays.
    mu_c, mu_r = torch.tensor([1.0, -1.0], requires_grad=True), torch.tensor([0.0, 0.0])
    sd_c, sd_r = torch.tensor([0.5, 0.5], requires_grad=True), torch.tensor([0.5, 0.5], requires_grad=True)
    uncertainty_preference_loss(mu_c, mu_r, sd_c, sd_r, torch.tensor([False, False])).backward()
    assert sd_c.grad[0] > 0 and sd_c.grad[1] < 0
    assert torch.allclose(sd_c.grad, sd_r.grad)  # equal sigmas enter s^2 symmetrically
    assert mu_c.grad[0] < 0 and mu_c.grad[1] < 0
