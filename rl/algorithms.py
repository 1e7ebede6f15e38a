"""The RL algorithms: their math as pure functions, and GRPO, PPO and NFT behind one seam (bottom of the file).

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470):
    A_i = clip((R_i - mean_group) / (std + eps), -adv_clip, adv_clip), the same for every step of trajectory i
    r = exp(logp_new - logp_old),  L = mean(max(-A r, -A clip(r, 1 - c, 1 + c))) + beta KL
    KL = mean over latent dims of (mean_theta - mean_ref)^2 / (2 std^2)    (std: the step's transition std)
    (a categorical last step, SamplerConfig.sample_last_step: the categorical KL, mean over pixels)
PPO for the denoising MDP (DPOK / DDPO-style, terminal reward): advantages R - V(x_t, t, condition) per
step, the same surrogate, and a clipped value loss.
DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117), on the forward process of the clean edits x0 only:
    r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)            (optimality weight from the group advantages)
    x_t = (1 - t) x0 + t eps,  v = eps - x0           (flow-matching path and target)
    v+ = (1 - beta) v_old + beta v_theta,  v- = (1 + beta) v_old - beta v_theta
    L = r ||v+ - v||^2 + (1 - r) ||v- - v||^2         (no likelihoods: any sampler, ODE included)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from policies.rollout import Rollout
from policies.sampling import num_stochastic_steps
from policies.sde import StepOutput
from rl.value import ValueModel, value_inputs


@dataclass
class Advantages:
    advantages: Tensor  # (B,) one per trajectory
    zero_std: Tensor  # (B,) bool: the row's group has rewards that are all equal (no learning signal)


def group_advantages(
    rewards: Tensor, group_ids: Tensor, std: str = "group", clip: float = 5.0, eps: float = 1e-4
) -> Advantages:
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
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
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


def categorical_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) of per-pixel categorical steps, averaged over pixels like the log-probs: (B,) per row.

    Args: log_p, log_q (B, K, ...) log-probabilities of the K categories (the policy's, the reference's).
    """
    per_pixel = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return per_pixel.flatten(1).mean(dim=1)


def step_kl(out: StepOutput, ref: StepOutput) -> Tensor:
    """KL of one trained step to the reference's: categorical for a categorical draw, Gaussian otherwise. (B,)"""
    if out.log_categories is not None:
        return categorical_kl(out.log_categories, ref.log_categories)
    return gaussian_kl(out.mean, ref.mean, out.std)


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


def nft_loss(
    v_theta: Tensor, v_old: Tensor, target: Tensor, optimality: Tensor, beta: float
) -> tuple[Tensor, NFTStats]:
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


def nft_kl(v_theta: Tensor, v_ref: Tensor, sigma: float) -> Tensor:
    """NFT's penalty for leaving the reference policy: sigma^2 mean ||v_theta - v_ref||^2, the mean squared
    distance of the two clean-edit estimates x0 = x - sigma v at the same x_sigma. Scaled by sigma^2 like
    NFT's main term, so a low noise level (0.001) does not weigh a million times more than sigma = 1.

    Args: v_theta (B, ...) with grad; v_ref (B, ...) the reference's velocity at the same input. Returns a scalar.
    """
    return sigma**2 * ((v_theta - v_ref) ** 2).mean()


# ---- the algorithms behind one seam --------------------------------------------------------------------------
#
# The driver (rl/loop.py) turns a step's rewards into per-row targets with `targets()`. Each learner rank calls
# `prepare()` once on its micro-batches, then `loss()` for every micro-batch and every one of its loss terms
# (`terms()`: the trained denoising steps of GRPO and PPO, the noise levels NFT draws), with one backward each.


@dataclass
class Targets:
    """A step's training targets, one per rollout row, from the driver to the learners."""

    values: Tensor  # (B,) GRPO: advantages; PPO: returns (the total rewards); NFT: optimality r in [0, 1]
    zero_std: Tensor  # (B,) bool: the row's group has rewards that are all equal (no learning signal)


@dataclass
class MicroTargets:
    """One micro-batch's share of the targets."""

    values: Tensor  # (B,)
    seed: int  # seeds any randomness of the loss (NFT's noise), so ranks and resumed runs draw the same


class GRPO:
    """Flow-GRPO: group-relative advantages and the clipped surrogate on every trained SDE step, + beta KL."""

    def __init__(self, cfg):
        self.cfg = cfg

    def modules(self) -> dict[str, tuple[nn.Module, float]]:
        """Models trained beside the policy, with their learning rates (PPO's value model)."""
        return {}

    def terms_per_micro_batch(self, sampler) -> int:
        """Loss terms (backward passes) per micro-batch: the optimizer accumulates over them."""
        return num_stochastic_steps(sampler)

    def targets(self, rewards: Tensor, group_ids: Tensor) -> Targets:
        adv = group_advantages(rewards, group_ids, self.cfg.adv_std, self.cfg.adv_clip)
        values, keep = adv.advantages, ~adv.zero_std
        if self.cfg.drop_zero_std and keep.any():  # mean over the rows that carry signal
            values = values * keep * (len(values) / keep.sum())
        return Targets(values, adv.zero_std)

    def prepare(self, policy, rollouts: list[Rollout], targets: list[MicroTargets]) -> list:
        """What each micro-batch's loss needs beyond the rollout, computed before the optimizer moves."""
        return [t.values for t in targets]

    def terms(self, rollout: Rollout) -> list[int]:
        return rollout.stochastic.any(0).nonzero().flatten().tolist()

    def loss(self, policy, rollout: Rollout, prepared, term: int) -> tuple[Tensor, dict]:
        return self._surrogate(policy, rollout, prepared, term)

    def _surrogate(self, policy, rollout: Rollout, advantages: Tensor, step: int) -> tuple[Tensor, dict]:
        """Clipped surrogate on step `step` (advantages (B,)), + kl_beta KL to the reference policy."""
        cfg = self.cfg
        out = policy.log_prob(rollout, step)
        loss, stats = clipped_surrogate(
            out.log_probs, rollout.log_probs[:, step], advantages, cfg.clip_range, cfg.clip_range_high
        )
        row = asdict(stats)
        if cfg.kl_beta > 0:
            with torch.no_grad(), policy.reference():
                ref = policy.log_prob(rollout, step)
            kl = step_kl(out, ref).mean()
            loss = loss + cfg.kl_beta * kl
            row["kl"] = kl.item()
        return loss, row


class PPO(GRPO):
    """PPO for the denoising MDP: per-step advantages R - V(x_t, t, condition), whitened over the rank's
    trained steps, the same surrogate, + value_coef x the clipped value loss."""

    def __init__(self, cfg, seed: int = 0):
        super().__init__(cfg)
        with torch.random.fork_rng():  # the value model's initial weights from `seed`, whatever the caller's RNG
            torch.manual_seed(seed)
            self.value = ValueModel()

    def modules(self) -> dict[str, tuple[nn.Module, float]]:
        return {"value": (self.value, self.cfg.value_lr)}

    def targets(self, rewards: Tensor, group_ids: Tensor) -> Targets:
        return Targets(rewards.float(), group_advantages(rewards, group_ids, clip=0).zero_std)

    @torch.no_grad()
    def prepare(self, policy, rollouts: list[Rollout], targets: list[MicroTargets]) -> list:
        device = next(self.value.parameters()).device
        old = [torch.stack([self.value(value_inputs(mb, t)) for t in range(mb.num_steps)], 1) for mb in rollouts]
        returns = [t.values.to(device) for t in targets]
        raw = [r[:, None] - v for r, v in zip(returns, old)]
        flat = torch.cat([a[mb.stochastic] for a, mb in zip(raw, rollouts)])  # trained steps only
        return [((a - flat.mean()) / (flat.std() + 1e-6), v, r) for a, v, r in zip(raw, old, returns)]

    def loss(self, policy, rollout: Rollout, prepared, term: int) -> tuple[Tensor, dict]:
        advantages, old_values, returns = prepared
        loss, row = self._surrogate(policy, rollout, advantages[:, term], term)
        vloss = value_loss(self.value(value_inputs(rollout, term)), old_values[:, term], returns, self.cfg.value_clip)
        row["value_loss"] = vloss.item()
        return loss + self.cfg.value_coef * vloss, row


class NFT:
    """DiffusionNFT on the clean edits: for each of nft_terms noise levels sigma (drawn from the rollout's own
    schedule), x_sigma = (1 - sigma) x0 + sigma eps and the loss sigma^2 nft_loss(v_theta, v_old, eps - x0, r,
    beta): the clean-image (x0) form of the velocity loss, so that low noise levels do not dominate.

    The decisions (a policy's `decision_draw`: ShapeEdit's decision code z ~ N(mu, 1)) are trained by the same loss
    with the draw's mean in the velocity's place and the code as the target, once per micro-batch: the implicit
    positive policy's mean (1 - beta) mu_old + beta mu_theta is pulled towards the codes of rows with r > 1/2 and
    the negative one's towards the others, so minimising it sets mu+ to the optimality-weighted mean of the codes,
    which is DiffusionNFT's positive policy (pi+ proportional to r pi_old) for a unit Gaussian. Without it NFT
    could change how a policy draws its edits but never which decisions it takes. The term shares no weights with
    the velocity loss (the network reads the drawn code, not its mean), so its scale only matters where gradients
    are clipped together; the decision weights train at algo.decision_lr.

    v_old is the velocity of the weights that sampled the rollout (the last synced version; the paper's
    soft EMA update of the old policy is not used), computed in `prepare` before the optimizer moves, so
    nothing of the old weights is kept. The velocity is the one the sampler uses (policy.flow_velocity:
    the rollout's condition and guidance; NFT's recipe samples without CFG, guidance_scale 1).
    """

    def __init__(self, cfg):
        self.cfg = cfg

    def modules(self) -> dict[str, tuple[nn.Module, float]]:
        return {}

    def terms_per_micro_batch(self, sampler) -> int:
        return self.cfg.nft_terms

    def targets(self, rewards: Tensor, group_ids: Tensor) -> Targets:
        adv = group_advantages(rewards, group_ids, self.cfg.adv_std, self.cfg.adv_clip)
        return Targets(nft_optimality(adv.advantages, self.cfg.adv_clip), adv.zero_std)

    def terms(self, rollout: Rollout) -> list[int]:
        return list(range(self.cfg.nft_terms))

    @torch.no_grad()
    def prepare(self, policy, rollouts: list[Rollout], targets: list[MicroTargets]) -> list:
        """Per micro-batch: per term (sigma, x_sigma, target eps - x0, v_old), the optimality (B,), and the
        decision draw's old mean (B,) (None for a policy without decisions)."""
        prepared = []
        for mb, t in zip(rollouts, targets):
            generator = torch.Generator().manual_seed(t.seed)
            x0 = mb.latents[:, -1].float()  # the edit: all NFT keeps of a trajectory (Rollout.final_only)
            noise_levels = mb.sigmas[:-1]  # the schedule's nonzero sigmas
            draws = []
            for _ in range(self.cfg.nft_terms):
                sigma = float(noise_levels[torch.randint(len(noise_levels), (1,), generator=generator)])
                eps = torch.randn(x0.shape, generator=generator).to(x0.device)
                x = (1 - sigma) * x0 + sigma * eps
                draws.append((sigma, x, eps - x0, policy.flow_velocity(mb, x, sigma).float()))
            decision = policy.decision_draw(mb)
            prepared.append((draws, t.values.to(x0.device), None if decision is None else decision[0].float()))
        return prepared

    def loss(self, policy, rollout: Rollout, prepared, term: int) -> tuple[Tensor, dict]:
        draws, optimality, mean_old = prepared
        sigma, x, target, v_old = draws[term]
        v_theta = policy.flow_velocity(rollout, x, sigma).float()
        loss, stats = nft_loss(v_theta, v_old, target, optimality, self.cfg.nft_beta)
        # sigma^2 turns velocity errors into clean-image errors (v = (x - x0) / sigma on this path): without
        # it the smallest noise levels of a schedule (0.001) weigh a million times more than sigma = 1
        loss = sigma**2 * loss.mean()
        row = {k: sigma**2 * v for k, v in asdict(stats).items()}
        if mean_old is not None and term == 0:  # the decisions, once per micro-batch
            mean, codes = policy.decision_draw(rollout)
            decision, decision_stats = nft_loss(
                mean[:, None], mean_old[:, None], codes[:, None], optimality, self.cfg.nft_beta
            )
            loss = loss + decision.mean()
            row["decision_drift"] = decision_stats.drift
        if self.cfg.kl_beta > 0:  # distance to the reference policy (adapters off), on the loss's clean-image scale
            with torch.no_grad(), policy.reference():
                v_ref = policy.flow_velocity(rollout, x, sigma).float()
            kl = nft_kl(v_theta, v_ref, sigma)
            loss = loss + self.cfg.kl_beta * kl
            row["kl"] = kl.item()
        return loss, row


def build_algorithm(cfg, seed: int = 0):
    """The algorithm of `cfg` (an AlgoConfig), built once per run by whoever starts the actors: the driver calls
    its targets(), every learner rank trains with a copy (PPO's value model drawn from `seed`, the same on every
    rank)."""
    if cfg.name == "grpo":
        return GRPO(cfg)
    if cfg.name == "ppo":
        return PPO(cfg, seed)
    return NFT(cfg)
