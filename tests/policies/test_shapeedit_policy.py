"""The ShapeEdit policy on a tiny config: on-policy ratio exactly 1, ODE = diffusers' Euler scheduler,
save/load round trips, bad input refused, and flow matching learns (the shared contract: test_contract.py)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from policies.adapters import TrainableConfig
from policies.rollout import Rollout
from policies.sampling import SamplerConfig
from policies.shapeedit import ShapeEditPolicy, ShapeEditPolicyConfig, flow_matching_loss

INSTRUCTIONS = ["make the red circle blue", "remove the green square", "move the star to the top left", "turn the background white"]
TINY = ShapeEditPolicyConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, text_hidden_size=32, text_layers=1, max_instruction_tokens=12)


def tiny(lora_rank=4, seed=0):
    return ShapeEditPolicy.build(TINY, INSTRUCTIONS, seed=seed, trainable=TrainableConfig(lora_rank=lora_rank, lora_alpha=8))


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def perturb(policy, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("batch,guidance_scale,kind", [(2, 1.0, "sde"), (4, 1.0, "sde"), (3, 2.5, "sde"), (2, 1.0, "cps")])
def test_on_policy_ratio_is_exactly_one(batch, guidance_scale, kind):
    policy = tiny()
    perturb(policy)  # non-zero LoRA, so the adapters take part
    sampler = SamplerConfig(num_steps=4, noise_level=0.8, guidance_scale=guidance_scale, kind=kind)
    rollout = policy.sample(images(batch), (INSTRUCTIONS * 2)[:batch], sampler, torch.Generator().manual_seed(0))
    assert rollout.latents.shape == (batch, 5, 3, 32, 32) and rollout.log_probs.shape == (batch, 4)
    for t in range(3):  # the last step (to sigma 0) is an ODE step
        assert torch.equal(policy.log_prob(rollout, t).log_probs, rollout.log_probs[:, t]), f"step {t}"
    # the learner's minibatch: the same rows, selected
    half = rollout.select([0, 1])
    half_again = policy.sample(images(batch)[:2], (INSTRUCTIONS * 2)[:2], sampler, torch.Generator().manual_seed(5))
    assert torch.equal(policy.log_prob(half_again, 1).log_probs, half_again.log_probs[:, 1])
    diff = (policy.log_prob(half, 1).log_probs - half.log_probs[:, 1]).abs().max().item()
    assert diff < 1e-5, f"a selected minibatch (batch {batch} -> 2) drifts by {diff}"


def test_ode_sampling_equals_the_diffusers_euler_scheduler():
    policy = tiny()
    perturb(policy)
    srcs, texts = images(2), INSTRUCTIONS[:2]
    rollout = policy.sample(srcs, texts, SamplerConfig(num_steps=5, noise_level=0.0), torch.Generator().manual_seed(3))
    assert not rollout.stochastic.any() and torch.equal(rollout.log_probs, torch.zeros(2, 5))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(5)
    x = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    c = rollout.condition
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = policy.velocity(x, float(t) / 1000, c.source, c.text_embeds, c.pooled_embeds)
            x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(rollout.latents[:, -1], x, rtol=0, atol=1e-6)


def test_seeds_reproduce_and_differ():
    policy = tiny()
    sampler = SamplerConfig(num_steps=3)
    a = policy.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    b = policy.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    c = policy.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(1))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)


def test_trainable_state_and_save_load_round_trip(tmp_path):
    policy = tiny()
    perturb(policy)
    sampler = SamplerConfig(num_steps=3)
    state = policy.trainable_state()
    assert state and all("lora" in k for k in state)
    other = tiny()
    other.load_trainable_state(state, version=7)
    assert other.version == 7
    for name, value in other.trainable_state().items():
        assert torch.equal(value, state[name])
    policy.save_pretrained(tmp_path / "p")
    loaded = ShapeEditPolicy.from_pretrained(tmp_path / "p")
    a = policy.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    b = loaded.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(KeyError, match="missing"):
        other.load_trainable_state({}, 1)
    with pytest.raises(FileNotFoundError, match="not a saved ShapeEdit policy"):
        ShapeEditPolicy.from_pretrained(tmp_path)


def test_bad_input_is_refused_and_any_mode_accepted():
    policy = tiny()
    sampler = SamplerConfig(num_steps=2)
    with pytest.raises(ValueError, match="but this policy edits 32x32"):
        policy.sample([Image.new("RGB", (64, 64))], ["x"], sampler)
    with pytest.raises(ValueError, match="empty"):
        policy.sample(images(1), [""], sampler)
    with pytest.raises(ValueError, match="2 source images but 1 instructions"):
        policy.sample(images(2), ["x"], sampler)
    odd = [Image.new("RGBA", (32, 32), (255, 0, 0, 128)), Image.new("L", (32, 32), 9), Image.new("P", (32, 32))]
    rollout = policy.sample(odd, INSTRUCTIONS[:3], sampler)
    assert rollout.source_images[0, :, 0, 0].tolist() == [255, 127, 127]  # half-transparent red over white


def test_rollout_select_and_cat():
    policy = tiny()
    sampler = SamplerConfig(num_steps=2)
    a = policy.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    b = policy.sample(images(3, 1), INSTRUCTIONS[1:], sampler, torch.Generator().manual_seed(1))
    both = Rollout.cat([a, b])
    assert both.batch_size == 5 and both.instructions == INSTRUCTIONS[:2] + INSTRUCTIONS[1:]
    back = both.select([2, 3, 4])
    assert torch.equal(back.latents, b.latents) and torch.equal(back.condition.text_embeds, b.condition.text_embeds)
    assert torch.equal(back.sigmas, b.sigmas) and back.instructions == b.instructions
    other = dataclasses.replace(b, sampler=SamplerConfig(num_steps=2, noise_level=0.3))
    with pytest.raises(ValueError, match="sampler"):
        Rollout.cat([a, other])


def test_flow_matching_learns_a_fixed_batch():
    policy = ShapeEditPolicy.build(TINY, INSTRUCTIONS, seed=0)
    policy.text_encoder.requires_grad_(True)
    params = list(policy.transformer.parameters()) + list(policy.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    src = torch.rand(4, 3, 32, 32) * 2 - 1
    tgt = src.flip(-1)
    losses = []
    for step in range(30):
        loss = flow_matching_loss(policy, src, tgt, INSTRUCTIONS, torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def shut_gate(policy, logit):
    """Every pixel's gate logit set to `logit` (the head's gate output ignores its input), content untouched."""
    last = policy.transformer.pixel_head[-1]
    with torch.no_grad():
        last.weight[0].zero_()
        last.bias[0] = logit


def test_a_shut_gate_returns_the_source_exactly_at_noise_0():
    policy = ShapeEditPolicy.build(TINY, INSTRUCTIONS, seed=0)
    assert policy.cfg.parameterisation == "gated"
    shut_gate(policy, -1e4)
    srcs = images(3)
    rollout = policy.sample(srcs, INSTRUCTIONS[:3], SamplerConfig(num_steps=4, noise_level=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(rollout.edited_images, rollout.source_images)
    # an open gate writes the content instead: the output is no longer the source
    shut_gate(policy, 1e4)
    opened = policy.sample(srcs, INSTRUCTIONS[:3], SamplerConfig(num_steps=4, noise_level=0.0), torch.Generator().manual_seed(0))
    assert (opened.edited_images != opened.source_images).float().mean() > 0.5


@pytest.mark.parametrize("changes", [{}, {"head_text_features": 0}, {"parameterisation": "change"}], ids=["gated", "gated_no_text", "change"])
def test_the_last_ode_step_lands_on_the_predicted_clean_image(changes):
    """v = (x - x0_hat) / sigma, so the Euler step to sigma 0 returns x0_hat: the edit is the network's
    estimate at the last sigma, whichever parameterisation."""
    policy = ShapeEditPolicy.build(dataclasses.replace(TINY, **changes), INSTRUCTIONS, seed=0)
    rollout = policy.sample(images(2), INSTRUCTIONS[:2], SamplerConfig(num_steps=3, noise_level=0.0), torch.Generator().manual_seed(1))
    c, s = rollout.condition, float(rollout.sigmas[-2])
    with torch.no_grad():
        x0 = policy.predict_clean(rollout.latents[:, -2], s, c.source, c.text_embeds, c.pooled_embeds)
        v = policy.velocity(rollout.latents[:, -2], s, c.source, c.text_embeds, c.pooled_embeds)
    torch.testing.assert_close(rollout.latents[:, -1], x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(v, (rollout.latents[:, -2] - x0) / s, rtol=1e-5, atol=1e-5)


def test_a_policy_saved_before_the_parameterisation_option_loads_as_change(tmp_path):
    policy = ShapeEditPolicy.build(dataclasses.replace(TINY, parameterisation="change"), INSTRUCTIONS, seed=0)
    policy.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "policy.json").read_text())
    for key in ("parameterisation", "head_features", "head_hidden"):
        del meta["config"][key]
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    loaded = ShapeEditPolicy.from_pretrained(tmp_path)
    assert loaded.cfg.parameterisation == "change" and type(loaded.transformer) is type(policy.transformer)
    sampler = SamplerConfig(num_steps=2)
    a = policy.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    b = loaded.sample(images(2), INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="parameterisation must be one of"):
        ShapeEditPolicyConfig(parameterisation="velocity")


def test_the_gate_loss_teaches_the_changed_pixels():
    """With the gate term, the gate opens on the pixels the edit changes and shuts elsewhere."""
    policy = ShapeEditPolicy.build(TINY, INSTRUCTIONS, seed=0)
    policy.text_encoder.requires_grad_(True)
    params = list(policy.transformer.parameters()) + list(policy.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    src = torch.full((4, 3, 32, 32), -0.5)
    tgt = src.clone()
    tgt[:, :, 8:16, 8:16] = 0.8  # a square drawn on a flat background
    changed = (tgt != src).any(1, keepdim=True)
    for step in range(25):
        loss = flow_matching_loss(policy, src, tgt, INSTRUCTIONS, torch.Generator().manual_seed(step % 3), gate_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    text, pooled = policy.encode_instructions(INSTRUCTIONS)
    with torch.no_grad():
        _, logits = policy.predict(0.9 * tgt + 0.1 * torch.randn(tgt.shape, generator=torch.Generator().manual_seed(9)), 0.1, src, text, pooled)
    gate = torch.sigmoid(logits)
    assert gate[changed].mean() > 0.6 and gate[~changed].mean() < 0.4, (gate[changed].mean(), gate[~changed].mean())
