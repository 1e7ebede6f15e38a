"""QwenImageEditPolicy on tiny random Qwen-Image-Edit(-Plus) components (CPU, float32, seconds)."""

import contextlib
import json

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from PIL import Image

from policies.adapters import LORA_FILE, TrainableConfig
from policies.qwen_image_edit import (
    CONDITION_AREA,
    QwenEditCondition,
    QwenImageEditPolicy,
    pad_prompts,
    tiny_components,
)
from policies.rollout import Rollout
from policies.sampling import SamplerConfig

H, W = 32, 48  # not square: exercises the aspect ratio of the condition image and img_shapes
INSTRUCTIONS = ["make the sky blue", "add a red hat", "turn the cat into a dog", "remove the tree"]


def images(n: int, seed: int = 0, height: int = H, width: int = W) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def sampler(**changes) -> SamplerConfig:
    return SamplerConfig(**{**dict(num_steps=3, noise_level=0.7), **changes})


def sample(policy: QwenImageEditPolicy, n: int, cfg: SamplerConfig, seed: int = 0) -> Rollout:
    return policy.sample(images(n), INSTRUCTIONS[:n], cfg, generator=torch.Generator().manual_seed(seed))


def perturb(policy: QwenImageEditPolicy, seed: int, version: int = 1, scale: float = 0.3) -> None:
    """Stand-in for training: random LoRA B's (zero at init), or every weight of a full fine-tune."""
    g = torch.Generator().manual_seed(seed)
    state = policy.trainable_state()
    lora = any("lora_B" in name for name in state)
    for name, value in state.items():
        if "lora_B" in name or not lora:
            value += scale * torch.randn(value.shape, generator=g, dtype=value.dtype)
    policy.load_trainable_state(state, version)


def tiny(**changes) -> QwenImageEditPolicy:
    return QwenImageEditPolicy.tiny(**{**dict(height=H, width=W), **changes})


@contextlib.contextmanager
def vision_positions(text_encoder):
    """Give the pipeline's Qwen2.5-VL call the `mm_token_type_ids` it leaves out (diffusers 0.42.1): without
    them transformers 5 silently uses 1D positions for the image tokens; the policy passes them."""

    def add(module, args, kwargs):
        kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == module.config.image_token_id).long()
        return args, kwargs

    handle = text_encoder.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def run_pipeline(
    pipe, image: Image.Image, instruction: str, cfg: SamplerConfig, seed: int, height: int = H, width: int = W
):
    """The stock pipeline's edit: (per-step latents (T, N, C), image (3, H, W) in [0, 1])."""
    steps = []

    def keep(pipe, i, t, kwargs):
        steps.append(kwargs["latents"][0].clone())
        return {}

    guidance = (
        dict(negative_prompt=cfg.negative_prompt, true_cfg_scale=cfg.guidance_scale)
        if cfg.guidance_scale > 1
        else dict(true_cfg_scale=1.0)
    )
    with vision_positions(pipe.text_encoder):
        out = pipe(
            image=image, prompt=instruction, height=height, width=width, num_inference_steps=cfg.num_steps,
            generator=torch.Generator().manual_seed(seed), output_type="pt", callback_on_step_end=keep, **guidance,
        ).images  # fmt: skip
    return torch.stack(steps), out[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run much faster on one thread than on two contended ones (this machine has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy() -> QwenImageEditPolicy:
    """A policy with non-zero LoRA weights (so on-policy checks exercise the adapters); tests must not mutate it."""
    p = tiny()
    perturb(p, seed=123)
    return p


# ---------------------------------------------------------------- parity with diffusers


def test_fresh_lora_is_the_identity():
    """LoRA B starts at zero: with adapters on, the velocity equals the base network's to the bit."""
    p = tiny()
    state = p.trainable_state()
    assert len(state) == 2 * 12 * 2  # A and B on 12 attention / feed-forward linears in each of 2 blocks
    assert all(not v.any() for k, v in state.items() if "lora_B" in k)
    r = sample(p, 2, sampler(guidance_scale=2.0))
    with torch.no_grad():
        ours = p._velocity(r.latents[:, 1], r.sigmas[1], r.condition, 2.0)
        with p.reference():
            base = p._velocity(r.latents[:, 1], r.sigmas[1], r.condition, 2.0)
    assert torch.equal(ours, base)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_noise_zero_reproduces_the_diffusers_pipeline(monkeypatch, guidance_scale):
    """Every step's latents and the decoded edit match QwenImageEditPipeline(**the same components) with the same
    seed: max |diff| < 1e-5 asserted (0 measured); the uint8 edit within 1 level of the pipeline's [0, 1] image.

    The pipeline's 1024^2 condition area is swapped for H * W in its module (and in the policy) so this runs in
    about a second; test_default_condition_area_reproduces_the_pipeline covers the real area."""
    area = H * W
    real = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda _, ratio: real(area, ratio))
    p = tiny(condition_area=area)
    cfg = sampler(noise_level=0.0, guidance_scale=guidance_scale, negative_prompt=" ")
    r = sample(p, 1, cfg, seed=7)
    pipe = QwenImageEditPipeline(**p.pipeline.components)  # the transformer carries the fresh LoRA
    pipe.set_progress_bar_config(disable=True)
    steps, image = run_pipeline(pipe, images(1)[0], INSTRUCTIONS[0], cfg, seed=7)
    assert torch.equal(r.sigmas, p.pipeline.scheduler.sigmas)
    assert (r.latents[0, 1:] - steps).abs().max() < 1e-5
    with torch.no_grad():
        decoded = (p._decode(r.latents[:, -1])[0] / 2 + 0.5).clamp(0, 1)
    assert (decoded - image).abs().max() < 1e-5
    assert (r.edited_images[0].float() - (image * 255).round()).abs().max() <= 1


def test_noise_zero_reproduces_the_plus_pipeline(monkeypatch):
    """plus=True matches QwenImageEditPlusPipeline (384^2 text-encoder image, VAE area swapped for H * W):
    max |diff| < 1e-5 on every step's latents, with true CFG."""
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", H * W)
    p = tiny(plus=True)
    cfg = sampler(noise_level=0.0, guidance_scale=2.5, negative_prompt=" ")
    r = sample(p, 1, cfg, seed=5)
    pipe = QwenImageEditPlusPipeline(**p.pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    steps, _ = run_pipeline(pipe, images(1)[0], INSTRUCTIONS[0], cfg, seed=5)
    assert (r.latents[0, 1:] - steps).abs().max() < 1e-5


def test_default_condition_area_reproduces_the_pipeline():
    """At the pipelines' own 1024^2 condition area (4096 image-latent tokens): max |diff| < 1e-5 (0 measured)."""
    p = tiny(height=32, width=32, condition_area=CONDITION_AREA)
    cfg = sampler(num_steps=2, noise_level=0.0, guidance_scale=1.0)
    r = p.sample(images(1, height=32, width=32), INSTRUCTIONS[:1], cfg, generator=torch.Generator().manual_seed(1))
    assert r.condition.image_latents.shape[1] == 64 * 64
    pipe = QwenImageEditPipeline(**p.pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    steps, _ = run_pipeline(pipe, images(1, height=32, width=32)[0], INSTRUCTIONS[0], cfg, seed=1, height=32, width=32)
    assert (r.latents[0, 1:] - steps).abs().max() < 1e-5


def test_text_encoder_gets_vision_positions(policy):
    """Our prompt embeddings are the pipeline's encode_prompt once it passes mm_token_type_ids; as shipped
    (diffusers 0.42.1 + transformers 5) the pipeline gives the image tokens 1D positions, and differs."""
    pipe = policy.pipeline
    image = pipe.image_processor.resize(images(1)[0], H, W)
    ours, mask = policy._encode_text([INSTRUCTIONS[0]], [image])
    assert mask.all()
    with torch.no_grad():
        with vision_positions(pipe.text_encoder):
            fixed = pipe.encode_prompt(prompt=INSTRUCTIONS[0], image=image, device="cpu")[0]
        stock = pipe.encode_prompt(prompt=INSTRUCTIONS[0], image=image, device="cpu")[0]
    assert torch.equal(ours, fixed)
    assert not torch.equal(ours, stock)


def test_system_prefix_is_the_64_dropped_tokens():
    """The tiny tokenizer splits the system prefix into exactly the 64 tokens the pipelines drop, so the kept
    embeddings start at the image (Edit) or at 'Picture 1:' (Plus); a mismatch is refused."""
    for plus, first in [(False, "<|vision_start|>"), (True, "Picture")]:
        pipe = tiny(plus=plus).pipeline
        prompt = pipe.prompt_template_encode.format(
            ("Picture 1: <|vision_start|><|image_pad|><|vision_end|>" if plus else "") + "x"
        )
        tokens = pipe.processor.tokenizer.convert_ids_to_tokens(pipe.processor.tokenizer(prompt)["input_ids"])
        assert pipe.prompt_template_encode_start_idx == 64
        assert tokens[63] == "Ċ" and tokens[64] == first
    pipe = QwenImageEditPipeline(**tiny_components())
    pipe.prompt_template_encode_start_idx = 60
    with pytest.raises(ValueError, match="system prefix into 64 tokens but the pipeline drops 60"):
        QwenImageEditPolicy(pipe, TrainableConfig(), H, W)


# ---------------------------------------------------------------- on-policy log-probs


@pytest.mark.parametrize("batch,guidance_scale", [(2, 1.0), (4, 2.5)])
def test_on_policy_log_prob_is_bit_exact(policy, batch, guidance_scale):
    """log_prob equals the sampled log-prob to the bit at every step (ratio exactly 1), with grad enabled too."""
    r = sample(policy, batch, sampler(num_steps=4, guidance_scale=guidance_scale), seed=3)
    assert r.stochastic[:, :-1].all() and not r.stochastic[:, -1].any()  # the last step is always ODE
    for step in range(r.num_steps):
        with torch.no_grad():
            assert torch.equal(policy.log_prob(r, step).log_probs, r.log_probs[:, step])
        out = policy.log_prob(r, step)
        assert out.log_probs.requires_grad == (
            step < r.num_steps - 1
        )  # gradients reach the LoRA weights on trained steps
        assert torch.equal(out.log_probs.detach(), r.log_probs[:, step])
        assert torch.equal(out.prev_latents, r.latents[:, step + 1])


def test_bfloat16_log_prob_is_bit_exact():
    p = tiny()
    perturb(p, seed=1)
    p.pipeline.to(dtype=torch.bfloat16)
    r = sample(p, 3, sampler(guidance_scale=2.0), seed=2)
    assert r.condition.prompt_embeds.dtype == torch.bfloat16 and r.latents.dtype == torch.float32
    with torch.no_grad():
        for step in range(r.num_steps):
            assert torch.equal(p.log_prob(r, step).log_probs, r.log_probs[:, step])


def test_sde_window_and_cps_log_probs_are_bit_exact(policy):
    cfg = sampler(num_steps=5, kind="cps", sde_window_size=2)
    r = sample(policy, 2, cfg, seed=4)
    assert r.stochastic.shape == (2, 5) and r.stochastic.sum(1).tolist() == [2, 2]
    assert torch.equal(r.stochastic[0], r.stochastic[1])
    assert (r.log_probs[~r.stochastic] == 0).all()
    with torch.no_grad():
        for step in range(5):
            assert torch.equal(policy.log_prob(r, step).log_probs, r.log_probs[:, step])


def test_minibatch_of_a_rollout_reproduces_its_rows(policy):
    """A select()ed chunk runs the transformer at another batch size, which changes float32 rounding on the
    CPU: |log_prob - sampled| < 1e-5 asserted (about 5e-7 measured); the selected fields are the rows."""
    r = sample(policy, 4, sampler(guidance_scale=2.0), seed=5)
    chunk = r.select([2, 0])
    assert chunk.instructions == [INSTRUCTIONS[2], INSTRUCTIONS[0]]
    assert torch.equal(chunk.condition.prompt_embeds, r.condition.prompt_embeds[[2, 0]])
    with torch.no_grad():
        for step in range(r.num_steps):
            assert (policy.log_prob(chunk, step).log_probs - r.log_probs[[2, 0], step]).abs().max() < 1e-5


def test_concatenated_rollouts_need_padded_prompts(policy):
    """Prompts of different lengths pad to different widths: Rollout.cat refuses them until pad_prompts;
    the joined rows then reproduce their log-probs within 1e-5 (masked padding, other batch shape)."""
    a = policy.sample(images(1), ["add a hat"], sampler(guidance_scale=2.0), generator=torch.Generator().manual_seed(1))
    b = policy.sample(
        images(2, seed=1),
        ["turn the big red car into a small blue house", "add a tree"],
        sampler(guidance_scale=2.0),
        generator=torch.Generator().manual_seed(2),
    )
    assert a.condition.prompt_embeds.shape[1] != b.condition.prompt_embeds.shape[1]
    with pytest.raises(RuntimeError):
        Rollout.cat([a, b])
    joined = Rollout.cat(pad_prompts([a, b]))
    assert isinstance(joined.condition, QwenEditCondition) and joined.batch_size == 3
    assert joined.condition.prompt_mask.sum(1).tolist() == [
        int(a.condition.prompt_mask.sum()),
        *b.condition.prompt_mask.sum(1).tolist(),
    ]
    with torch.no_grad():
        for step in range(joined.num_steps):
            assert (policy.log_prob(joined, step).log_probs - joined.log_probs[:, step]).abs().max() < 1e-5


# ---------------------------------------------------------------- seeds, reference, weights


def test_rollout_fields(policy):
    r = sample(policy, 2, sampler(num_steps=3))
    assert r.latents.shape == (2, 4, (H // 16) * (W // 16), 16) and r.latents.dtype == torch.float32
    assert r.log_probs.shape == (2, 3) and r.stochastic.shape == (2, 3) and r.stochastic.dtype == torch.bool
    assert r.edited_images.shape == (2, 3, H, W) and r.edited_images.dtype == torch.uint8
    assert r.source_images.shape == (2, 3, H, W) and torch.equal(
        r.source_images[0].permute(1, 2, 0), torch.from_numpy(np.array(images(1)[0]))
    )
    assert r.group_ids.tolist() == [0, 1] and r.policy_versions.tolist() == [1, 1]
    assert r.sigmas.shape == (4,) and r.sigmas[0] == 1 and r.sigmas[-1] == 0
    # the pipelines round the condition image to multiples of 32 pixels: 32 x 48 becomes 32 x 64
    assert r.condition.image_grid == (32 // 16, 64 // 16) and r.condition.negative_embeds is None
    assert r.condition.image_latents.shape == (2, 2 * 4, 16)
    grouped = policy.sample(images(2), INSTRUCTIONS[:2], sampler(num_steps=2), group_ids=torch.tensor([7, 7]))
    assert grouped.group_ids.tolist() == [7, 7]


def test_same_seed_same_rollout_other_seed_differs(policy):
    a, b, c = (sample(policy, 2, sampler(guidance_scale=2.0), seed=s) for s in (0, 0, 1))
    for field in ("latents", "log_probs", "edited_images"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.latents, c.latents) and not torch.equal(a.log_probs, c.log_probs)


def test_load_trainable_state_round_trip(policy):
    other = tiny()
    other.load_trainable_state(policy.trainable_state(), version=5)
    assert other.version == 5
    r = sample(policy, 2, sampler(), seed=6)
    with torch.no_grad():
        assert torch.equal(other.log_prob(r, 1).log_probs, r.log_probs[:, 1])
    state = policy.trainable_state()
    with pytest.raises(KeyError, match="missing"):
        other.load_trainable_state({k: v for k, v in list(state.items())[1:]}, version=6)


@pytest.mark.parametrize("rank", [8, 0])
def test_save_pretrained_round_trip(tmp_path, rank):
    trained = tiny(trainable=TrainableConfig(lora_rank=rank))
    perturb(trained, seed=4, version=3, scale=0.05 if rank == 0 else 0.3)
    trained.save_pretrained(tmp_path)
    assert (tmp_path / (LORA_FILE if rank else "transformer")).exists()
    assert json.loads((tmp_path / "policy.json").read_text())["version"] == 3
    loaded = tiny(trainable=TrainableConfig(lora_rank=rank))
    loaded.load_pretrained(tmp_path)
    assert loaded.version == 3
    mine, theirs = trained.trainable_state(), loaded.trainable_state()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ValueError, match="does not match"):
        tiny(trainable=TrainableConfig(lora_rank=4 if rank else 8)).load_pretrained(tmp_path)


def test_saved_lora_loads_into_a_stock_pipeline(tmp_path):
    """diffusers reads our LoRA file with its alpha: the stock pipeline's transformer gives our velocity."""
    trained = tiny()
    perturb(trained, seed=2)
    trained.save_pretrained(tmp_path)
    pipe = QwenImageEditPipeline(**tiny_components(seed=0))
    pipe.load_lora_weights(tmp_path)
    r = sample(trained, 1, sampler(noise_level=0.0))
    untrained = tiny()
    with torch.no_grad():
        ours = trained._velocity(r.latents[:, 1], r.sigmas[1], r.condition, 1.0)
        untrained.trainable.net = pipe.transformer  # the stock network under our velocity code
        theirs = untrained._velocity(r.latents[:, 1], r.sigmas[1], r.condition, 1.0)
        with trained.reference():
            base = trained._velocity(r.latents[:, 1], r.sigmas[1], r.condition, 1.0)
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - base).abs().max() > 1e-3


def test_from_pretrained_reads_a_diffusers_folder(tmp_path):
    """A saved pipeline folder loads (its processor rebuilt without the video processor) into the same policy."""
    QwenImageEditPipeline(**tiny_components(seed=0)).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]  # what the real checkpoint records
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = QwenImageEditPolicy.from_pretrained(
        tmp_path, torch_dtype=torch.float32, height=H, width=W, condition_area=H * W
    )
    built = tiny()
    a, b = sample(loaded, 2, sampler()), sample(built, 2, sampler())
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_a_clear_message(policy):
    two = images(2)
    with pytest.raises(ValueError, match=r"source_images\[1\] is 32x32 but this policy edits 48x32"):
        policy.sample([two[0], images(1, height=32, width=32)[0]], INSTRUCTIONS[:2])
    with pytest.raises(ValueError, match=r"instructions\[1\] is empty"):
        policy.sample(two, ["add a hat", "  "])
    with pytest.raises(ValueError, match="2 source images but 3 instructions"):
        policy.sample(two, INSTRUCTIONS[:3])
    with pytest.raises(ValueError, match="Qwen-Image-Edit's last step is Gaussian"):
        policy.sample(two, INSTRUCTIONS[:2], sampler(sample_last_step=True))
    with pytest.raises(ValueError, match="group_ids must have shape"):
        policy.sample(two, INSTRUCTIONS[:2], sampler(num_steps=2), group_ids=torch.arange(3))
    r = sample(policy, 1, sampler(num_steps=2))
    with pytest.raises(ValueError, match=r"step must be in \[0, 2\)"):
        policy.log_prob(r, 2)
    with pytest.raises(
        ValueError, match="non-finite sigmas for num_steps=1"
    ):  # the real scheduler config's shift_terminal
        policy.sample(two, INSTRUCTIONS[:2], sampler(num_steps=1))
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny(height=40)


def test_any_image_mode_is_accepted(policy):
    rgb = images(1)[0]
    odd = [rgb.convert("RGBA"), rgb.convert("L"), rgb.convert("P")]
    r = policy.sample(odd, INSTRUCTIONS[:3], sampler(num_steps=2))
    assert r.edited_images.shape == (3, 3, H, W)
    assert torch.equal(r.source_images[1], r.source_images[1][:1].expand(3, -1, -1))  # grey stays grey
