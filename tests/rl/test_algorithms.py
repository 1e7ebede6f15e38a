"""rl/algorithms.py against closed forms."""

import dataclasses
import math

import pytest
import torch
from PIL import Image

from policies.adapters import TrainableConfig
from policies.sampling import SamplerConfig
from policies.shapeedit import ShapeEditPolicy
from rl.algorithms import (
    NFT,
    MicroTargets,
    categorical_kl,
    clipped_surrogate,
    gaussian_kl,
    group_advantages,
    nft_kl,
    nft_loss,
    nft_optimality,
    value_loss,
)
from rl.config import AlgoConfig
from tests.policies.test_shapeedit_policy import INSTRUCTIONS, TINY


def test_group_advantages_closed_form():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    out = group_advantages(rewards, groups, clip=0)
    # group 0: mean 2, std 1 -> -1, 0, 1; group 1: all equal -> 0 and flagged; group 2: mean 2, std sqrt(8)
    expected = [-1, 0, 1, 0, 0, 0, -2 / math.sqrt(8), 2 / math.sqrt(8)]
    torch.testing.assert_close(
        out.advantages,
        torch.tensor(expected)
        * torch.tensor([1 / (1 + 1e-4)] * 3 + [1] * 3 + [math.sqrt(8) / (math.sqrt(8) + 1e-4)] * 2),
    )
    assert out.zero_std.tolist() == [False] * 3 + [True] * 3 + [False] * 2
    clipped = group_advantages(
        torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0]), torch.zeros(8, dtype=torch.long), clip=2.0
    )
    assert clipped.advantages.max().item() == 2.0
    batch = group_advantages(rewards, groups, std="batch", clip=0)
    torch.testing.assert_close(batch.advantages[:3], (rewards[:3] - 2) / (rewards.std() + 1e-4))


def test_group_advantages_refuses_bad_groups():
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(torch.ones(3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="must both be"):
        group_advantages(torch.ones(3), torch.tensor([0, 0]))


def test_clipped_surrogate_closed_form():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, stats = clipped_surrogate(new, old, adv, clip_range=0.1)
    # per row max(-A r, -A clip(r)): 1 -> -1; 1.5 -> max(-1.5, -1.1) = -1.1; 0.5, A=-1 -> max(0.5, 0.9) = 0.9;
    # 1.05, A=-2 -> 2.1
    assert loss.item() == pytest.approx((-1 - 1.1 + 0.9 + 2.1) / 4, abs=1e-6)
    assert (
        stats.clipfrac == pytest.approx(0.5)
        and stats.clipfrac_high == pytest.approx(0.25)
        and stats.clipfrac_low == pytest.approx(0.25)
    )
    assert stats.ratio_min == pytest.approx(0.5) and stats.ratio_max == pytest.approx(1.5)
    assert stats.approx_kl == pytest.approx(0.5 * (new**2).mean().item())
    # on-policy: ratio 1, gradient = -A d logp (the policy gradient)
    logp = torch.zeros(3, requires_grad=True)
    loss, stats = clipped_surrogate(logp, logp.detach(), torch.tensor([1.0, -1.0, 2.0]), 1e-4)
    loss.backward()
    assert stats.ratio_min == stats.ratio_max == 1.0
    torch.testing.assert_close(logp.grad, -torch.tensor([1.0, -1.0, 2.0]) / 3)


def test_gaussian_kl_and_value_loss():
    mean = torch.ones(2, 3, 4)
    ref = torch.zeros(2, 3, 4)
    torch.testing.assert_close(gaussian_kl(mean, ref, torch.tensor(0.5)), torch.full((2,), 1 / (2 * 0.25)))
    v = torch.tensor([1.0, 0.0])
    old = torch.tensor([0.0, 0.0])
    ret = torch.tensor([0.0, 1.0])
    # row 0: V=1, clipped 0.2 -> max(1, 0.04) = 1; row 1: V=0 -> 1
    assert value_loss(v, old, ret, 0.2).item() == pytest.approx(0.5 * (1 + 1) / 2)


def test_categorical_kl_closed_form():
    """KL(p || q) per pixel, averaged over pixels: 0 for equal distributions, the textbook sum otherwise."""
    p = torch.tensor([0.5, 0.25, 0.25]).log().view(1, 3, 1, 1).expand(2, 3, 2, 2)
    q = torch.tensor([0.25, 0.5, 0.25]).log().view(1, 3, 1, 1).expand(2, 3, 2, 2)
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    torch.testing.assert_close(categorical_kl(p, q), torch.full((2,), expected))
    torch.testing.assert_close(categorical_kl(p, p), torch.zeros(2))


def test_asymmetric_clipping_bounds_the_ratio_on_each_side():
    """clip(r, 1 - c_low, 1 + c_high): a good row's gain stops at 1 + c_high, a bad row's at 1 - c_low."""
    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.5, 0.5])).requires_grad_()
    loss, stats = clipped_surrogate(new, old, torch.tensor([1.0, -1.0]), clip_range=0.1, clip_range_high=0.3)
    # row 0: A = 1, r = 1.5 -> min(1.5, 1.3) = 1.3; row 1: A = -1, r = 0.5 -> max(0.5, 0.9) = 0.9 (as -0.9)
    assert loss.item() == pytest.approx((-1.3 + 0.9) / 2)
    assert stats.clipfrac_high == 0.5 and stats.clipfrac_low == 0.5
    symmetric, _ = clipped_surrogate(new, old, torch.tensor([1.0, -1.0]), clip_range=0.1)
    assert symmetric.item() == pytest.approx((-1.1 + 0.9) / 2)


def test_nft_optimality_and_loss_closed_form():
    adv = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0])
    assert torch.allclose(nft_optimality(adv, adv_clip=2.0), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="adv_clip"):
        nft_optimality(adv, 0.0)

    # One row, two dims: v_theta = (1, 0), v_old = (0, 0), target = (1, 1), beta = 0.5, r = 0.75.
    v_theta = torch.tensor([[1.0, 0.0]], requires_grad=True)
    v_old, target = torch.zeros(1, 2), torch.ones(1, 2)
    loss, stats = nft_loss(v_theta, v_old, target, torch.tensor([0.75]), beta=0.5)
    # v+ = (0.5, 0): error ((0.5)^2 + 1) / 2 = 0.625; v- = (-0.5, 0): error ((1.5)^2 + 1) / 2 = 1.625
    assert stats.positive_error == pytest.approx(0.625) and stats.negative_error == pytest.approx(1.625)
    assert loss.item() == pytest.approx(0.75 * 0.625 + 0.25 * 1.625)
    assert stats.drift == pytest.approx(0.5)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v_theta, v_old, target, torch.tensor([0.75]), beta=0.0)


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_nft_gradient_at_the_old_policy_points_along_the_optimality(r):
    """At v_theta = v_old the gradient is 2 beta (2r - 1)(v_old - v) / D: towards the target for r > 1/2."""
    torch.manual_seed(0)
    v_old, target = torch.randn(3, 4), torch.randn(3, 4)
    v_theta = v_old.clone().requires_grad_()
    loss, _ = nft_loss(v_theta, v_old, target, torch.full((3,), r), beta=0.2)
    loss.sum().backward()
    assert torch.allclose(v_theta.grad, 2 * 0.2 * (2 * r - 1) * (v_old - target) / 4, atol=1e-6)


def test_nft_needs_only_the_edits_and_trains_at_the_sampling_weights():
    """NFT.prepare draws the same noise levels, noise and v_old from a final-only rollout as from the whole
    trajectory, and its first loss trains at the sampling weights (v_theta = v_old: drift 0)."""
    policy = ShapeEditPolicy.build(TINY, INSTRUCTIONS, seed=0, trainable=TrainableConfig(lora_rank=4))
    images = [Image.new("RGB", (TINY.image_size, TINY.image_size), c) for c in ("red", "blue")]
    rollout = policy.sample(
        images, INSTRUCTIONS[:2], SamplerConfig(num_steps=3, noise_level=0.7), torch.Generator().manual_seed(0)
    )
    nft = NFT(
        AlgoConfig(name="nft", nft_terms=2, group_size=2, prompts_per_step=1, micro_batch_size=2, updates_per_step=1)
    )
    targets = [MicroTargets(torch.tensor([0.9, 0.2]), seed=7)]
    (full,) = nft.prepare(policy, [rollout], targets)
    (slim,) = nft.prepare(policy, [rollout.final_only()], targets)
    assert rollout.final_only().latents.shape[1] == 1
    for (s1, x1, t1, v1), (s2, x2, t2, v2) in zip(full[0], slim[0]):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(t1, t2) and torch.equal(v1, v2)
    loss, row = nft.loss(policy, rollout.final_only(), slim, 0)
    assert row["drift"] == 0.0 and torch.isfinite(loss) and loss.requires_grad


def test_nft_kl_is_the_clean_edit_distance_on_the_loss_scale():
    """sigma^2 ||v_theta - v_ref||^2 = ||x0_theta - x0_ref||^2 (x0 = x - sigma v): at sigma 0.001 a velocity gap
    costs what the same clean-edit gap costs at sigma 1, and NFT.loss adds exactly kl_beta times it."""
    v_ref = torch.zeros(2, 3)
    for sigma in (1.0, 0.001):
        v_theta = torch.full((2, 3), 0.5 / sigma)  # the clean-edit estimates differ by 0.5 everywhere
        assert nft_kl(v_theta, v_ref, sigma).item() == pytest.approx(0.25)

    policy = ShapeEditPolicy.build(TINY, INSTRUCTIONS, seed=0, trainable=TrainableConfig(lora_rank=4))
    with torch.no_grad():  # move the adapters off the reference
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = [Image.new("RGB", (TINY.image_size, TINY.image_size), c) for c in ("red", "blue")]
    rollout = policy.sample(
        images, INSTRUCTIONS[:2], SamplerConfig(num_steps=3, noise_level=0.7), torch.Generator().manual_seed(0)
    )
    targets = [MicroTargets(torch.tensor([0.9, 0.2]), seed=7)]
    cfg = dict(name="nft", nft_terms=2, group_size=2, prompts_per_step=1, micro_batch_size=2, updates_per_step=1)
    plain, penalised = NFT(AlgoConfig(**cfg)), NFT(AlgoConfig(**cfg, kl_beta=0.5))
    prepared = plain.prepare(policy, [rollout], targets)[0]
    sigma, x, _, _ = prepared[0][0]
    with torch.no_grad():
        x0_theta = x - sigma * policy.flow_velocity(rollout, x, sigma)
        with policy.reference():
            x0_ref = x - sigma * policy.flow_velocity(rollout, x, sigma)
    want = ((x0_theta - x0_ref) ** 2).mean().item()
    loss, _ = plain.loss(policy, rollout, prepared, 0)
    loss_kl, row = penalised.loss(policy, rollout, prepared, 0)
    assert want > 0 and row["kl"] == pytest.approx(want, rel=1e-4)
    assert (loss_kl - loss).item() == pytest.approx(0.5 * want, rel=1e-4)


def test_nft_trains_the_decision_draw_towards_the_codes_of_the_better_rows():
    """With a decision code, NFT's first term of each micro-batch adds the same loss on the draw's mean: its gradient
    on the mean's offset at the sampling weights is mean_b 2 beta (2 r_b - 1)(mu_old - z_b), so a step moves the mean
    towards the codes of rows with r > 1/2. Other terms, and a policy without a code, add nothing."""
    trainable = TrainableConfig(lora_rank=4)
    policy = ShapeEditPolicy.build(dataclasses.replace(TINY, decision_code=True), INSTRUCTIONS, 0, trainable)
    images = [Image.new("RGB", (TINY.image_size, TINY.image_size), c) for c in ("red", "blue", "green", "white")]
    rollout = policy.sample(
        images, INSTRUCTIONS, SamplerConfig(num_steps=3, noise_level=0.7), torch.Generator().manual_seed(0)
    )
    codes = rollout.condition.codes
    optimality = (codes < codes.median()).float()  # the rows with the lowest codes are the better ones
    cfg = dict(name="nft", nft_terms=2, group_size=2, prompts_per_step=2, micro_batch_size=4, updates_per_step=1)
    nft = NFT(AlgoConfig(**cfg, nft_beta=0.5))
    (prepared,) = nft.prepare(policy, [rollout.final_only()], [MicroTargets(optimality, seed=3)])
    bias = policy.transformer.code_mean.bias
    loss, row = nft.loss(policy, rollout.final_only(), prepared, 0)
    loss.backward()
    want = (2 * 0.5 * (2 * optimality - 1) * (0.0 - codes)).mean()  # mu_old = 0: the pretrained mean
    assert row["decision_drift"] == 0.0
    torch.testing.assert_close(bias.grad, want.reshape(1))
    assert bias.grad.item() > 0  # gradient descent lowers the mean, towards the better rows' codes
    bias.grad = None
    _, later = nft.loss(policy, rollout.final_only(), prepared, 1)
    assert "decision_drift" not in later
    plain = ShapeEditPolicy.build(TINY, INSTRUCTIONS, 0, trainable)
    (prepared,) = nft.prepare(plain, [rollout.final_only()], [MicroTargets(optimality, seed=3)])
    assert prepared[2] is None and plain.decision_draw(rollout) is None


def test_ppo_matches_a_hand_computed_update():
    """PPO.prepare and PPO.loss on a tiny rollout against the update written out by hand: advantages R - V(x_t)
    whitened over the trained steps, the surrogate -mean(A_t r_t) (r = 1 on policy) plus value_coef x
    0.5 mean((V - R)^2); the gradients of both models equal those of the hand-written loss."""
    from rl.algorithms import PPO
    from rl.value import value_inputs

    torch.manual_seed(0)
    policy = ShapeEditPolicy.build(TINY, INSTRUCTIONS, seed=0, trainable=TrainableConfig(lora_rank=4))
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = [Image.new("RGB", (TINY.image_size, TINY.image_size), c) for c in ("red", "blue", "green", "white")]
    rollout = policy.sample(
        images, INSTRUCTIONS, SamplerConfig(num_steps=3, noise_level=0.7), torch.Generator().manual_seed(0)
    )
    returns = torch.tensor([0.9, 0.1, 0.5, 0.3])
    ppo = PPO(AlgoConfig(name="ppo", group_size=4, prompts_per_step=1, micro_batch_size=4, updates_per_step=1))
    (prepared,) = ppo.prepare(policy, [rollout], [MicroTargets(returns, seed=0)])
    term = ppo.terms(rollout)[0]
    loss, row = ppo.loss(policy, rollout, prepared, term)
    got = torch.autograd.grad(loss, [*policy.trainable_parameters(), *ppo.value.parameters()])

    # by hand
    with torch.no_grad():
        old = torch.stack([ppo.value(value_inputs(rollout, t)) for t in range(rollout.num_steps)], 1)  # (B, T)
    raw = returns[:, None] - old
    trained = raw[rollout.stochastic]
    advantages = (raw - trained.mean()) / (trained.std() + 1e-6)
    ratio = torch.exp(policy.log_prob(rollout, term).log_probs - rollout.log_probs[:, term])
    values = ppo.value(value_inputs(rollout, term))
    hand = -(advantages[:, term] * ratio).mean() + ppo.cfg.value_coef * 0.5 * ((values - returns) ** 2).mean()
    want = torch.autograd.grad(hand, [*policy.trainable_parameters(), *ppo.value.parameters()])
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert row["value_loss"] == pytest.approx(0.5 * ((values - returns) ** 2).mean().item(), rel=1e-5)
    assert any(g.abs().max() > 0 for g in want[: len(policy.trainable_parameters())])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
