"""One denoising step of a flow-matching editor, stochastic or not, with its exact log-probability.

Flow path x_s = (1 - s) x0 + s eps; sigmas run from 1 (noise) to 0 (data); the network predicts the
velocity v = eps - x0. Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, eqs. 9-10) turns the Euler ODE step
into an SDE step with the same marginals, whose transition is Gaussian, so each step has a log-density:

    sde: std_s = a sqrt(s / (1 - s))     (at s == 1 the next sigma goes in the denominator)
         mean  = x (1 + std_s^2 d / (2 s)) + v (1 + std_s^2 (1 - s) / (2 s)) d,   d = s' - s < 0
         x'    = mean + std_s sqrt(-d) xi
    cps: (coefficients-preserving, Wang et al. 2025) std = s' sin(a pi / 2),
         mean = (1 - s') (x - s v) + sqrt(s'^2 - std^2) (x + (1 - s) v),  x' = mean + std xi

Log-prob convention: the Gaussian log-density **averaged over the latent dimensions** (not summed), one
number per sample; cps drops the constants and the 1 / (2 std^2) scale, as its authors do, so its
log-probs (and the ratio clip that suits them, ~1e-5) are on a different scale from sde's (~1e-4).
All of it runs in float32 whatever the network's dtype: the ratio exp(logp_new - logp_old) is taken
between numbers that must agree to the last bit on-policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("sde", "cps")


@dataclass
class StepOutput:
    prev_latents: Tensor  # (B, ...) x at the next sigma, float32
    log_probs: Tensor  # (B,) log-density of prev_latents, mean over latent dims (0 for a deterministic step)
    mean: Tensor  # (B, ...) the transition mean (what the KL to the reference compares)
    std: Tensor  # () the transition standard deviation (0 for a deterministic step)
    log_categories: Tensor | None = None
    """A categorical step's (sample_last_step) log-probabilities of each pixel's categories, (B, K, H, W): what
    its KL to the reference compares (mean and std are then unused). None for a Gaussian step."""


def sde_step_with_logprob(
    latents: Tensor,
    velocity: Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    kind: str = "sde",
    prev_latents: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Step from sigma to sigma_next, sampling x' (or scoring a given one) and its log-probability.

    Args:
        latents: (B, ...) x at sigma.
        velocity: (B, ...) the network's velocity at (x, sigma), after guidance.
        sigma, sigma_next: current and next sigma, 1 >= sigma > sigma_next >= 0.
        noise_level: a; 0 gives the deterministic Euler step x + (s' - s) v with log-prob 0.
        kind: "sde" (Flow-GRPO) or "cps" (coefficients-preserving).
        prev_latents: (B, ...) when given, x' is not sampled: its log-prob under this step is returned
            (what the learner does with a stored trajectory).
        generator: the RNG for xi when sampling.
    Returns:
        StepOutput with prev_latents (sampled or the given ones), log_probs (B,), mean, std.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {KINDS}")
    if not 1.0 >= sigma > sigma_next >= 0.0:
        raise ValueError(f"sigmas must satisfy 1 >= sigma > sigma_next >= 0, got {sigma} -> {sigma_next}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    x = latents.float()
    v = velocity.float()
    s, s_next = float(sigma), float(sigma_next)
    d = s_next - s
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    if noise_level == 0:
        mean = x + d * v
        out = mean if prev_latents is None else prev_latents.float()
        return StepOutput(out, torch.zeros(x.shape[0], dtype=torch.float32, device=x.device), mean, zero)

    if kind == "sde":
        std_s = noise_level * math.sqrt(s / (1.0 - (s_next if s == 1.0 else s)))
        mean = x * (1.0 + std_s**2 / (2.0 * s) * d) + v * (1.0 + std_s**2 * (1.0 - s) / (2.0 * s)) * d
        std = std_s * math.sqrt(-d)
    else:
        std = s_next * math.sin(noise_level * math.pi / 2.0)
        mean = (1.0 - s_next) * (x - s * v) + math.sqrt(max(s_next**2 - std**2, 0.0)) * (x + (1.0 - s) * v)
    if prev_latents is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)
        prev_latents = mean + std * noise
    prev = prev_latents.float()
    dims = tuple(range(1, x.ndim))
    if std == 0.0:  # cps at s' = 0: the last step is deterministic
        return StepOutput(prev, torch.zeros(x.shape[0], dtype=torch.float32, device=x.device), mean, zero)
    if kind == "sde":
        log_probs = -((prev - mean) ** 2) / (2.0 * std**2) - math.log(std) - 0.5 * math.log(2.0 * math.pi)
    else:
        log_probs = -((prev - mean) ** 2)
    return StepOutput(prev, log_probs.mean(dim=dims), mean, torch.tensor(std, dtype=torch.float32, device=x.device))
