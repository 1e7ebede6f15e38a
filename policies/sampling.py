"""How a policy samples: the sampler settings shared by every editing model, and the SDE window.

Flow-GRPO trains on stochastic steps only. With an SDE window (Flow-GRPO-Fast, MixGRPO) only a few
consecutive steps are stochastic, drawn afresh for each rollout batch; the other steps are ODE (Euler)
steps, which cost nothing to train because they are not trained. Evaluation uses `noise_level = 0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies.sde import KINDS


@dataclass
class SamplerConfig:
    num_steps: int = 10
    """Denoising steps of one rollout."""
    noise_level: float = 0.7
    """a in the SDE step; 0 = deterministic ODE sampling (evaluation)."""
    kind: str = "sde"
    """'sde' (Flow-GRPO) or 'cps' (coefficients-preserving); see policies/sde.py."""
    sde_window_size: int = 0
    """Number of consecutive stochastic (trained) steps; 0 = every step."""
    sde_window_max_start: int = -1
    """Latest step the window may start at (inclusive); -1 = any step that fits the window."""
    guidance_scale: float = 1.0
    """True classifier-free guidance (a second, unconditional forward); 1 = off."""
    guidance: float = 0.0
    """Guidance embedding of guidance-distilled models (FLUX.1 Kontext: 2.5); ignored by models without one."""
    negative_prompt: str = " "
    """The unconditional prompt used by true CFG."""
    gaussian_steps: bool = True
    """False: with sample_last_step, the Gaussian steps run as ODE steps and only the categorical last step is
    stochastic and trained, so its gradient is not diluted by steps whose noise barely changes the edit."""
    temperature: float = 1.0
    """The categorical last step's temperature (sample_last_step): pixels are drawn from softmax(logits /
    temperature). Below 1 the draws stay nearer the most probable category, which evaluation takes."""
    sample_last_step: bool = False
    """Draw the last step (to sigma 0) from a per-pixel categorical distribution and train it like the SDE steps,
    when noise_level > 0. Only for a policy whose clean-image estimate is a classifier (the ShapeEdit palette
    policy); the Gaussian policies refuse it. Such a policy is otherwise nearly deterministic: its last step
    takes each pixel's most probable category, whatever noise came before, so a group's edits coincide."""

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.kind not in KINDS:
            raise ValueError(f"sampler kind must be one of {KINDS}, got {self.kind!r}")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if not 0 <= self.sde_window_size <= max(self.num_steps - 1, 1):
            raise ValueError(
                f"sde_window_size must be in [0, num_steps - 1 = {self.num_steps - 1}] (the window never holds the "
                f"last step), got {self.sde_window_size}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.gaussian_steps and not self.sample_last_step:
            raise ValueError(
                "gaussian_steps=false leaves no stochastic step to train: set sample_last_step=true (a palette "
                "policy) or gaussian_steps=true"
            )
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no CFG), got {self.guidance_scale}")


def stochastic_steps(cfg: SamplerConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which steps are sampled with noise (and trained): a (T,) bool mask.

    All False at noise_level 0. The last step (to sigma 0) is an ODE step: its Gaussian transition std is
    ~0, so its log-prob ratio explodes at the smallest weight change (Flow-GRPO leaves it out too); with
    `sample_last_step` it is a categorical draw instead, and stochastic. Without a window every other step
    is stochastic; with one, `sde_window_size` consecutive steps starting at a step drawn uniformly from
    [0, last start], with the given generator.
    """
    mask = torch.zeros(cfg.num_steps, dtype=torch.bool)
    if cfg.noise_level == 0:
        return mask
    mask[-1] = cfg.sample_last_step
    if not cfg.gaussian_steps:
        return mask
    if cfg.sde_window_size == 0:
        mask[: max(cfg.num_steps - 1, 1)] = True
        return mask
    last = max(cfg.num_steps - 1 - cfg.sde_window_size, 0)
    if cfg.sde_window_max_start >= 0:
        last = min(last, cfg.sde_window_max_start)
    device = generator.device if generator is not None else "cpu"  # a CUDA generator draws on its own device
    start = int(torch.randint(0, last + 1, (1,), generator=generator, device=device))
    mask[start : start + cfg.sde_window_size] = True
    return mask


def refuse_categorical(cfg: SamplerConfig, model: str) -> None:
    """For a policy whose every step is Gaussian: refuse sample_last_step before anything is sampled."""
    if cfg.sample_last_step:
        raise ValueError(
            f"sampler.sample_last_step: {model}'s last step is Gaussian, with no categorical draw; set it false"
        )


def num_stochastic_steps(cfg: SamplerConfig) -> int:
    """How many steps stochastic_steps marks (the same for every window start): the loss terms of one rollout
    for the likelihood-based learners. A private generator leaves the global RNG alone."""
    return int(stochastic_steps(cfg, torch.Generator().manual_seed(0)).sum())
