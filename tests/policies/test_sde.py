"""The shared SDE step (Flow-GRPO, arXiv 2505.05470): its log-prob is a Gaussian density, a = 0 is Euler, seeds
reproduce."""

import math

import pytest
import torch

from policies.sampling import SamplerConfig, num_stochastic_steps, stochastic_steps
from policies.sde import sde_step_with_logprob


def _inputs(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (0.2, 0.0)])
def test_sde_log_prob_is_the_gaussian_density(sigma, sigma_next):
    x, v = _inputs()
    a = 0.7
    out = sde_step_with_logprob(x, v, sigma, sigma_next, a, generator=torch.Generator().manual_seed(1))
    # Flow-GRPO's SDE step (arXiv 2505.05470), written out again here rather than taken from policies/sde.py.
    d = sigma_next - sigma
    std_s = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1.0 else sigma)))
    mean = x * (1 + std_s**2 / (2 * sigma) * d) + v * (1 + std_s**2 * (1 - sigma) / (2 * sigma)) * d
    std = std_s * math.sqrt(-d)
    torch.testing.assert_close(out.mean, mean, rtol=1e-6, atol=1e-6)
    assert out.std.item() == pytest.approx(std, rel=1e-6)
    density = torch.distributions.Normal(mean.double(), std).log_prob(out.prev_latents.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_probs.double(), density, rtol=1e-5, atol=1e-5)
    # Scoring the sampled x' again gives the same number bit for bit.
    again = sde_step_with_logprob(x, v, sigma, sigma_next, a, prev_latents=out.prev_latents)
    assert torch.equal(again.log_probs, out.log_probs)
    # The sample really has that spread around the mean.
    assert ((out.prev_latents - mean) / std).std().item() == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_level_zero_is_the_euler_step(kind):
    x, v = _inputs(2)
    out = sde_step_with_logprob(x, v, 0.8, 0.5, 0.0, kind)
    assert torch.equal(out.prev_latents, x + (0.5 - 0.8) * v)
    assert torch.equal(out.log_probs, torch.zeros(3))


def test_cps_step_matches_its_formula_and_ends_deterministically():
    x, v = _inputs(3)
    a, s, s_next = 0.8, 0.6, 0.4
    out = sde_step_with_logprob(x, v, s, s_next, a, "cps", generator=torch.Generator().manual_seed(0))
    std = s_next * math.sin(a * math.pi / 2)
    mean = (1 - s_next) * (x - s * v) + math.sqrt(s_next**2 - std**2) * (x + (1 - s) * v)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.log_probs, (-((out.prev_latents - mean) ** 2)).mean(dim=(1, 2, 3)))
    last = sde_step_with_logprob(x, v, 0.1, 0.0, a, "cps", generator=torch.Generator().manual_seed(0))
    assert torch.equal(last.prev_latents, last.mean) and torch.equal(last.log_probs, torch.zeros(3))


def test_sampling_is_reproducible_from_a_seed():
    x, v = _inputs(4)
    a = sde_step_with_logprob(x, v, 0.5, 0.4, 1.0, generator=torch.Generator().manual_seed(7))
    b = sde_step_with_logprob(x, v, 0.5, 0.4, 1.0, generator=torch.Generator().manual_seed(7))
    c = sde_step_with_logprob(x, v, 0.5, 0.4, 1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.prev_latents, b.prev_latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.prev_latents, c.prev_latents)


def test_bad_arguments_are_refused():
    x, v = _inputs()
    with pytest.raises(ValueError, match="sigmas must satisfy"):
        sde_step_with_logprob(x, v, 0.4, 0.5, 0.7)
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde_step_with_logprob(x, v, 0.5, 0.4, 0.7, "ddim")
    with pytest.raises(ValueError, match="sde_window_size"):
        SamplerConfig(num_steps=4, sde_window_size=5)


def test_sde_window():
    assert stochastic_steps(SamplerConfig(noise_level=0.0)).sum() == 0
    assert stochastic_steps(SamplerConfig(num_steps=6)).tolist() == [True] * 5 + [False]  # the last step is ODE
    starts = set()
    for seed in range(40):
        mask = stochastic_steps(
            SamplerConfig(num_steps=10, sde_window_size=3, sde_window_max_start=4), torch.Generator().manual_seed(seed)
        )
        on = mask.nonzero().flatten().tolist()
        assert len(on) == 3 and on == list(range(on[0], on[0] + 3)) and on[0] <= 4
        starts.add(on[0])
    assert starts == {0, 1, 2, 3, 4}


def test_a_sampled_last_step_is_stochastic_and_counted():
    """sample_last_step adds the last step to the stochastic ones (gaussian_steps=False: it alone), and
    num_stochastic_steps counts what stochastic_steps marks, for every window."""
    assert stochastic_steps(SamplerConfig(num_steps=4, sample_last_step=True)).tolist() == [True] * 4
    assert stochastic_steps(SamplerConfig(num_steps=4, sample_last_step=True, gaussian_steps=False)).tolist() == [
        False
    ] * 3 + [True]
    assert stochastic_steps(SamplerConfig(num_steps=4, noise_level=0.0, sample_last_step=True)).sum() == 0  # evaluation
    for num_steps in (1, 2, 5):
        for window in range(0, max(num_steps - 1, 1) + 1):
            for last in (False, True):
                for gaussian in (True, False) if last else (True,):
                    cfg = SamplerConfig(
                        num_steps=num_steps, sde_window_size=window, sample_last_step=last, gaussian_steps=gaussian
                    )
                    mask = stochastic_steps(cfg, torch.Generator().manual_seed(num_steps + window))
                    assert int(mask.sum()) == num_stochastic_steps(cfg), cfg
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplerConfig(temperature=0.0)
    with pytest.raises(ValueError, match="gaussian_steps=false leaves no stochastic step to train"):
        SamplerConfig(gaussian_steps=False)
