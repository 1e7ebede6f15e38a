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
from policies.shapeedit import (
    SHAPEEDIT_PALETTE,
    TINY,
    TINY_INSTRUCTIONS,
    ShapeEditPolicy,
    ShapeEditPolicyConfig,
    flow_matching_loss,
)

INSTRUCTIONS = TINY_INSTRUCTIONS
PALETTE = [[220, 40, 40], [40, 80, 220], [245, 245, 245], [20, 20, 20]]


def tiny(lora_rank=4, seed=0):
    return ShapeEditPolicy.build(
        TINY, INSTRUCTIONS, seed=seed, trainable=TrainableConfig(lora_rank=lora_rank, lora_alpha=8)
    )


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def perturb(policy, seed=1, scale=0.05):
    """Random changes to a policy's trainable weights, or to a module's weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters() if isinstance(policy, torch.nn.Module) else policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "batch,guidance_scale,kind", [(2, 1.0, "sde"), (4, 1.0, "sde"), (3, 2.5, "sde"), (2, 1.0, "cps")]
)
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


@pytest.mark.parametrize("parameterisation", ["palette", "gated"])
def test_ode_sampling_equals_the_diffusers_euler_scheduler(parameterisation):
    """Every step matches diffusers' Euler scheduler, the last one too for 'gated'; for 'palette' the last
    step takes the most probable category instead (test_the_last_ode_step_lands_on_the_predicted_clean_image)."""
    policy = ShapeEditPolicy.build(
        dataclasses.replace(TINY, parameterisation=parameterisation),
        INSTRUCTIONS,
        trainable=TrainableConfig(lora_rank=4, lora_alpha=8),
    )
    perturb(policy)
    srcs, texts = images(2), INSTRUCTIONS[:2]
    rollout = policy.sample(srcs, texts, SamplerConfig(num_steps=5, noise_level=0.0), torch.Generator().manual_seed(3))
    assert not rollout.stochastic.any() and torch.equal(rollout.log_probs, torch.zeros(2, 5))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(5)
    x = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    c = rollout.condition
    last = 5 if parameterisation == "gated" else 4
    with torch.no_grad():
        for t in scheduler.timesteps[:last]:
            v = policy.velocity(x, float(t) / 1000, c.source, c.text_embeds, c.pooled_embeds)
            x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(rollout.latents[:, last], x, rtol=0, atol=1e-6)


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


GATED = dataclasses.replace(TINY, parameterisation="gated")


def test_a_shut_gate_returns_the_source_exactly_at_noise_0():
    policy = ShapeEditPolicy.build(GATED, INSTRUCTIONS, seed=0)
    shut_gate(policy, -1e4)
    srcs = images(3)
    rollout = policy.sample(
        srcs, INSTRUCTIONS[:3], SamplerConfig(num_steps=4, noise_level=0.0), torch.Generator().manual_seed(0)
    )
    assert torch.equal(rollout.edited_images, rollout.source_images)
    # an open gate writes the content instead: the output is no longer the source
    shut_gate(policy, 1e4)
    opened = policy.sample(
        srcs, INSTRUCTIONS[:3], SamplerConfig(num_steps=4, noise_level=0.0), torch.Generator().manual_seed(0)
    )
    assert (opened.edited_images != opened.source_images).float().mean() > 0.5


@pytest.mark.parametrize(
    "changes",
    [
        {"parameterisation": "gated"},
        {"parameterisation": "gated", "head_text_features": 0},
        {"parameterisation": "change"},
        {"palette": PALETTE},
    ],
    ids=["gated", "gated_no_text", "change", "palette"],
)
def test_the_last_ode_step_lands_on_the_predicted_clean_image(changes):
    """v = (x - x0_hat) / sigma, so the Euler step to sigma 0 returns x0_hat: the edit is the network's
    estimate at the last sigma, whichever parameterisation; 'palette' takes each pixel's most probable
    category there (the source pixel or a palette colour), which is x0_hat once the classifier is certain."""
    policy = ShapeEditPolicy.build(dataclasses.replace(TINY, **changes), INSTRUCTIONS, seed=0)
    if policy.cfg.parameterisation == "palette":
        perturb(
            policy.transformer.pixel_head, scale=20.0
        )  # an opinionated classifier: categories other than 'keep' win
    rollout = policy.sample(
        images(2), INSTRUCTIONS[:2], SamplerConfig(num_steps=3, noise_level=0.0), torch.Generator().manual_seed(1)
    )
    c, s = rollout.condition, float(rollout.sigmas[-2])
    with torch.no_grad():
        x0, logits = policy.predict(rollout.latents[:, -2], s, c.source, c.text_embeds, c.pooled_embeds)
        v = policy.velocity(rollout.latents[:, -2], s, c.source, c.text_embeds, c.pooled_embeds)
    torch.testing.assert_close(v, (rollout.latents[:, -2] - x0) / s, rtol=1e-5, atol=1e-5)
    if policy.cfg.parameterisation == "palette":
        choice = logits.argmax(1, keepdim=True)
        assert (choice > 0).float().mean() > 0.1 and choice.unique().numel() > 2  # not the source, not one colour
        x0 = torch.where(choice == 0, c.source, policy.palette[(choice[:, 0] - 1).clamp_min(0)].permute(0, 3, 1, 2))
    torch.testing.assert_close(rollout.latents[:, -1], x0, rtol=0, atol=1e-5)


def fit(policy, src, tgt, **loss_terms):
    """25 AdamW steps of flow matching on one (source, target) batch, text encoder included; returns the head's
    logits near the target (sigma 0.1)."""
    policy.text_encoder.requires_grad_(True)
    params = list(policy.transformer.parameters()) + list(policy.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    for step in range(25):
        loss = flow_matching_loss(policy, src, tgt, INSTRUCTIONS, torch.Generator().manual_seed(step % 3), **loss_terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
    text, pooled = policy.encode_instructions(INSTRUCTIONS)
    noisy = 0.9 * tgt + 0.1 * torch.randn(tgt.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return policy.predict(noisy, 0.1, src, text, pooled)[1]


def test_the_gate_loss_teaches_the_changed_pixels():
    """With the gate term, the gate opens on the pixels the edit changes and shuts elsewhere."""
    policy = ShapeEditPolicy.build(GATED, INSTRUCTIONS, seed=0)
    src = torch.full((4, 3, 32, 32), -0.5)
    tgt = src.clone()
    tgt[:, :, 8:16, 8:16] = 0.8  # a square drawn on a flat background
    changed = (tgt != src).any(1, keepdim=True)
    gate = torch.sigmoid(fit(policy, src, tgt, gate_weight=1.0))
    assert gate[changed].mean() > 0.6 and gate[~changed].mean() < 0.4, (gate[changed].mean(), gate[~changed].mean())


def palette_policy():
    return ShapeEditPolicy.build(dataclasses.replace(TINY, palette=PALETTE), INSTRUCTIONS, seed=0)


def test_the_default_palette_is_the_shapeedit_worlds():
    """The default policy classifies into the world's 13 colours (tagged copies: tests/test_copies.py)."""
    assert len(SHAPEEDIT_PALETTE) == 13
    assert (
        ShapeEditPolicyConfig().palette == [list(c) for c in SHAPEEDIT_PALETTE]
        and ShapeEditPolicyConfig().parameterisation == "palette"
    )


def test_an_untrained_palette_policy_keeps_the_source_and_a_confident_one_writes_palette_colours_exactly():
    policy = palette_policy()
    src = images(2)
    sampler = SamplerConfig(num_steps=4, noise_level=0.0)
    rollout = policy.sample(src, INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    # p_0 ~ 0.98 at initialisation: the mean stays within a few levels of the source, and the last step keeps it
    assert (rollout.latents[:, -2] - rollout.condition.source).abs().max() < 1
    assert torch.equal(rollout.edited_images, rollout.source_images)
    last = policy.transformer.pixel_head[-1]
    with torch.no_grad():  # every pixel certain of category 2 (the second palette colour)
        last.weight.zero_()
        last.bias.fill_(-1e4)
        last.bias[2] = 1e4
    rollout = policy.sample(src, INSTRUCTIONS[:2], sampler, torch.Generator().manual_seed(0))
    assert (rollout.edited_images == torch.tensor(PALETTE[1], dtype=torch.uint8).view(1, 3, 1, 1)).all()


def test_the_palette_loss_teaches_each_pixel_its_category_and_round_trips(tmp_path):
    """Cross-entropy against 0 = keep the source, 1 + k = palette colour k: a red square drawn on a white
    background is learnt where it is drawn, the rest kept; the palette survives save/load."""
    policy = palette_policy()
    src = torch.full((4, 3, 32, 32), 245 / 127.5 - 1)
    tgt = src.clone()
    tgt[:, :, 8:16, 8:16] = torch.tensor([220.0, 40.0, 40.0]).view(1, 3, 1, 1) / 127.5 - 1
    changed = (tgt != src).any(1)
    category = fit(policy, src, tgt, edit_weight=1.0).argmax(1)
    assert (category[changed] == 1).float().mean() > 0.9 and (category[~changed] == 0).float().mean() > 0.9
    policy.save_pretrained(tmp_path)
    loaded = ShapeEditPolicy.from_pretrained(tmp_path)
    assert loaded.cfg.palette == PALETTE and torch.equal(loaded.palette, policy.palette)
    with pytest.raises(ValueError, match="needs policy.palette"):
        ShapeEditPolicy.build(dataclasses.replace(TINY, palette=[]), INSTRUCTIONS)
    with pytest.raises(ValueError, match="triples in 0-255"):
        ShapeEditPolicyConfig(parameterisation="palette", palette=[[0, 300, 0]])


def test_a_head_that_reads_source_colours_keeps_ratio_one():
    policy = ShapeEditPolicy.build(
        dataclasses.replace(TINY, palette=PALETTE),
        INSTRUCTIONS,
        seed=0,
        trainable=TrainableConfig(lora_rank=4, lora_alpha=8),
    )
    perturb(policy)
    rollout = policy.sample(
        images(2), INSTRUCTIONS[:2], SamplerConfig(num_steps=3, noise_level=0.7), torch.Generator().manual_seed(0)
    )
    for t in range(2):
        assert torch.equal(policy.log_prob(rollout, t).log_probs, rollout.log_probs[:, t])
    onehot = policy.source_colours(
        policy.palette.view(1, 4, 3, 1).permute(0, 2, 1, 3)
    )  # the palette itself, as a 4x1 image
    assert torch.equal(onehot[0, :, :, 0], torch.eye(4))
    gated = ShapeEditPolicy.build(
        dataclasses.replace(TINY, parameterisation="gated", head_source_colours=True), INSTRUCTIONS
    )
    assert gated.transformer.colour_queries is None  # 'palette' only: ignored by the gated head


def test_the_image_average_weighs_every_edit_alike():
    """'batch' pools the changed pixels of the batch (a big edit outweighs a small one); 'image' averages each
    image's first, so each image with an edit counts once; an image without one is left out."""
    from policies.shapeedit import changed_mean

    loss = torch.zeros(3, 1, 4, 4)
    changed = torch.zeros(3, 1, 4, 4)
    changed[0, :, :, :] = 1  # a big edit with loss 1 per pixel
    loss[0] = 1.0
    changed[1, :, 0, 0] = 1  # a one-pixel edit with loss 3
    loss[1, :, 0, 0] = 3.0
    assert changed_mean(loss, changed, "batch").item() == pytest.approx((16 + 3) / 17)
    assert changed_mean(loss, changed, "image").item() == pytest.approx((1 + 3) / 2)
    with pytest.raises(ValueError, match="'batch' or 'image'"):
        changed_mean(loss, changed, "pixel")


def test_the_distractor_term_prices_the_objects_the_edit_leaves_alone():
    """distractor_weight adds the cross-entropy averaged over the kept pixels that are not the source's most common
    colour (the other objects): a head that also paints the second red square pays it; the background does not."""
    from policies.shapeedit import background_pixels, palette_loss

    palette = torch.tensor(PALETTE, dtype=torch.float32) / 127.5 - 1
    source = palette[2].view(1, 3, 1, 1).repeat(1, 1, 8, 8)  # white
    source[:, :, 1:3, 1:3] = palette[0].view(1, 3, 1, 1)  # two red squares
    source[:, :, 5:7, 5:7] = palette[0].view(1, 3, 1, 1)
    target = source.clone()
    target[:, :, 1:3, 1:3] = palette[1].view(1, 3, 1, 1)  # the first one turns blue
    changed = (target != source).any(1, keepdim=True).float()
    distractors = (1 - changed) * (~background_pixels(source)).float()
    assert background_pixels(source).sum() == 64 - 8 and distractors.sum() == 4
    assert distractors[0, 0, 5:7, 5:7].all()
    logits = torch.zeros(1, 5, 8, 8)
    logits[:, 0] = 5.0  # keep everywhere ...
    logits[:, 2, 1:3, 1:3] = 10.0  # ... but the meant square, turned blue
    right = palette_loss(palette, logits, target, changed, 1.0, "image", distractors, 1.0)
    both = logits.clone()
    both[:, 2, 5:7, 5:7] = 10.0  # the other square turned blue too
    wrong = palette_loss(palette, both, target, changed, 1.0, "image", distractors, 1.0)
    unpriced = palette_loss(palette, both, target, changed, 1.0, "image")
    ce = torch.nn.functional.cross_entropy(both, torch.zeros(1, 8, 8, dtype=torch.long), reduction="none")[0, 5, 5]
    assert (wrong - unpriced).item() == pytest.approx(ce.item(), rel=1e-5)  # the term is the distractors' mean
    assert wrong - right > ce - 1e-3 > 1.0


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_a_drawn_last_step_is_the_classifiers_categorical_draw(temperature):
    """sample_last_step: every pixel's category is drawn from softmax(logits / temperature); the stored log-prob
    is the image's categorical log-likelihood averaged over pixels (categories of one colour pooled), the same
    when the learner recomputes it (ratio 1), with grad; at temperature -> 0 the draw is the most probable."""
    policy = palette_policy()
    perturb(policy.transformer, scale=0.5)  # an unsure classifier: draws differ
    sampler = SamplerConfig(num_steps=3, noise_level=0.7, sample_last_step=True, temperature=temperature)
    src = images(64, seed=3)
    rollout = policy.sample(src, (INSTRUCTIONS * 16)[:64], sampler, torch.Generator().manual_seed(0))
    assert rollout.stochastic.all()
    for t in range(3):
        out = policy.log_prob(rollout, t)
        assert torch.equal(out.log_probs, rollout.log_probs[:, t]), f"step {t}"
    c, x, chosen = rollout.condition, rollout.latents[:, 2], rollout.latents[:, 3]
    with torch.no_grad():
        logits = policy.predict(x, float(rollout.sigmas[2]), c.source, c.text_embeds, c.pooled_embeds)[1]
    probs = (logits / temperature).softmax(dim=1)
    colours = torch.cat(
        [c.source[:, None], policy.palette.view(1, -1, 3, 1, 1).expand(64, -1, -1, 32, 32)], dim=1
    )  # (B, 1 + K, 3, H, W)
    pooled = (probs * (colours - chosen[:, None]).abs().amax(dim=2).lt(1e-3)).sum(
        dim=1
    )  # each pixel's colour's probability
    torch.testing.assert_close(rollout.log_probs[:, 2], pooled.log().flatten(1).mean(dim=1), rtol=0, atol=1e-5)
    # the draws follow the probabilities: how often a pixel keeps its source colour, against its probability
    kept = (chosen - c.source).abs().amax(dim=1).lt(1e-3).float()
    p_kept = (probs * (colours - c.source[:, None]).abs().amax(dim=2).lt(1e-3)).sum(dim=1)
    assert 0.05 < p_kept.mean() < 0.95 and abs(kept.mean() - p_kept.mean()) < 0.01
    cold = dataclasses.replace(sampler, temperature=1e-4, gaussian_steps=False)  # the ODE path evaluation takes
    cold = policy.sample(src[:4], INSTRUCTIONS, cold, torch.Generator().manual_seed(0))
    most_probable = policy.sample(
        src[:4], INSTRUCTIONS, SamplerConfig(num_steps=3, noise_level=0.0), torch.Generator().manual_seed(0)
    )
    assert (cold.latents[:, -1] != most_probable.latents[:, -1]).any(dim=1).float().mean() < 0.01


def test_a_drawn_last_step_pools_keeping_a_palette_pixel_with_painting_its_colour():
    """Sources drawn in the palette's own colours: a pixel kept and the same pixel painted its own colour are one
    outcome, so its probability is p_keep + p_colour. Checked by palette index, pixel by pixel, against the
    stored log-prob (and the unpooled p_keep would differ)."""
    policy = palette_policy()
    perturb(policy.transformer, scale=0.5)
    rng = np.random.default_rng(5)
    which = rng.integers(0, len(PALETTE), (8, 32, 32))  # each source pixel's palette colour
    src = [Image.fromarray(np.asarray(PALETTE, dtype=np.uint8)[w]) for w in which]
    sampler = SamplerConfig(num_steps=3, noise_level=0.7, sample_last_step=True)
    rollout = policy.sample(src, (INSTRUCTIONS * 2)[:8], sampler, torch.Generator().manual_seed(0))
    c, x, chosen = rollout.condition, rollout.latents[:, 2], rollout.latents[:, 3]
    with torch.no_grad():
        probs = policy.predict(x, float(rollout.sigmas[2]), c.source, c.text_embeds, c.pooled_embeds)[1].softmax(
            dim=1
        )  # (B, 1 + K, H, W)
    drawn = (
        (chosen[:, None] - policy.palette.view(1, -1, 3, 1, 1)).abs().amax(dim=2).argmin(dim=1)
    )  # each pixel's palette colour now
    kept = torch.from_numpy(which) == drawn  # (B, H, W): the pixel has its source colour
    p_colour = probs[:, 1:].gather(1, drawn[:, None])[:, 0]
    pooled = torch.where(kept, probs[:, 0] + p_colour, p_colour)
    assert kept.float().mean() > 0.5 and (~kept).any()
    torch.testing.assert_close(rollout.log_probs[:, 2], pooled.log().flatten(1).mean(dim=1), rtol=0, atol=1e-5)
    unpooled = torch.where(kept, probs[:, 0], p_colour).log().flatten(1).mean(dim=1)
    assert (rollout.log_probs[:, 2] - unpooled).min() > 1e-3
    assert torch.equal(policy.log_prob(rollout, 2).log_probs, rollout.log_probs[:, 2])  # the learner's recomputation


def test_a_drawn_last_step_is_refused_where_there_is_no_classifier():
    gated = ShapeEditPolicy.build(dataclasses.replace(TINY, parameterisation="gated"), INSTRUCTIONS)
    with pytest.raises(ValueError, match="sample_last_step needs the 'palette' parameterisation"):
        gated.sample(images(2), INSTRUCTIONS[:2], SamplerConfig(num_steps=3, sample_last_step=True))


def test_an_unknown_parameterisation_is_refused():
    with pytest.raises(ValueError, match="parameterisation must be one of"):
        ShapeEditPolicyConfig(parameterisation="velocity")


def test_a_decision_code_is_drawn_per_edit_read_by_the_network_and_kept_for_the_learner(tmp_path):
    """decision_code: each edit draws z ~ N(0, 1) after its noise and keeps it in the condition, so the learner's
    log-probs are the sampler's (ratio exactly 1); the network reads it; it is saved with the policy; a policy
    without one draws exactly the noise it drew before (its codes are zeros)."""
    trainable = TrainableConfig(lora_rank=4, lora_alpha=8)
    policy = ShapeEditPolicy.build(dataclasses.replace(TINY, decision_code=True), INSTRUCTIONS, 0, trainable)
    sampler = SamplerConfig(num_steps=3, noise_level=0.7)
    rollout = policy.sample(images(4), INSTRUCTIONS, sampler, torch.Generator().manual_seed(0))
    c = rollout.condition
    assert c.codes.shape == (4,) and len(set(c.codes.tolist())) == 4
    for t in range(3):
        assert torch.equal(policy.log_prob(rollout, t).log_probs, rollout.log_probs[:, t]), t
    # the draw of the code is a step of the policy: its mean is trained (through the first stochastic step's
    # log-prob), synced and saved with the adapters
    # (by default its offset only, one for every instruction: TrainableConfig.decision_mean)
    assert "code_mean.bias" in policy.trainable_state() and "code_mean.weight" not in policy.trainable_state()
    decision = policy.decision_parameters()  # trained at algo.decision_lr
    assert [p.shape for p in decision] == [(1,)]
    assert all(any(p is q for q in policy.trainable_parameters()) for p in decision)
    policy.log_prob(rollout, 0).log_probs.sum().backward()
    assert policy.transformer.code_mean.bias.grad.abs().sum() > 0
    per_instruction = dataclasses.replace(trainable, decision_mean="instruction")
    for rank in (4, 0):  # adapters, or every weight: the instruction's weights train only when asked for
        for setting in (trainable, per_instruction):
            built = ShapeEditPolicy.build(
                dataclasses.replace(TINY, decision_code=True),
                INSTRUCTIONS,
                0,
                dataclasses.replace(setting, lora_rank=rank),
            )
            names = {n for n, p in built.transformer.code_mean.named_parameters() if p.requires_grad}
            assert names == ({"weight", "bias"} if setting is per_instruction else {"bias"}), (rank, names)
            assert len(built.decision_parameters()) == len(names)
    with pytest.raises(ValueError, match="decision_mean"):
        TrainableConfig(decision_mean="prompt")
    assert policy.log_prob(rollout, 1).log_probs.requires_grad  # later steps: the SDE transition alone
    x = rollout.latents[:, 1]
    v = policy.velocity(x, 0.5, c.source, c.text_embeds, c.pooled_embeds, c.codes)
    assert not torch.equal(v, policy.velocity(x, 0.5, c.source, c.text_embeds, c.pooled_embeds, c.codes + 1))
    with pytest.raises(ValueError, match="decision code"):
        policy.velocity(x, 0.5, c.source, c.text_embeds, c.pooled_embeds)
    policy.save_pretrained(tmp_path)
    loaded = ShapeEditPolicy.from_pretrained(tmp_path, trainable=trainable)
    again = loaded.sample(images(4), INSTRUCTIONS, sampler, torch.Generator().manual_seed(0))
    assert torch.equal(again.latents, rollout.latents)
    # a policy.json written before decision_mean existed loads its trained weights, the field at its default
    trained = policy.trainable_state()
    trained["code_mean.bias"] = torch.tensor([0.7])
    policy.load_trainable_state(trained, version=3)
    policy.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "policy.json").read_text())
    del meta["trainable"]["decision_mean"]
    (tmp_path / "old" / "policy.json").write_text(json.dumps(meta))
    old = ShapeEditPolicy.from_pretrained(tmp_path / "old", trainable=trainable)
    assert old.version == 3 and old.transformer.code_mean.bias.item() == pytest.approx(0.7)
    with pytest.raises(KeyError, match="decision_mean"):  # weights trained per instruction, read as shared
        old.load_trainable_state({**trained, "code_mean.weight": torch.zeros(1, TINY.text_hidden_size)}, 4)

    plain = tiny()
    assert ShapeEditPolicy.build(TINY, INSTRUCTIONS, 0, trainable).decision_parameters() == []
    drawn = plain.sample(images(4), INSTRUCTIONS, sampler, torch.Generator().manual_seed(0))
    assert torch.equal(drawn.condition.codes, torch.zeros(4))
    assert torch.equal(drawn.latents[:, 0], torch.randn((4, 3, 32, 32), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="decision_code needs"):
        ShapeEditPolicyConfig(parameterisation="change", decision_code=True)


def test_a_head_that_reads_sigma_sees_the_noisy_pixels_scaled_by_their_signal_and_keeps_ratio_one(tmp_path):
    """head_sigma: the per-pixel head reads (1 - sigma) x_sigma, the source and sigma; at sigma 1 nothing of the
    pure noise reaches it directly. The setting survives save/load and the on-policy ratio stays exactly 1."""
    cfg = dataclasses.replace(TINY, palette=PALETTE, head_sigma=True)
    policy = ShapeEditPolicy.build(cfg, INSTRUCTIONS, trainable=TrainableConfig(lora_rank=4, lora_alpha=8))
    seen = []
    hook = policy.transformer.pixel_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    source = torch.rand(2, 3, 32, 32) * 2 - 1
    noisy = torch.randn(2, 3, 32, 32)
    text, pooled = policy.encode_instructions(INSTRUCTIONS[:2])
    k = policy.transformer.config.out_channels
    for sigma in (1.0, 0.25):
        seen.clear()
        with torch.no_grad():
            policy.predict(noisy, sigma, source, text, pooled)
        head_in = seen[0]  # (B, H, W, C): the transformer's features, then the pixels and sigma, then the rest
        pixels = head_in[..., k : k + 7]
        assert torch.allclose(pixels[..., :3], (1 - sigma) * noisy.permute(0, 2, 3, 1))
        assert torch.equal(pixels[..., 3:6], source.permute(0, 2, 3, 1))
        assert torch.all(pixels[..., 6] == sigma)
    hook.remove()
    perturb(policy)
    rollout = policy.sample(
        images(2), INSTRUCTIONS[:2], SamplerConfig(num_steps=3, noise_level=0.7), torch.Generator().manual_seed(0)
    )
    for t in range(2):
        assert torch.equal(policy.log_prob(rollout, t).log_probs, rollout.log_probs[:, t])
    policy.save_pretrained(tmp_path)
    loaded = ShapeEditPolicy.from_pretrained(tmp_path)
    assert loaded.cfg.head_sigma and loaded.transformer.config.head_sigma
    assert torch.equal(loaded.log_prob(rollout, 1).log_probs, rollout.log_probs[:, 1])
    with pytest.raises(ValueError, match="head_sigma needs the 'palette' or 'gated'"):
        ShapeEditPolicyConfig(parameterisation="change", head_sigma=True)
