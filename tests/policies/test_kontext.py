"""FluxKontextPolicy on tiny random FLUX.1 Kontext components (CPU, float32, seconds)."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from policies.adapters import Trainable, TrainableConfig
from policies.kontext import FluxKontextPolicy, tiny_components
from policies.rollout import Rollout
from policies.sampling import SamplerConfig

SIZE = 32
INSTRUCTIONS = ["make the sky blue", "add a red hat", "remove the dog", "turn it into a sketch"]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def sampler(**changes) -> SamplerConfig:
    base = dict(num_steps=3, noise_level=0.7, guidance=2.5)
    base.update(changes)
    return SamplerConfig(**base)


def perturb(policy: FluxKontextPolicy, seed: int, version: int = 1, scale: float = 0.3) -> None:
    """Stand-in for training: random LoRA B's (zero at init), or every weight of a full fine-tune."""
    g = torch.Generator().manual_seed(seed)
    state = policy.trainable_state()
    lora = any("lora_B" in name for name in state)
    for name, value in state.items():
        if "lora_B" in name or not lora:
            value += scale * torch.randn(value.shape, generator=g, dtype=value.dtype)
    policy.load_trainable_state(state, version)


def stock_pipeline() -> FluxKontextPipeline:
    pipe = FluxKontextPipeline(**tiny_components(seed=0))  # fresh base weights, no adapters
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINE_CALL = dict(
    height=SIZE, width=SIZE, guidance_scale=2.5, max_area=SIZE * SIZE, _auto_resize=False, max_sequence_length=32
)


def sample(policy: FluxKontextPolicy, n: int, cfg: SamplerConfig, seed: int = 0) -> Rollout:
    return policy.sample(images(n), INSTRUCTIONS[:n], cfg, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run ~50x faster on one thread than on two contended ones (this machine has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy() -> FluxKontextPolicy:
    """A policy with non-zero LoRA weights (so on-policy checks exercise the adapters); tests must not mutate it."""
    p = FluxKontextPolicy.tiny(SIZE, SIZE)
    perturb(p, seed=123)
    return p


# ---------------------------------------------------------------- parity with diffusers


def test_fresh_lora_is_the_identity():
    policy = FluxKontextPolicy.tiny(SIZE, SIZE)
    state = policy.trainable_state()
    assert state and all(not v.any() for k, v in state.items() if "lora_B" in k)
    assert all(v.any() for k, v in state.items() if "lora_A" in k)


@pytest.mark.parametrize("true_cfg", [1.0, 3.0])
def test_noise_zero_reproduces_the_diffusers_pipeline(true_cfg):
    """Our loop at noise 0 vs FluxKontextPipeline.__call__ on the same (adapter-free) components and seed.

    Tolerance 0 (stricter than the 1e-5 one might allow): in float32 on CPU our final packed latents are
    bit-identical to the pipeline's (same noise draw, sigmas, casts and Euler update), and the uint8 edit
    equals the pipeline's `pt` output rounded.
    With true CFG the pipeline's negative_prompt is our sampler.negative_prompt.
    """
    policy = FluxKontextPolicy.tiny(SIZE, SIZE)
    pipe = stock_pipeline()
    cfg = sampler(num_steps=4, noise_level=0.0, guidance_scale=true_cfg, negative_prompt=" ")
    rollout = sample(policy, 2, cfg, seed=7)

    call = dict(
        image=images(2), prompt=INSTRUCTIONS[:2], num_inference_steps=4, true_cfg_scale=true_cfg, **PIPELINE_CALL
    )
    if true_cfg > 1:
        call["negative_prompt"] = [" ", " "]
    latents = pipe(**call, generator=torch.Generator().manual_seed(7), output_type="latent").images
    pixels = pipe(**call, generator=torch.Generator().manual_seed(7), output_type="pt").images

    diff = (rollout.latents[:, -1] - latents).abs().max().item()
    assert torch.equal(rollout.latents[:, -1], latents), f"max |diff| {diff}"
    assert torch.equal(rollout.edited_images, (pixels * 255).round().to(torch.uint8))
    assert torch.equal(rollout.sigmas, pipe.scheduler.sigmas)
    assert not rollout.stochastic.any() and not rollout.log_probs.any()


# ---------------------------------------------------------------- on-policy ratio


@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_on_policy_log_prob_is_bit_exact(policy, batch, kind):
    cfg = sampler(kind=kind)
    rollout = sample(policy, batch, cfg)
    assert rollout.latents.shape == (batch, 4, (SIZE // 4) ** 2, 16) and rollout.latents.dtype == torch.float32
    assert (
        rollout.log_probs.shape == (batch, 3)
        and rollout.stochastic[:, :-1].all()
        and not rollout.stochastic[:, -1].any()
    )
    for t in range(3):
        out = policy.log_prob(rollout, t)
        deterministic = t == 2  # the last step, to sigma 0, is an ODE step (policies/sampling.py)
        assert out.log_probs.requires_grad != deterministic  # the learner's path: gradients reach the LoRA weights
        assert torch.equal(out.log_probs.detach(), rollout.log_probs[:, t]), f"step {t}"
        assert torch.equal(out.prev_latents, rollout.latents[:, t + 1])
    assert rollout.log_probs[:, :2].ne(0).all() and rollout.log_probs[:, 2].eq(0).all()


def test_bfloat16_log_prob_is_bit_exact():
    """The GPU precision path: bf16 network and conditioning, float32 trajectory and SDE math."""
    policy = FluxKontextPolicy.tiny(SIZE, SIZE, torch_dtype=torch.bfloat16)
    perturb(policy, seed=8)
    rollout = sample(policy, 2, sampler(guidance_scale=2.0))
    assert rollout.condition.prompt_embeds.dtype == torch.bfloat16 and rollout.latents.dtype == torch.float32
    for t in range(3):
        assert torch.equal(policy.log_prob(rollout, t).log_probs.detach(), rollout.log_probs[:, t]), f"step {t}"


def test_sde_window_and_true_cfg_log_probs_are_bit_exact(policy):
    cfg = sampler(num_steps=4, sde_window_size=2, guidance_scale=2.0)
    rollout = sample(policy, 2, cfg, seed=3)
    assert rollout.condition.negative_prompt_embeds.shape == rollout.condition.prompt_embeds.shape
    assert rollout.stochastic.sum(dim=1).eq(2).all() and (rollout.stochastic == rollout.stochastic[:1]).all()
    with torch.no_grad():
        for t in range(4):
            got = policy.log_prob(rollout, t).log_probs
            assert torch.equal(got, rollout.log_probs[:, t]), f"step {t}"
            assert got.ne(0).all() == rollout.stochastic[0, t]


def test_minibatch_of_a_rollout_reproduces_its_rows(policy):
    """A select()ed minibatch recomputes its rows' log-probs to within 1e-6 (a different batch shape may change
    the last bit: measured on CPU, rows [0, 1] and [3, 1] bit-exact, the single row [2] off by 1.2e-7 at one step)."""
    rollout = sample(policy, 4, sampler(), seed=5)
    with torch.no_grad():
        for rows in ([0, 1], [3, 1], [2]):
            part = rollout.select(rows)
            assert part.condition.image_latents.shape[0] == len(rows)
            assert torch.equal(part.condition.img_ids, rollout.condition.img_ids)
            for t in range(3):
                got = policy.log_prob(part, t).log_probs
                torch.testing.assert_close(got, rollout.log_probs[rows, t], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- seeds, reference, weights


def test_same_seed_same_rollout_other_seed_differs(policy):
    a, b, c = (sample(policy, 2, sampler(), seed=s) for s in (11, 11, 12))
    for field in ("latents", "log_probs", "edited_images", "stochastic"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.latents[:, 0], c.latents[:, 0])
    assert not torch.equal(a.edited_images, c.edited_images)
    assert torch.equal(a.group_ids, torch.arange(2)) and torch.equal(a.policy_versions, torch.ones(2, dtype=torch.long))
    assert a.edited_images.dtype == torch.uint8 and a.edited_images.shape == (2, 3, SIZE, SIZE)


def test_load_trainable_state_round_trip(policy):
    rollout = sample(policy, 2, sampler())
    state = policy.trainable_state()
    assert all(not v.requires_grad for v in state.values())
    assert {id(p) for p in policy.trainable_parameters()}.isdisjoint({id(v) for v in state.values()})
    try:
        perturb(policy, seed=9, version=2)
        with torch.no_grad():
            assert not torch.equal(policy.log_prob(rollout, 0).log_probs, rollout.log_probs[:, 0])
        policy.load_trainable_state(state, version=5)
        assert policy.version == 5
        with torch.no_grad():
            assert torch.equal(policy.log_prob(rollout, 0).log_probs, rollout.log_probs[:, 0])
        assert sample(policy, 1, sampler()).policy_versions.tolist() == [5]
        with pytest.raises(KeyError, match="missing"):
            policy.load_trainable_state(dict(list(state.items())[1:]), version=6)
    finally:
        policy.load_trainable_state(state, version=1)


@pytest.mark.parametrize("rank", [32, 0])
def test_save_pretrained_round_trip(tmp_path, rank):
    trained = FluxKontextPolicy.tiny(SIZE, SIZE, TrainableConfig(lora_rank=rank))
    perturb(trained, seed=4, version=7)
    trained.save_pretrained(tmp_path)

    loaded = FluxKontextPolicy.tiny(SIZE, SIZE, TrainableConfig(lora_rank=rank))
    loaded.load_pretrained(tmp_path)
    assert loaded.version == 7
    a, b = sample(trained, 2, sampler()), sample(loaded, 2, sampler())
    assert torch.equal(a.latents, b.latents) and torch.equal(a.edited_images, b.edited_images)

    with pytest.raises(ValueError, match="does not match"):
        FluxKontextPolicy.tiny(SIZE, SIZE, TrainableConfig(lora_rank=8 if rank else 32)).load_pretrained(tmp_path)


def test_saved_lora_loads_into_a_stock_pipeline(tmp_path):
    """diffusers reads our LoRA file with its alpha (scale alpha / rank = 2): same edit, max |diff| < 1e-5."""
    trained = FluxKontextPolicy.tiny(SIZE, SIZE)
    perturb(trained, seed=2)
    trained.save_pretrained(tmp_path)
    pipe = stock_pipeline()
    pipe.load_lora_weights(tmp_path)
    ode = sampler(noise_level=0.0)
    ours = sample(trained, 1, ode, seed=3).latents[:, -1]
    untrained = sample(FluxKontextPolicy.tiny(SIZE, SIZE), 1, ode, seed=3).latents[:, -1]
    theirs = pipe(
        image=images(1),
        prompt=INSTRUCTIONS[:1],
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        **PIPELINE_CALL,
    ).images
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - untrained).abs().max() > 1e-2


def test_from_pretrained_reads_a_diffusers_folder(tmp_path):
    FluxKontextPipeline(**tiny_components(seed=0)).save_pretrained(tmp_path)
    loaded = FluxKontextPolicy.from_pretrained(
        tmp_path, torch_dtype=torch.float32, height=SIZE, width=SIZE, max_sequence_length=32
    )
    built = FluxKontextPolicy.tiny(SIZE, SIZE)
    a, b = sample(loaded, 2, sampler()), sample(built, 2, sampler())
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_a_clear_message(policy):
    with pytest.raises(ValueError, match=r"source_images\[1\] is 16x32 .* edits 32x32"):
        policy.sample([images(1)[0], Image.new("RGB", (16, 32))], INSTRUCTIONS[:2], sampler())
    with pytest.raises(ValueError, match=r"instructions\[1\] is empty"):
        policy.sample(images(2), ["make it blue", "  "], sampler())
    with pytest.raises(ValueError, match="2 source images but 3 instructions"):
        policy.sample(images(2), INSTRUCTIONS[:3], sampler())
    with pytest.raises(ValueError, match="guidance-distilled"):
        policy.sample(images(1), INSTRUCTIONS[:1], sampler(guidance=0.0))
    with pytest.raises(ValueError, match="FLUX.1 Kontext's last step is Gaussian"):
        policy.sample(images(1), INSTRUCTIONS[:1], sampler(sample_last_step=True))
    with pytest.raises(ValueError, match="group_ids"):
        policy.sample(images(2), INSTRUCTIONS[:2], sampler(), group_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of 4"):
        FluxKontextPolicy.tiny(30, 32)
    rollout = sample(policy, 1, sampler())
    with pytest.raises(ValueError, match=r"step must be in \[0, 3\)"):
        policy.log_prob(rollout, 3)


def test_any_image_mode_is_accepted(policy):
    rgb = images(3, seed=1)
    odd = [rgb[0].convert("RGBA"), rgb[1].convert("L"), rgb[2].convert("P")]
    groups = torch.tensor([0, 0, 1])
    rollout = policy.sample(
        odd, INSTRUCTIONS[:3], sampler(), generator=torch.Generator().manual_seed(0), group_ids=groups
    )
    assert rollout.source_images.shape == (3, 3, SIZE, SIZE) and rollout.source_images.dtype == torch.uint8
    assert torch.equal(rollout.source_images[0], torch.from_numpy(np.array(rgb[0])).permute(2, 0, 1))  # opaque RGBA
    assert torch.equal(rollout.group_ids, groups)
    assert dataclasses.asdict(rollout.sampler) == dataclasses.asdict(sampler())


def test_gradient_checkpointing_gives_the_same_gradients():
    """TrainableConfig.gradient_checkpointing (policy.trainable.gradient_checkpointing in RL) recomputes activations
    in the backward: the same log-probs and LoRA gradients, to the bit in float32; a network without it is refused."""
    grads = []
    for checkpointing in (False, True):
        policy = FluxKontextPolicy.tiny(SIZE, SIZE, TrainableConfig(lora_rank=4, gradient_checkpointing=checkpointing))
        perturb(policy, seed=3)  # fresh LoRA B is zero: give the adapters a gradient path of their own
        assert policy.pipe.transformer.is_gradient_checkpointing == checkpointing
        rollout = sample(policy, 2, sampler())
        policy.log_prob(rollout, 0).log_probs.sum().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="cannot recompute"):
        Trainable(torch.nn.Linear(2, 2), TrainableConfig(gradient_checkpointing=True), ["weight"])
