"""The contract of policies/policy.py:EditingPolicy, kept by every editing policy on tiny random models (CPU).

ShapeEdit, FLUX.1 Kontext, Qwen-Image-Edit and Qwen-Image-Edit-Plus, each with LoRA and as a full fine-tune:
`.to` moves every component (the frozen reference copy too), the on-policy ratio is exactly 1, deterministic
steps have log-prob 0, flow_velocity is the velocity behind a step's mean, reference() is the untrained
network, and save_pretrained / load_pretrained restores the trained weights. The cases are read from the
registry (policies/registry.py POLICIES: every kind, with each of its `contract_options`), so a new editing policy
is tested by adding its entry there.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from policies.adapters import Trainable, TrainableConfig
from policies.registry import POLICIES, tiny_policy
from policies.rollout import Rollout
from policies.sampling import SamplerConfig

SIZE = 32  # every tiny policy edits 32x32 images
INSTRUCTIONS = ["make the red circle blue", "remove the green square"]
CASES = {
    "-".join([kind, *(f"{k}={v}" for k, v in options.items())]): (kind, options)
    for kind, entry in POLICIES.items()
    for options in entry.contract_options
}
RANKS = {"lora": 4, "full": 0}
SAMPLER = SamplerConfig(
    num_steps=3, noise_level=0.7, guidance=2.5
)  # guidance: Kontext's embedding; the others ignore it

pytestmark = pytest.mark.parametrize("rank", RANKS.values(), ids=RANKS.keys())


def build(name: str, rank: int):
    kind, options = CASES[name]
    trainable = TrainableConfig(lora_rank=rank, lora_alpha=8.0)
    return tiny_policy(kind, SIZE, trainable, POLICIES[kind].options(**options))


def load_saved(name: str, rank: int, path: Path):
    """What save_pretrained wrote, loaded onto a policy built from the same base."""
    policy = build(name, rank)
    policy.load_pretrained(path)
    return policy


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def sample(policy, seed: int = 0, sampler: SamplerConfig = SAMPLER) -> Rollout:
    return policy.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(seed))


def perturb(policy, seed: int, version: int = 1) -> None:
    """Stand-in for training: every trained tensor moves (LoRA A and B, or every weight of a full fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in policy.trainable_state().items()
    }
    policy.load_trainable_state(state, version)


def held(policy) -> list:
    """Every object the policy holds, found through the attributes of its own and diffusers' pipeline objects
    (so a component added later is seen too); torch modules are not opened."""
    found, stack, seen = [], [policy], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif not isinstance(obj, nn.Module) and type(obj).__module__.startswith(("policies.", "diffusers.pipelines.")):
            stack.extend(vars(obj).values())
    return found


@pytest.fixture(params=CASES)
def name(request) -> str:
    return request.param


def test_to_moves_every_component(name, rank):
    policy = build(name, rank)
    assert policy.to("cpu") is policy
    assert policy.to(torch.device("meta")) is policy  # a device other than the CPU that needs no accelerator
    objects = held(policy)
    modules = [obj for obj in objects if isinstance(obj, nn.Module)]
    trainable = [obj for obj in objects if isinstance(obj, Trainable)]
    assert len(trainable) == 1 and trainable[0].net in modules
    assert (trainable[0].frozen is None) == (rank > 0)
    if rank == 0:
        assert trainable[0].frozen in modules
    left = [type(m).__name__ for m in modules for t in [*m.parameters(), *m.buffers()] if t.device.type != "meta"]
    assert not left, f"tensors left behind in {sorted(set(left))}"
    assert all(p.device.type == "meta" for p in policy.trainable_parameters())


def test_on_policy_ratio_is_exactly_one(name, rank):
    policy = build(name, rank).to("cpu")
    perturb(policy, seed=1)  # non-zero LoRA B: the adapters take part
    rollout = sample(policy)
    assert rollout.stochastic[:, :-1].all() and not rollout.stochastic[:, -1].any()
    for t in range(rollout.num_steps):
        out = policy.log_prob(rollout, t)  # with grad, as the learner calls it
        assert torch.equal(out.log_probs.detach(), rollout.log_probs[:, t]), f"step {t}"
        assert torch.equal(out.prev_latents, rollout.latents[:, t + 1])
        assert out.log_probs.requires_grad == bool(rollout.stochastic[0, t])  # gradients reach the trained weights
    with pytest.raises(ValueError, match=r"step must be in \[0, 3\)"):
        policy.log_prob(rollout, 3)


def test_deterministic_steps_have_log_prob_zero(name, rank):
    """Rows for which a step was an ODE step get log-prob 0, as stored, and no error: the last step (ODE for
    every row) and rollouts with different SDE windows, concatenated (recomputed at another batch size, so the
    stochastic rows agree to float32 rounding)."""
    policy = build(name, rank)
    perturb(policy, seed=2)
    window = SamplerConfig(num_steps=3, noise_level=0.7, guidance=2.5, sde_window_size=1)
    first = sample(policy, 0, window)
    other = next(
        r for r in (sample(policy, s, window) for s in range(1, 20)) if not torch.equal(r.stochastic, first.stochastic)
    )
    both = Rollout.cat([first, other])
    with torch.no_grad():
        for t in range(both.num_steps):
            out = policy.log_prob(both, t)
            ode = ~both.stochastic[:, t]
            assert torch.equal(out.log_probs[ode], torch.zeros(int(ode.sum()))), f"step {t}"
            assert out.log_probs[~ode].ne(0).all(), f"step {t}"
            torch.testing.assert_close(out.log_probs, both.log_probs[:, t], rtol=0, atol=1e-5)
            if ode.all():
                assert out.std == 0


def test_flow_velocity_is_the_velocity_behind_a_step(name, rank):
    """At a stored ODE step, log_prob's mean is x + (s' - s) v: flow_velocity gives that v, with grad."""
    policy = build(name, rank)
    rollout = sample(policy, sampler=SamplerConfig(num_steps=3, noise_level=0.0, guidance=2.5))
    s, s_next = float(rollout.sigmas[0]), float(rollout.sigmas[1])
    with torch.no_grad():
        mean = policy.log_prob(rollout, 0).mean
    v = policy.flow_velocity(rollout, rollout.latents[:, 0], s)
    torch.testing.assert_close(
        rollout.latents[:, 0].float() + (s_next - s) * v.float(), mean.float(), rtol=1e-4, atol=1e-5
    )
    assert v.requires_grad
    noisy = policy.flow_velocity(rollout, torch.randn_like(rollout.latents[:, -1]), 0.5)  # any latents, any sigma
    assert noisy.shape == v.shape and torch.isfinite(noisy).all()


def test_reference_is_the_untrained_network(name, rank):
    """Within reference() log_prob is the network before training (adapters off, or the frozen copy), to the
    bit; after the block the trained weights are back."""
    policy = build(name, rank)
    rollout = sample(policy)
    steps = range(rollout.num_steps - 1)  # the last step is an ODE step (log-prob 0 whatever the weights)
    with torch.no_grad():
        before = [policy.log_prob(rollout, t).log_probs for t in steps]
        perturb(policy, seed=3)
        after = [policy.log_prob(rollout, t).log_probs for t in steps]
        with policy.reference():
            reference = [policy.log_prob(rollout, t).log_probs for t in steps]
        again = [policy.log_prob(rollout, t).log_probs for t in steps]
    for t in steps:
        assert not torch.equal(after[t], before[t]), f"step {t}: the perturbation changed nothing"
        assert torch.equal(reference[t], before[t]), f"step {t}"
        assert torch.equal(again[t], after[t]), f"step {t}"


def test_save_pretrained_round_trip(name, rank, tmp_path):
    policy = build(name, rank)
    perturb(policy, seed=4, version=3)
    policy.save_pretrained(tmp_path)
    loaded = load_saved(name, rank, tmp_path)
    assert loaded.version == 3
    saved, back = policy.trainable_state(), loaded.trainable_state()
    assert back.keys() == saved.keys()
    assert all(torch.equal(back[k], saved[k]) for k in saved)


def test_trained_module_holds_every_trainable_weight_and_a_learner_needs_only_it(name, rank):
    """trained_module() is the network ZeRO-3 partitions: it owns every trainable parameter. A learner's copy
    drops the encoders where the policy can (drop_encoders): log-probs of stored rollouts are unchanged, and
    sampling is refused by name."""
    policy = build(name, rank)
    perturb(policy, seed=5)
    owned = {id(p) for p in policy.trained_module().parameters()}
    assert all(id(p) in owned for p in policy.trainable_parameters())
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert all(id(p) in trainable for p in policy.decision_parameters())  # trained at algo.decision_lr
    rollout = sample(policy)
    # what NFT trains for the decisions: a policy draws them (ShapeEdit's decision code, tests/rl/test_algorithms.py)
    # exactly when it has decision weights
    assert (policy.decision_draw(rollout) is None) == (policy.decision_parameters() == [])
    before = [policy.log_prob(rollout, t).log_probs.detach() for t in range(rollout.num_steps)]
    policy.drop_encoders()
    for t in range(rollout.num_steps):
        assert torch.equal(policy.log_prob(rollout, t).log_probs.detach(), before[t]), f"step {t}"
    try:  # a policy whose encoders are a few MB keeps them and still samples; the others refuse by name
        sample(policy)
    except RuntimeError as e:
        assert "encoders were dropped" in str(e)
