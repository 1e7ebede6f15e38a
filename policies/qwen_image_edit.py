"""Qwen-Image-Edit (and Edit-Plus, 2509/2511) as an editing policy: diffusers components, our own denoising loop.

Each edit is conditioned on Qwen2.5-VL's last hidden states for [system prompt][source image][instruction]
(the fixed 64-token system prefix dropped, as the pipeline does) and on the source image's packed VAE
latents, appended to the noisy latents along the sequence. Sampling follows QwenImageEdit(Plus)Pipeline
step for step (noise from prepare_latents, shifted scheduler sigmas, true CFG with norm rescaling), but
every step is policies.sde.sde_step_with_logprob, so Flow-GRPO (arXiv 2505.05470) can train it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (
    calculate_dimensions,
    calculate_shift,
    retrieve_timesteps,
)
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import Tensor, nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from policies.adapters import Trainable, TrainableConfig
from policies.images import check_batch, images_to_tensor, to_rgb, to_uint8
from policies.rollout import Rollout
from policies.sampling import SamplerConfig, refuse_categorical, stochastic_steps
from policies.sde import StepOutput, sde_step_with_logprob

CONDITION_AREA = 1024 * 1024
"""Pixel area the pipelines resize the source image to for its VAE latents (and, in Edit, for the text encoder)."""
PLUS_TEXT_ENCODER_AREA = 384 * 384
"""Pixel area QwenImageEditPlusPipeline resizes the source image to for the text encoder."""
PLUS_IMAGE_PROMPT = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
"""What QwenImageEditPlusPipeline puts before the instruction for a single input image."""
DEFAULT_LORA_TARGETS = (
    r".*\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|img_mlp\.net\.0\.proj|img_mlp\.net\.2|txt_mlp\.net\.0\.proj|txt_mlp\.net\.2)"
)
"""Regex (peft's target_modules, matched against whole module names): attention and both streams' MLPs."""


@dataclass
class QwenEditCondition:
    """What the transformer reads besides the noisy latents, computed once per rollout (text encoder and VAE
    are not run again by log_prob). Text rows are zero-padded to the batch's longest with a 0 mask; two
    rollouts padded to different lengths go through `pad_prompts` before Rollout.cat."""

    prompt_embeds: Tensor  # (B, L, D) text-encoder dtype: hidden states after the system prefix, zero-padded
    prompt_mask: Tensor  # (B, L) int64: 1 on real tokens
    image_latents: Tensor  # (B, N_img, 4 z) packed, normalised VAE latents of the source image
    negative_embeds: Tensor | None  # (B, L_neg, D) the negative prompt with the same image; None without CFG
    negative_mask: Tensor | None  # (B, L_neg) int64
    image_grid: tuple[int, int]  # (rows, cols) of packed image-latent tokens (the transformer's img_shapes)

    def padded(self, length: int, negative_length: int) -> QwenEditCondition:
        """The same condition with its text padded (zeros, mask 0) to the given lengths."""

        def pad(x: Tensor | None, n: int) -> Tensor | None:
            if x is None or x.shape[1] == n:
                return x
            if x.shape[1] > n:
                raise ValueError(f"cannot pad a text of {x.shape[1]} tokens to {n}")
            return torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], *x.shape[2:])], dim=1)

        return dataclasses.replace(
            self,
            prompt_embeds=pad(self.prompt_embeds, length),
            prompt_mask=pad(self.prompt_mask, length),
            negative_embeds=pad(self.negative_embeds, negative_length),
            negative_mask=pad(self.negative_mask, negative_length),
        )


def pad_prompts(rollouts: list[Rollout]) -> list[Rollout]:
    """Rollouts of QwenImageEditPolicy with their text padded to one length, so Rollout.cat can join them.

    Padding adds masked tokens: a padded row's velocity is mathematically unchanged but not bit-identical
    (attention over a longer, masked sequence), so log_prob after padding matches the sampled log-probs to
    float32 rounding, not exactly.
    """
    length = max(r.condition.prompt_embeds.shape[1] for r in rollouts)
    negatives = [r.condition.negative_embeds for r in rollouts if r.condition.negative_embeds is not None]
    negative_length = max((n.shape[1] for n in negatives), default=0)
    return [dataclasses.replace(r, condition=r.condition.padded(length, negative_length)) for r in rollouts]


class QwenImageEditPolicy:
    """Qwen-Image-Edit (plus=False) or Qwen-Image-Edit-Plus with one input image (plus=True).

    The source image is resized for the VAE to `condition_area` pixels at its aspect ratio (the pipelines'
    1024^2 by default), whatever the edit size `height` x `width`; in Plus the text encoder sees it at 384^2.
    The text encoder gets `mm_token_type_ids`, so its image tokens get Qwen2.5-VL's 3D positions as in
    training (diffusers 0.42's pipelines omit them and, under transformers 5, fall back to 1D positions).
    The trajectory stays float32 between steps (the pipeline rounds it to the model dtype after each
    step): in float32 the two agree to the bit, in bfloat16 only closely.
    """

    def __init__(
        self,
        pipeline: QwenImageEditPipeline | QwenImageEditPlusPipeline,
        trainable: TrainableConfig,
        height: int,
        width: int,
        condition_area: int = CONDITION_AREA,
    ):
        """Wrap a pipeline's components (its transformer gets LoRA adapters, or is fully trained).

        Args:
            pipeline: components and helper methods; its __call__ is never used.
            trainable: what to train; LoRA targets default to DEFAULT_LORA_TARGETS.
            height, width: the edit size in pixels (multiples of 16); source images must have it.
            condition_area: pixel area of the source image for its VAE latents (aspect ratio kept).
        """
        multiple = pipeline.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        self.pipeline = pipeline
        self._check_prefix()
        self.plus = isinstance(pipeline, QwenImageEditPlusPipeline)
        self.height, self.width = height, width
        self.condition_area = condition_area
        self.version = 0
        self.trainable = Trainable(pipeline.transformer, trainable, DEFAULT_LORA_TARGETS)
        pipeline.text_encoder.requires_grad_(False)
        pipeline.vae.requires_grad_(False)

    # ---------------------------------------------------------------- building

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        torch_dtype: torch.dtype = torch.bfloat16,
        trainable: TrainableConfig | None = None,
        height: int = 512,
        width: int = 512,
        plus: bool = False,
        condition_area: int = CONDITION_AREA,
        device: str | torch.device = "cpu",
    ) -> QwenImageEditPolicy:
        """Load a diffusers Qwen-Image-Edit(-Plus) checkpoint (a local folder or hub id).

        The processor is rebuilt from the checkpoint's `processor/` folder without its video processor
        (which needs torchvision); everything else is the pipeline's own loading.

        Args:
            path_or_id: e.g. "Qwen/Qwen-Image-Edit", or "Qwen/Qwen-Image-Edit-2509" with plus=True.
            torch_dtype: dtype of every component.
            trainable: LoRA settings (default TrainableConfig()); lora_rank=0 trains every transformer weight.
            height, width: the edit size (multiples of 16).
            plus: use QwenImageEditPlusPipeline's prompt and resizing (one input image per edit).
            condition_area: the source image's pixel area for the VAE (the pipelines' 1024^2 by default).
            device: where every component lives.
        """
        tokenizer = Qwen2Tokenizer.from_pretrained(path_or_id, subfolder="processor")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path_or_id, subfolder="processor")
        processor = ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
        pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
        pipeline = pipeline_class.from_pretrained(path_or_id, dtype=torch_dtype, processor=processor).to(device)
        return cls(pipeline, trainable or TrainableConfig(), height, width, condition_area)

    @classmethod
    def tiny(
        cls,
        height: int = 32,
        width: int = 32,
        trainable: TrainableConfig | None = None,
        seed: int = 0,
        plus: bool = False,
        condition_area: int | None = None,
    ) -> QwenImageEditPolicy:
        """A random-weight policy built from tiny configs, offline, in float32 on the CPU.

        condition_area defaults to height * width here (not the pipelines' 1024^2) so tests run in seconds.
        """
        components = tiny_components(seed)
        pipeline = (QwenImageEditPlusPipeline if plus else QwenImageEditPipeline)(**components)
        return cls(pipeline, trainable or TrainableConfig(), height, width, condition_area or height * width)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the trained weights and this policy's settings to the folder `path` (policies/adapters.py
        Trainable.save_pretrained): LoRA as `pytorch_lora_weights.safetensors` in diffusers' format (a stock
        QwenImageEdit(Plus)Pipeline loads it with `load_lora_weights(path)`), a full fine-tune as `transformer/`;
        `policy.json` holds the settings, the trainable config and the version."""
        self.trainable.save_pretrained(path, QwenImageEditPipeline, self._settings(), self.version)

    def load_pretrained(self, path: str | Path) -> None:
        """Load what save_pretrained wrote onto this policy, built from the same base with the same settings:

        policy = QwenImageEditPolicy.from_pretrained(base, trainable=TrainableConfig(...), height=..., width=...)
        policy.load_pretrained(saved_dir)
        """
        self.version = self.trainable.load_pretrained(path, self._settings())

    def _settings(self) -> dict:
        return dict(plus=self.plus, height=self.height, width=self.width, condition_area=self.condition_area)

    # ---------------------------------------------------------------- training interface

    def to(self, device: torch.device | str) -> QwenImageEditPolicy:
        """Move every component, the reference copy of a full fine-tune included; returns the policy."""
        self.pipeline.to(device)
        self.trainable.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    def drop_encoders(self) -> None:
        """Free the text encoder (a 7B Qwen2.5-VL at real size) and the VAE: a learner recomputes stored rollouts,
        whose condition holds their outputs, and runs only the denoiser. sample() refuses afterwards."""
        self.pipeline.register_modules(vae=None, text_encoder=None)

    def reference(self) -> contextlib.AbstractContextManager:
        """Within the block, log_prob computes the reference policy (adapters disabled, or the frozen copy)."""
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
        return self.trainable.state()

    def load_trainable_state(self, state: dict[str, Tensor], version: int) -> None:
        self.trainable.load_state(state)
        self.version = version

    # ---------------------------------------------------------------- sampling

    def sample(
        self,
        source_images: list[Image.Image],
        instructions: list[str],
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        group_ids: Tensor | None = None,
    ) -> Rollout:
        """Edit a batch, recording the trajectory and per-step log-probs under the current weights.

        The generator draws, in order: the initial noise (as QwenImageEditPipeline.prepare_latents does),
        the SDE window, then each stochastic step's noise. It must live on the policy's device.

        Args:
            source_images: B PIL images of exactly height x width, any mode (converted to RGB explicitly).
            instructions: B non-empty edit instructions.
            sampler: steps, noise level, SDE window, true CFG (`guidance_scale`, `negative_prompt`).
            generator: the RNG of the whole sample.
            group_ids: (B,) int64; default arange(B).
        Returns:
            Rollout with latents (B, T + 1, N, 4 z) float32, log_probs (B, T), stochastic (B, T),
            edited_images (B, 3, H, W) uint8, sigmas (T + 1,), condition a QwenEditCondition.
        """
        if self.pipeline.vae is None:
            raise RuntimeError(
                "this policy's encoders were dropped (drop_encoders: a learner's copy); it cannot sample"
            )
        sampler = sampler or SamplerConfig()
        check_batch(source_images, instructions, self.height, self.width)
        refuse_categorical(sampler, "Qwen-Image-Edit")
        images = [to_rgb(image) for image in source_images]
        batch = len(images)
        group_ids = torch.arange(batch) if group_ids is None else torch.as_tensor(group_ids)
        if group_ids.shape != (batch,):
            raise ValueError(f"group_ids must have shape ({batch},), got {tuple(group_ids.shape)}")
        pipe, device = self.pipeline, self.device
        with torch.no_grad():
            condition = self._encode_condition(images, instructions, sampler)
            # the pipeline's generator order: noise is the first draw (VAE encoding takes the mode, no draw)
            noise = pipe.prepare_latents(
                None, batch, pipe.transformer.config.in_channels // 4, self.height, self.width,
                condition.prompt_embeds.dtype, device, generator,
            )[0]  # fmt: skip
            stochastic = stochastic_steps(sampler, generator).to(device)
            sigmas = self._sigmas(sampler.num_steps, noise.shape[1])
            latents = [noise.float()]
            log_probs = []
            for step in range(sampler.num_steps):
                velocity = self._velocity(latents[-1], sigmas[step], condition, sampler.guidance_scale)
                out = sde_step_with_logprob(
                    latents[-1], velocity, float(sigmas[step]), float(sigmas[step + 1]),
                    sampler.noise_level if stochastic[step] else 0.0, sampler.kind, generator=generator,
                )  # fmt: skip
                latents.append(out.prev_latents)
                log_probs.append(out.log_probs)
            edited = to_uint8(self._decode(latents[-1]))
        return Rollout(
            source_images=images_to_tensor(images).to(device),
            instructions=list(instructions),
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            stochastic=stochastic.expand(batch, -1).clone(),
            edited_images=edited,
            group_ids=group_ids.to(device=device, dtype=torch.long),
            policy_versions=torch.full((batch,), self.version, dtype=torch.long, device=device),
            condition=condition,
            sigmas=sigmas,
            sampler=sampler,
        )

    def log_prob(self, rollout: Rollout, step: int) -> StepOutput:
        """Recompute step `step` of a stored rollout with the current weights (with grad if enabled).

        Bit-exact with rollout.log_probs[:, step] for the weights and batch that sampled it: the same
        velocity code and the same float32 SDE step. Rows where the step was not stochastic (rollouts with
        different SDE windows, concatenated) get log-prob 0; the learner trains only rollout.stochastic steps.

        Args:
            rollout: a rollout this policy sampled (any select / cat of them).
            step: 0 <= step < T.
        Returns:
            StepOutput: prev_latents = latents[:, step + 1], log_probs (B,), mean (B, N, 4 z), std ().
        """
        if not 0 <= step < rollout.num_steps:
            raise ValueError(f"step must be in [0, {rollout.num_steps}), got {step}")
        sampler = rollout.sampler
        stochastic = rollout.stochastic[:, step]
        latents = rollout.latents[:, step]
        velocity = self._velocity(latents, rollout.sigmas[step], rollout.condition, sampler.guidance_scale)
        out = sde_step_with_logprob(
            latents, velocity, float(rollout.sigmas[step]), float(rollout.sigmas[step + 1]),
            sampler.noise_level if bool(stochastic.any()) else 0.0, sampler.kind,
            prev_latents=rollout.latents[:, step + 1],
        )  # fmt: skip
        out.log_probs = torch.where(stochastic, out.log_probs, torch.zeros_like(out.log_probs))
        return out

    # ---------------------------------------------------------------- internals

    def flow_velocity(self, rollout: Rollout, latents: Tensor, sigma: float) -> Tensor:
        """The sampler's velocity at (latents, sigma) with the rollout's condition (EditingPolicy.flow_velocity)."""
        if not isinstance(rollout.condition, QwenEditCondition):
            raise TypeError(
                f"rollout.condition is a {type(rollout.condition).__name__}: not sampled by a QwenImageEditPolicy"
            )
        return self._velocity(
            latents, rollout.sigmas.new_tensor(float(sigma)), rollout.condition, rollout.sampler.guidance_scale
        )

    def _velocity(self, latents: Tensor, sigma: Tensor, condition: QwenEditCondition, guidance_scale: float) -> Tensor:
        """The transformer's velocity at (latents, sigma), with true CFG when guidance_scale > 1.

        The one network call of sample and log_prob (their agreement to the bit rests on it).

        Args:
            latents: (B, N, 4 z) packed noisy latents, float32.
            sigma: () float32, a scheduler sigma.
        Returns:
            (B, N, 4 z) in the transformer's dtype.
        """
        net = self.trainable.net
        dtype = net.dtype
        batch, tokens, _ = latents.shape
        hidden_states = torch.cat([latents.to(dtype), condition.image_latents.to(dtype)], dim=1)
        # as the pipeline: the scheduler's timestep (sigma * 1000, float32) in the latents' dtype, / 1000
        timestep = (sigma * self.pipeline.scheduler.config.num_train_timesteps).expand(batch).to(dtype) / 1000
        scale = self.pipeline.vae_scale_factor * 2
        img_shapes = [[(1, self.height // scale, self.width // scale), (1, *condition.image_grid)]] * batch

        def forward(embeds: Tensor, mask: Tensor) -> Tensor:
            out = net(
                hidden_states=hidden_states,
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=embeds,
                # the pipeline passes no mask when no row is padded
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                img_shapes=img_shapes,
                attention_kwargs={},
                return_dict=False,
            )[0]
            return out[:, :tokens]

        velocity = forward(condition.prompt_embeds, condition.prompt_mask)
        if guidance_scale > 1:
            if condition.negative_embeds is None:
                raise ValueError("guidance_scale > 1 but the rollout's condition has no negative prompt embeddings")
            negative = forward(condition.negative_embeds, condition.negative_mask)
            combined = negative + guidance_scale * (velocity - negative)
            # Qwen-Image rescales the guided velocity to the conditional one's norm, token by token
            velocity = combined * (
                torch.norm(velocity, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
            )
        return velocity

    def _sigmas(self, num_steps: int, image_tokens: int) -> Tensor:
        """(T + 1,) float32: the scheduler's shifted sigmas for this image size, as the pipeline sets them, then 0."""
        config = self.pipeline.scheduler.config
        mu = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        with np.errstate(divide="ignore", invalid="ignore"):  # refused below with a clearer message
            retrieve_timesteps(self.pipeline.scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        sigmas = self.pipeline.scheduler.sigmas.to(device=self.device, dtype=torch.float32).clone()
        if not torch.isfinite(sigmas).all():  # shift_terminal's stretch divides by zero for a single step
            raise ValueError(
                f"the scheduler gives non-finite sigmas for num_steps={num_steps}: {sigmas.tolist()}; use more steps"
            )
        return sigmas

    def _condition_sizes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((w, h) for the text encoder's image, (w, h) for the VAE's), as the pipelines compute them."""
        ratio = self.width / self.height
        vae = calculate_dimensions(self.condition_area, ratio)[:2]
        text = calculate_dimensions(PLUS_TEXT_ENCODER_AREA, ratio)[:2] if self.plus else vae
        return text, vae

    def _encode_condition(
        self, images: list[Image.Image], instructions: list[str], sampler: SamplerConfig
    ) -> QwenEditCondition:
        """Text embeddings (and negative ones under CFG) and packed VAE latents of the source images."""
        pipe = self.pipeline
        (text_w, text_h), (vae_w, vae_h) = self._condition_sizes()
        processor = pipe.image_processor
        if self.plus:  # Plus resizes the original for each encoder
            text_images = [processor.resize(image, text_h, text_w) for image in images]
            vae_input = processor.preprocess(images, vae_h, vae_w)
        else:  # Edit resizes once and encodes the resized image twice
            text_images = [processor.resize(image, vae_h, vae_w) for image in images]
            vae_input = processor.preprocess(text_images, vae_h, vae_w)
        prompt_embeds, prompt_mask = self._encode_text(instructions, text_images)
        negative_embeds = negative_mask = None
        if sampler.guidance_scale > 1:
            negative_embeds, negative_mask = self._encode_text([sampler.negative_prompt] * len(images), text_images)
        image_latents = pipe._encode_vae_image(
            vae_input.unsqueeze(2).to(self.device, prompt_embeds.dtype), generator=None
        )
        channels = pipe.transformer.config.in_channels // 4
        image_latents = pipe._pack_latents(image_latents, len(images), channels, *image_latents.shape[3:])
        scale = pipe.vae_scale_factor * 2
        return QwenEditCondition(
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            image_latents=image_latents,
            negative_embeds=negative_embeds,
            negative_mask=negative_mask,
            image_grid=(vae_h // scale, vae_w // scale),
        )

    def _encode_text(self, texts: list[str], images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """(B, L, D) Qwen2.5-VL last hidden states of each templated prompt after the system prefix, zero-padded
        to the longest, and the (B, L) int64 mask. Rows are encoded one at a time (as the Plus pipeline must),
        so a row's embedding does not depend on the rest of the batch; repeated (text, image) pairs are
        encoded once (a GRPO group shares both)."""
        pipe = self.pipeline
        encoder = pipe.text_encoder
        rows: list[Tensor] = []
        cache: dict[tuple[str, bytes], Tensor] = {}
        for text, image in zip(texts, images):
            key = (text, image.tobytes())
            if key not in cache:
                prompt = pipe.prompt_template_encode.format(PLUS_IMAGE_PROMPT + text if self.plus else text)
                inputs = pipe.processor(text=[prompt], images=[image], return_tensors="pt").to(self.device)
                hidden = encoder(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=inputs["mm_token_type_ids"],
                    output_hidden_states=True,
                ).hidden_states[-1]
                cache[key] = hidden[0, pipe.prompt_template_encode_start_idx :]
            rows.append(cache[key])
        length = max(row.shape[0] for row in rows)
        embeds = torch.stack([torch.cat([row, row.new_zeros(length - row.shape[0], row.shape[1])]) for row in rows])
        mask = torch.stack([(torch.arange(length, device=self.device) < row.shape[0]).long() for row in rows])
        return embeds.to(encoder.dtype), mask

    def _decode(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) images in about [-1, 1] from (B, N, 4 z) packed latents, as the pipeline decodes."""
        pipe = self.pipeline
        vae = pipe.vae
        x = pipe._unpack_latents(latents, self.height, self.width, pipe.vae_scale_factor).to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(x.device, x.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(x.device, x.dtype)
        return vae.decode(x / inverse_std + mean, return_dict=False)[0][:, :, 0]

    def _check_prefix(self) -> None:
        """The pipelines drop a fixed number of leading prompt tokens (64): the system prefix must be exactly that."""
        template = self.pipeline.prompt_template_encode
        end = template.index("<|im_start|>user\n") + len("<|im_start|>user\n")
        count = len(self.pipeline.processor.tokenizer(template[:end])["input_ids"])
        drop = self.pipeline.prompt_template_encode_start_idx
        if count != drop:
            raise ValueError(
                f"the tokenizer splits the pipeline's system prefix into {count} tokens but the pipeline drops "
                f"{drop}: its prompt embeddings would keep part of the system prompt or lose the image"
            )


# ---------------------------------------------------------------- offline tiny components


# Copied from reward.backbone.ImageOnlyProcessor
class ImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL / 2.5-VL / 3-VL processor that needs only an image processor and a tokenizer.

    ProcessorMixin reads its parts from this signature, so leaving out `video_processor` drops the
    torchvision-backed video processor. Always returns `mm_token_type_ids`, which Qwen2.5-VL needs for
    correct positions (without it, it silently uses wrong ones).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


# Copied from reward.backbone._PRETOKENIZE
# Qwen2's pre-tokenisation, so the tiny tokenizer cuts words where the real one does.
_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Copied from reward.backbone._SPECIAL
_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_WORDS = (
    "make add remove replace turn change put the a an of in on with to into and sky cat dog car tree house hat "
    "red blue green yellow black white big small bright dark background color style photo painting sign text"
).split()


def tiny_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with Qwen's special tokens, trained here on the pipelines' prompt template.

    Every word of the system prompt becomes one token, as in Qwen's 151k vocabulary, so its prefix is the
    64 tokens the pipelines drop (checked by QwenImageEditPolicy).
    """
    system = (  # the pipelines' system prefix (set on instances, so written out here; the policy checks it)
        "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
        "background), then explain how the user's text instruction should alter or modify the image. Generate a "
        "new image that meets the user's requirements while maintaining consistency with the original input "
        "where appropriate.<|im_end|>\n<|im_start|>user\n"
    )
    rng = np.random.default_rng(0)
    corpus = [system] * 50 + [" ".join(rng.choice(_WORDS, size=8)) for _ in range(200)] + [PLUS_IMAGE_PROMPT] * 10
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(
        vocab=bpe.get_vocab(),
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=_SPECIAL[1:],
    )


def tiny_components(seed: int = 0) -> dict:
    """Random-weight QwenImageEdit(Plus)Pipeline components: a 2-block transformer, a 3-level VAE (8x
    downsampling like the real one), a 2-layer Qwen2.5-VL and its tokenizer/processor. Float32, CPU."""
    tokenizer = tiny_tokenizer()
    text_hidden, patch = 32, 8
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}  # fmt: skip
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    vision_config = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_hidden, patch_size=patch,
        spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=4 * patch,
    )  # fmt: skip
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **ids)
    ).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_hidden, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0],
    ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(  # the released Qwen-Image-Edit scheduler settings
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential",
    )  # fmt: skip
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=(2 * patch) ** 2, max_pixels=(8 * patch) ** 2
    )
    processor = ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
