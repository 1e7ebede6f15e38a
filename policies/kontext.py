"""FLUX.1 Kontext as an editing policy: our own denoising loop over diffusers' components, Flow-GRPO SDE steps.

    policy = FluxKontextPolicy.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev", torch_dtype=torch.bfloat16)
    rollout = policy.sample(images, instructions, SamplerConfig(num_steps=10, guidance=2.5), generator)
    step = policy.log_prob(rollout, t)   # == rollout.log_probs[:, t] bit for bit with unchanged weights

`FluxKontextPolicy.tiny()` builds the same thing from tiny random configs (tests, CPU). Trained weights go
out with `save_pretrained(dir)` and come back onto the same base with `load_pretrained(dir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tokenizers import pre_tokenizers
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from policies.adapters import Trainable, TrainableConfig
from policies.images import check_batch, images_to_tensor, to_rgb, to_uint8
from policies.rollout import Rollout, shared
from policies.sampling import SamplerConfig, refuse_categorical, stochastic_steps
from policies.sde import StepOutput, sde_step_with_logprob

# Regex (peft's target_modules, matched against whole module names): attention of both block kinds (single
# blocks have attn.to_q/k/v too) and the double blocks' feed-forwards.
LORA_TARGETS = (
    r".*\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)"
)
DEFAULT_GUIDANCE = 2.5  # FLUX.1 Kontext's recommended guidance embedding


@dataclass
class KontextCondition:
    """Everything a velocity needs besides x and sigma, computed once per rollout (no text encoder or VAE after)."""

    prompt_embeds: Tensor  # (B, L, D) T5 hidden states of the instructions, network dtype
    pooled_prompt_embeds: Tensor  # (B, P) CLIP pooled embedding of the instructions
    image_latents: Tensor  # (B, N, C) packed VAE latents of the source images (concatenated after x)
    negative_prompt_embeds: Tensor | None  # (B, L, D) T5 states of sampler.negative_prompt; None without true CFG
    negative_pooled_prompt_embeds: Tensor | None  # (B, P); None without true CFG
    text_ids: Tensor = shared()  # (L, 3) text position ids (zeros)
    img_ids: Tensor = shared()  # (2N, 3) position ids of x's tokens, then of the source tokens (first coordinate 1)


class FluxKontextPolicy:
    """FLUX.1 Kontext [dev] editing images of one size (height x width), LoRA-trained by default."""

    def __init__(
        self,
        components: dict[str, Any],
        trainable: TrainableConfig | None = None,
        height: int = 512,
        width: int = 512,
        max_sequence_length: int = 512,
        seed: int = 0,
    ):
        """Wrap diffusers components: scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
        transformer (FluxKontextPipeline's names). `seed` makes the LoRA initialisation reproducible."""
        self.pipe = FluxKontextPipeline(**components)
        for module in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.transformer):
            module.eval().requires_grad_(False)
        multiple = self.pipe.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (VAE factor x 2x2 packing), got {height}x{width}"
            )
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512] (T5 tokens), got {max_sequence_length}")
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        self.version = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.trainable = Trainable(
                self.pipe.transformer, trainable or TrainableConfig(), default_targets=LORA_TARGETS
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        torch_dtype: torch.dtype = torch.bfloat16,
        trainable: TrainableConfig | None = None,
        height: int = 512,
        width: int = 512,
        max_sequence_length: int = 512,
    ) -> FluxKontextPolicy:
        """Load a diffusers FLUX.1 Kontext checkpoint (a hub id or a local pipeline folder) onto the CPU.

        Move it with `.to(device)`. Adapters saved by save_pretrained go on top with load_pretrained.
        """
        pipe = FluxKontextPipeline.from_pretrained(path_or_id, dtype=torch_dtype)
        return cls(dict(pipe.components), trainable, height, width, max_sequence_length)

    @classmethod
    def tiny(
        cls,
        height: int = 32,
        width: int = 32,
        trainable: TrainableConfig | None = None,
        seed: int = 0,
        torch_dtype: torch.dtype = torch.float32,
    ) -> FluxKontextPolicy:
        """A FLUX.1 Kontext of the real architecture with tiny random weights and local tokenizers (tests, CPU)."""
        components = tiny_components(seed)
        if torch_dtype != torch.float32:
            for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
                components[name].to(torch_dtype)
        return cls(components, trainable, height, width, max_sequence_length=32, seed=seed)

    def to(self, device: torch.device | str) -> FluxKontextPolicy:
        """Move every component, the reference copy of a full fine-tune included; returns the policy."""
        self.pipe.to(device)
        self.trainable.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def drop_encoders(self) -> None:
        """Free the text encoders and the VAE (about 9 GiB at real size): a learner recomputes stored rollouts,
        whose condition holds the encoders' outputs, and runs only the denoiser. sample() refuses afterwards."""
        self.pipe.register_modules(vae=None, text_encoder=None, text_encoder_2=None)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        source_images: list[Image.Image],
        instructions: list[str],
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        group_ids: Tensor | None = None,
    ) -> Rollout:
        """Edit a batch, recording the trajectory and per-step log-probs under the current weights.

        Random numbers come from `generator` in this order: the initial noise (drawn exactly as
        FluxKontextPipeline draws it), the SDE window, then each stochastic step's noise. The step noise is
        drawn on the policy's device, so on a GPU the generator must live there too.

        Args:
            source_images: B PIL images of exactly self.height x self.width, any mode (converted to RGB).
            instructions: B non-empty edit instructions.
            sampler: steps, noise level, SDE window, guidance; default SamplerConfig(guidance=2.5).
            generator: the RNG of the whole rollout.
            group_ids: (B,) int64, default arange(B).
        Returns:
            Rollout with latents (B, T + 1, N, C) packed latents (N = (H/16)(W/16) tokens, C = 64 for FLUX),
            log_probs (B, T), stochastic (B, T), edited_images (B, 3, H, W) uint8, condition a KontextCondition.
        """
        if self.pipe.vae is None:
            raise RuntimeError(
                "this policy's encoders were dropped (drop_encoders: a learner's copy); it cannot sample"
            )
        check_batch(source_images, instructions, self.height, self.width)
        refuse_categorical(sampler, "FLUX.1 Kontext")
        sampler = dataclasses.replace(sampler) if sampler is not None else SamplerConfig(guidance=DEFAULT_GUIDANCE)
        self._check_sampler(sampler)
        batch, device = len(instructions), self.device
        if group_ids is None:
            group_ids = torch.arange(batch)
        elif group_ids.shape != (batch,):
            raise ValueError(f"group_ids must have shape ({batch},), got {tuple(group_ids.shape)}")
        rgb = [to_rgb(image) for image in source_images]

        condition = self._encode(rgb, instructions, sampler)
        channels = self.pipe.transformer.config.in_channels // 4
        factor = self.pipe.vae_scale_factor * 2
        h, w = 2 * (self.height // factor), 2 * (self.width // factor)
        # the pipeline's draw (after a VAE encode that takes no randomness), in float32 whatever the network dtype
        noise = randn_tensor((batch, channels, h, w), generator=generator, device=device, dtype=torch.float32)
        x = self.pipe._pack_latents(noise, batch, channels, h, w)
        sigmas = self._sigmas(sampler.num_steps, x.shape[1])
        stochastic = stochastic_steps(sampler, generator)

        trajectory, log_probs = [x], []
        for i in range(sampler.num_steps):
            velocity = self._velocity(x, sigmas[i], condition, sampler)
            noise_level = sampler.noise_level if stochastic[i] else 0.0
            sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
            out = sde_step_with_logprob(x, velocity, sigma, sigma_next, noise_level, sampler.kind, generator=generator)
            x = out.prev_latents
            trajectory.append(x)
            log_probs.append(out.log_probs)

        return Rollout(
            source_images=images_to_tensor(rgb).to(device),
            instructions=list(instructions),
            latents=torch.stack(trajectory, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            stochastic=stochastic.to(device).expand(batch, -1).clone(),
            edited_images=self._decode(x),
            group_ids=group_ids.to(device=device, dtype=torch.long),
            policy_versions=torch.full((batch,), self.version, dtype=torch.long, device=device),
            condition=condition,
            sigmas=sigmas,
            sampler=sampler,
        )

    def log_prob(self, rollout: Rollout, step: int) -> StepOutput:
        """Recompute step `step` of a stored rollout with the current weights (with grad if enabled).

        Bit-exact with rollout.log_probs[:, step] when the weights and the batch are the ones that sampled it
        (the velocity goes through the same `_velocity` as in sample). Rows for which the step was an ODE step
        (concatenated rollouts with different SDE windows) get log-prob 0, as stored; their `mean` is still
        the SDE mean, so mask them out of a KL term with rollout.stochastic[:, step].

        Args:
            rollout: a Rollout sampled by this policy (or a select / cat of such).
            step: 0 <= step < T.
        Returns:
            StepOutput: prev_latents (B, N, C) = rollout.latents[:, step + 1], log_probs (B,), mean (B, N, C), std ().
        """
        if not 0 <= step < rollout.num_steps:
            raise ValueError(f"step must be in [0, {rollout.num_steps}), got {step}")
        if not isinstance(rollout.condition, KontextCondition):
            raise TypeError(
                f"rollout.condition is a {type(rollout.condition).__name__}: not sampled by a FluxKontextPolicy"
            )
        sampler, sigmas = rollout.sampler, rollout.sigmas
        x = rollout.latents[:, step]
        stochastic = rollout.stochastic[:, step]
        noise_level = sampler.noise_level if bool(stochastic.any()) else 0.0
        velocity = self._velocity(x, sigmas[step], rollout.condition, sampler)
        sigma, sigma_next = sigmas[step].item(), sigmas[step + 1].item()
        out = sde_step_with_logprob(
            x, velocity, sigma, sigma_next, noise_level, sampler.kind, prev_latents=rollout.latents[:, step + 1]
        )
        if noise_level > 0 and not bool(stochastic.all()):
            out.log_probs = torch.where(stochastic, out.log_probs, torch.zeros_like(out.log_probs))
        return out

    # ------------------------------------------------------------------ training state

    def reference(self) -> contextlib.AbstractContextManager:
        """Within the block, sample and log_prob use the reference policy (adapters disabled / frozen copy)."""
        return self.trainable.reference()

    def trained_module(self) -> nn.Module:
        """The network that holds the trainable weights (ZeRO-3 partitions its parameters in the learner)."""
        return self.trainable.net

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.trainable.parameters()

    def decision_parameters(self) -> list[nn.Parameter]:
        return []  # its decisions are drawn in the initial noise with the rest

    def decision_draw(self, rollout: Rollout) -> None:
        return None

    def trainable_state(self) -> dict[str, Tensor]:
        """Detached copies of the trained tensors by parameter name (LoRA A/B, or every transformer weight)."""
        return self.trainable.state()

    def load_trainable_state(self, state: dict[str, Tensor], version: int) -> None:
        """Load tensors from trainable_state() (weight sync) and stamp later rollouts with `version`."""
        self.trainable.load_state(state)
        self.version = version

    def save_pretrained(self, path: str | Path) -> None:
        """Write the trained weights and this policy's settings to the folder `path` (policies/adapters.py
        Trainable.save_pretrained): LoRA as `pytorch_lora_weights.safetensors` in diffusers' format (a stock
        FluxKontextPipeline loads it with `load_lora_weights(path)`), a full fine-tune as `transformer/`;
        `policy.json` holds the settings, the trainable config and the version."""
        self.trainable.save_pretrained(path, FluxKontextPipeline, self._settings(), self.version)

    def load_pretrained(self, path: str | Path) -> None:
        """Load what save_pretrained wrote onto this policy, built from the same base with the same settings:

        policy = FluxKontextPolicy.from_pretrained(base, trainable=TrainableConfig(...), height=..., width=...)
        policy.load_pretrained(saved_dir)
        """
        self.version = self.trainable.load_pretrained(path, self._settings())

    def _settings(self) -> dict:
        return {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length}

    # ------------------------------------------------------------------ internals

    def _check_sampler(self, sampler: SamplerConfig) -> None:
        if self.pipe.transformer.config.guidance_embeds and sampler.guidance <= 0:
            raise ValueError(
                f"FLUX.1 Kontext is guidance-distilled: set sampler.guidance > 0 (recommended {DEFAULT_GUIDANCE}), "
                f"got {sampler.guidance}"
            )

    def _encode(self, rgb: list[Image.Image], instructions: list[str], sampler: SamplerConfig) -> KontextCondition:
        """Text and source-image conditioning, the way FluxKontextPipeline computes it."""
        batch, device, pipe = len(instructions), self.device, self.pipe
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=list(instructions), device=device, max_sequence_length=self.max_sequence_length
        )
        negative, negative_pooled = None, None
        if sampler.guidance_scale > 1:
            negative, negative_pooled, _ = pipe.encode_prompt(
                prompt=[sampler.negative_prompt] * batch, device=device, max_sequence_length=self.max_sequence_length
            )
        pixels = pipe.image_processor.preprocess(rgb, self.height, self.width)  # (B, 3, H, W) in [-1, 1]
        # the pipeline encodes with the latent mode (argmax): no random numbers are drawn here
        image_latents = pipe._encode_vae_image(pixels.to(device=device, dtype=pipe.vae.dtype), generator=None)
        b, c, h, w = image_latents.shape
        image_latents = pipe._pack_latents(image_latents.to(prompt_embeds.dtype), b, c, h, w)
        latent_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, device, prompt_embeds.dtype)
        image_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, device, prompt_embeds.dtype)
        image_ids[..., 0] = 1
        return KontextCondition(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            image_latents=image_latents,
            negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
            text_ids=text_ids,
            img_ids=torch.cat([latent_ids, image_ids], dim=0),
        )

    def _sigmas(self, num_steps: int, image_seq_len: int) -> Tensor:
        """(T + 1,) float32: the pipeline's schedule (linspace(1, 1/T, T), resolution shift mu), then 0."""
        config = self.pipe.scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        retrieve_timesteps(self.pipe.scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        return self.pipe.scheduler.sigmas.clone()

    def flow_velocity(self, rollout: Rollout, latents: Tensor, sigma: float) -> Tensor:
        """The sampler's velocity at (latents, sigma) with the rollout's condition (EditingPolicy.flow_velocity)."""
        if not isinstance(rollout.condition, KontextCondition):
            raise TypeError(
                f"rollout.condition is a {type(rollout.condition).__name__}: not sampled by a FluxKontextPolicy"
            )
        return self._velocity(latents, rollout.sigmas.new_tensor(float(sigma)), rollout.condition, rollout.sampler)

    def _velocity(self, latents: Tensor, sigma: Tensor, condition: KontextCondition, sampler: SamplerConfig) -> Tensor:
        """(B, N, C) velocity at x = latents (float32) and sigma (a 0-dim float32 tensor), after true CFG.

        The one path both sample and log_prob take, so that they agree to the last bit. The casts follow
        FluxKontextPipeline: x in the network dtype, timestep = (sigma * 1000 in float32) / 1000, guidance float32.
        """
        net = self.trainable.net  # the frozen copy inside reference() for a full fine-tune
        batch, tokens = latents.shape[:2]
        dtype = condition.prompt_embeds.dtype
        hidden = torch.cat([latents.to(dtype), condition.image_latents], dim=1)
        timestep = (sigma * self.pipe.scheduler.config.num_train_timesteps).expand(batch).to(dtype)
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full([1], sampler.guidance, device=latents.device, dtype=torch.float32).expand(batch)
        text_ids, img_ids = condition.text_ids.to(latents.device), condition.img_ids.to(latents.device)

        def forward(prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
            out = net(
                hidden_states=hidden,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            return out[:, :tokens]

        velocity = forward(condition.prompt_embeds, condition.pooled_prompt_embeds)
        if sampler.guidance_scale > 1:
            if condition.negative_prompt_embeds is None:
                raise ValueError(
                    "sampler.guidance_scale > 1 but the rollout was sampled without negative prompt embeddings"
                )
            negative = forward(condition.negative_prompt_embeds, condition.negative_pooled_prompt_embeds)
            velocity = negative + sampler.guidance_scale * (velocity - negative)
        return velocity

    def _decode(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 from (B, N, C) packed float32 latents."""
        vae = self.pipe.vae
        x = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        return to_uint8(vae.decode(x.to(vae.dtype), return_dict=False)[0])


# ---------------------------------------------------------------------- tiny components


def tiny_tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """A CLIP BPE tokenizer with no merges (one token per byte) and a T5 unigram over printable ASCII, built offline."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(char, -3.0) for char in string.ascii_letters + string.digits + string.punctuation]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, t5


# The tiny FLUX.1 Kontext's sizes (tiny_components; launch/presets.py's TINY builds the same at any device)
TINY_SIZES = {
    "flux": dict(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(2, 2, 4),
    ),
    "vae": dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "clip": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    "t5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
}
# FLUX.1 Kontext [dev]'s scheduler settings
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def tiny_components(seed: int = 0) -> dict[str, Any]:
    """FluxKontextPipeline components with FLUX's architecture and tiny random weights (VAE factor 2, 16 channels)."""
    tokenizer, tokenizer_2 = tiny_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextConfig(
            **TINY_SIZES["clip"],
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        text_encoder = CLIPTextModel(clip)
        t5 = T5Config(
            **TINY_SIZES["t5"],
            vocab_size=len(tokenizer_2),
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
        text_encoder_2 = T5EncoderModel(t5)
        vae = AutoencoderKL(**TINY_SIZES["vae"])
        transformer = FluxTransformer2DModel(**TINY_SIZES["flux"], patch_size=1, guidance_embeds=True)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer.eval(),
    }
