"""The ShapeEdit policy: a small pixel-space flow-matching editor that trains on a CPU.

An SD3-style MMDiT (diffusers' SD3Transformer2DModel, joint text-image attention) over 8x8-pixel patches
of the 64x64 image, with the source image concatenated on the channel axis and a small CLIP text encoder
(transformers' CLIPTextModel) over a word-level tokenizer; it predicts the clean edit as a change of the
source, from which the velocity follows. Pixel space, not a VAE latent space: ShapeEdit
images are flat colours with hard edges, 8x8 patches already give only 64 tokens, and the oracle judges
exactly the pixels the policy writes. Pretrain it with `python launch/pretrain_policy.py`; RL adapts it
with LoRA on the transformer (the text encoder stays frozen, so rollouts store its outputs).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from policies.adapters import Trainable, TrainableConfig
from policies.images import check_batch, images_to_tensor, to_uint8
from policies.rollout import Rollout
from policies.sampling import SamplerConfig, stochastic_steps
from policies.sde import StepOutput, sde_step_with_logprob

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # [EOS] is not id 2: CLIP treats eos id 2 as legacy
# Regex (peft's target_modules, matched against whole module names): attention and the image stream's feed-forward.
PARAMETERISATIONS = ("gated", "change")
LORA_TARGETS = r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|ff\.net\.0\.proj|ff\.net\.2)"


@dataclass
class ShapeEditPolicyConfig:
    image_size: int = 64
    """Side of the square images the policy edits, in pixels (ShapeEdit's default render size)."""
    patch_size: int = 8
    """Pixels per side of one transformer token."""
    hidden_size: int = 128
    """Transformer width (num_heads x 32)."""
    num_layers: int = 4
    """Joint-attention transformer blocks."""
    text_hidden_size: int = 64
    """Width of the CLIP text encoder."""
    text_layers: int = 2
    """Layers of the CLIP text encoder."""
    max_instruction_tokens: int = 32
    """Instructions are padded or cut to this many tokens (fixed, so the output never depends on the batch)."""
    vocab_size: int = 512
    """Upper bound on the word-level vocabulary learnt from the training instructions."""
    parameterisation: str = "gated"
    """How the network's output becomes the clean-image estimate x0_hat: 'gated' = m * c + (1 - m) * source with a
    per-pixel gate m and content c from a per-pixel head that also sees the source and noisy pixels; 'change' =
    source + a change read from the patch tokens alone (policies saved before this option existed)."""
    head_features: int = 8
    """'gated' only: features per pixel that the transformer hands to the per-pixel head."""
    head_hidden: int = 32
    """'gated' only: width of the per-pixel head's two hidden layers."""
    head_text_features: int = 16
    """'gated' only: features of the pooled instruction that the head reads at every pixel (0 = none)."""

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % 32:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of the head size 32")
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {self.parameterisation!r}")


@dataclass
class ShapeEditCondition:
    """What the velocity needs besides x and sigma; computed once per rollout by the frozen text encoder."""

    source: Tensor  # (B, 3, H, W) float32 in [-1, 1]
    text_embeds: Tensor  # (B, L, D_text) CLIP last hidden state of the instruction
    pooled_embeds: Tensor  # (B, D_text) CLIP pooled output of the instruction
    negative_text_embeds: Tensor  # (B, L, D_text) of the negative prompt (used when guidance_scale > 1)
    negative_pooled_embeds: Tensor  # (B, D_text)


class GatedSD3Transformer(SD3Transformer2DModel):
    """The MMDiT of the 'gated' parameterisation: its patch tokens hand `out_channels` features to every pixel
    (the usual linear unpatchify), and a per-pixel head (an MLP over each pixel) reads them beside that pixel's
    source and noisy values and returns a gate logit and a content colour, (B, 4, H, W).

    Why per pixel: the patch embedding squeezes 6 x 8 x 8 values into one token, so the token cannot say where
    a shape's edge runs inside its patch; the head sees the source pixel itself, so a rule the token states
    ("pixels of this colour become blue") lands on exact pixels. The input is (noisy image, source), 6 channels.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 8,
        in_channels: int = 6,
        num_layers: int = 4,
        attention_head_dim: int = 32,
        num_attention_heads: int = 4,
        joint_attention_dim: int = 64,
        caption_projection_dim: int = 128,
        pooled_projection_dim: int = 64,
        out_channels: int = 8,
        pos_embed_max_size: int = 8,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        head_hidden: int = 16,
        head_text_features: int = 0,
    ):
        """SD3Transformer2DModel's arguments (out_channels = the features per pixel handed to the head), the
        head's width and the features of the pooled instruction it reads at every pixel (0 = none)."""
        if in_channels != 6:
            raise ValueError(f"the gated transformer reads (noisy image, source): in_channels must be 6, got {in_channels}")
        super().__init__(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size,
            dual_attention_layers=dual_attention_layers,
            qk_norm=qk_norm,
        )
        # Linear layers over channels-last pixels: 2x faster than 1x1 convolutions on a CPU.
        self.text_to_head = nn.Linear(pooled_projection_dim, head_text_features) if head_text_features else None
        self.pixel_head = nn.Sequential(
            nn.Linear(out_channels + 6 + head_text_features, head_hidden),
            nn.SiLU(),
            nn.Linear(head_hidden, head_hidden),
            nn.SiLU(),
            nn.Linear(head_hidden, 4),
        )

    def forward(self, hidden_states: Tensor, pooled_projections: Tensor, **kwargs) -> Transformer2DModelOutput:
        """hidden_states (B, 6, H, W) = (noisy image, source); returns sample (B, 4, H, W) = (gate logit, content)."""
        features = super().forward(hidden_states=hidden_states, pooled_projections=pooled_projections, **kwargs).sample
        pixels = torch.cat([features, hidden_states], dim=1).permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.text_to_head is not None:
            # The instruction straight to every pixel: "pixels of the named colour" needs no attention to find.
            text = self.text_to_head(pooled_projections)[:, None, None, :].expand(*pixels.shape[:3], -1)
            pixels = torch.cat([pixels, text], dim=-1)
        return Transformer2DModelOutput(sample=self.pixel_head(pixels).permute(0, 3, 1, 2))


def build_tokenizer(instructions: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer learnt from instructions; unknown words map to [UNK]."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(instructions, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    eos = tok.token_to_id("[EOS]")
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]", model_max_length=max_length
    )


class ShapeEditPolicy:
    """The embedded default editing policy (see module docstring). Keeps the EditingPolicy protocol."""

    def __init__(
        self,
        cfg: ShapeEditPolicyConfig,
        transformer: SD3Transformer2DModel,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerFast,
        trainable: TrainableConfig | None = None,
    ):
        self.cfg = cfg
        self.transformer = transformer
        self.text_encoder = text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        self.height = self.width = cfg.image_size
        self.version = 0
        self.trainable_cfg = trainable
        self.trainable = Trainable(transformer, trainable, LORA_TARGETS) if trainable is not None else None

    # ---- construction and persistence ----------------------------------------------------------------

    @classmethod
    def build(cls, cfg: ShapeEditPolicyConfig, instructions: list[str], seed: int = 0, trainable: TrainableConfig | None = None) -> ShapeEditPolicy:
        """A freshly initialised policy whose vocabulary is learnt from `instructions`."""
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(instructions, cfg.vocab_size, cfg.max_instruction_tokens)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.text_hidden_size,
                intermediate_size=4 * cfg.text_hidden_size,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=max(1, cfg.text_hidden_size // 32),
                max_position_embeddings=cfg.max_instruction_tokens,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        shared = dict(
            sample_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_layers=cfg.num_layers,
            attention_head_dim=32,
            num_attention_heads=cfg.hidden_size // 32,
            joint_attention_dim=cfg.text_hidden_size,
            caption_projection_dim=cfg.hidden_size,
            pooled_projection_dim=cfg.text_hidden_size,
            pos_embed_max_size=cfg.image_size // cfg.patch_size,
        )
        if cfg.parameterisation == "gated":
            transformer = GatedSD3Transformer(
                **shared, in_channels=6, out_channels=cfg.head_features, head_hidden=cfg.head_hidden, head_text_features=cfg.head_text_features
            )
        else:  # in: noisy image + source image; out: the change from the source
            transformer = SD3Transformer2DModel(**shared, in_channels=6, out_channels=3)
        return cls(cfg, transformer, text_encoder, tokenizer, trainable)

    def save_pretrained(self, path: str | Path) -> None:
        """transformer/, text_encoder/, tokenizer/ (their own save_pretrained), policy.json, and, when LoRA
        adapters are on, their weights in adapter.safetensors (the base weights stay the pretrained ones)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.trainable is not None and self.trainable_cfg.lora_rank > 0:
            base = {k.replace(".base_layer.", "."): v for k, v in self.transformer.state_dict().items() if "lora_" not in k}
            fresh = type(self.transformer).from_config(self.transformer.config)
            fresh.load_state_dict(base)
            fresh.save_pretrained(path / "transformer")
            save_file({k: v.contiguous() for k, v in self.trainable_state().items()}, str(path / "adapter.safetensors"))
        else:
            self.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        meta = {"config": asdict(self.cfg), "trainable": asdict(self.trainable_cfg) if self.trainable_cfg else None, "version": self.version}
        (path / "policy.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, trainable: TrainableConfig | None = None) -> ShapeEditPolicy:
        """Load a saved policy. `trainable` adds fresh LoRA adapters for RL; a saved adapter is loaded back
        when `trainable` is None (then its saved settings apply) or has the same shape."""
        path = Path(path)
        if not (path / "policy.json").is_file():
            raise FileNotFoundError(f"{path} is not a saved ShapeEdit policy (no policy.json); train one with launch/pretrain_policy.py")
        meta = json.loads((path / "policy.json").read_text())
        known = {f.name for f in fields(ShapeEditPolicyConfig)}
        saved = {"parameterisation": "change", **meta["config"]}  # policies saved before the option were 'change'
        cfg = ShapeEditPolicyConfig(**{k: v for k, v in saved.items() if k in known})
        adapter = path / "adapter.safetensors"
        if trainable is None and meta["trainable"] is not None:
            trainable = TrainableConfig(**meta["trainable"])
        policy = cls(
            cfg,
            (GatedSD3Transformer if cfg.parameterisation == "gated" else SD3Transformer2DModel).from_pretrained(path / "transformer"),
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
            trainable,
        )
        if trainable is not None and meta["trainable"] == asdict(trainable):
            if adapter.is_file():
                policy.load_trainable_state(load_file(str(adapter)), meta["version"])
            else:  # a full fine-tune: its trained weights are the saved transformer
                policy.version = meta["version"]
        return policy

    # ---- the EditingPolicy protocol -----------------------------------------------------------------------

    def to(self, device: torch.device | str) -> ShapeEditPolicy:
        """Move both networks, the reference copy of a full fine-tune included; returns the policy."""
        self.text_encoder.to(device)
        self.transformer.to(device)
        if self.trainable is not None:
            self.trainable.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def drop_encoders(self) -> None:
        """Nothing to free: the text encoder is a few MB and pixels need no VAE (a learner keeps it all)."""

    def trained_module(self) -> nn.Module:
        """The network that holds the trainable weights (ZeRO-3 partitions its parameters in the learner)."""
        return self._trainable().net

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._trainable().parameters()

    def trainable_state(self) -> dict[str, Tensor]:
        return self._trainable().state()

    def load_trainable_state(self, state: dict[str, Tensor], version: int) -> None:
        self._trainable().load_state(state)
        self.version = version

    def reference(self) -> contextlib.AbstractContextManager:
        return self._trainable().reference()

    def encode_instructions(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """(B, L, D) hidden states and (B, D) pooled output of the text encoder, padded to a fixed length."""
        batch = self.tokenizer(
            instructions, padding="max_length", truncation=True, max_length=self.cfg.max_instruction_tokens, return_tensors="pt"
        ).to(self.device)
        out = self.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.last_hidden_state, out.pooler_output

    def predict_clean(self, latents: Tensor, sigma: float | Tensor, source: Tensor, text_embeds: Tensor, pooled_embeds: Tensor) -> Tensor:
        """The network's estimate of the clean edit x0, (B, 3, H, W)."""
        return self.predict(latents, sigma, source, text_embeds, pooled_embeds)[0]

    def predict(
        self, latents: Tensor, sigma: float | Tensor, source: Tensor, text_embeds: Tensor, pooled_embeds: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """The clean-edit estimate x0_hat (B, 3, H, W) and, for 'gated', the gate logits (B, 1, H, W) (else None).

        'gated': x0_hat = m * c + (1 - m) * source, m = sigmoid(gate logit): where the gate is shut the source
        comes through unchanged, so what should stay stays without the network drawing it. 'change':
        x0_hat = source + change. Either predicts x0, not v: in pixel space a token of 8x8x3 = 192 values
        cannot carry the noise through a 128-wide transformer, but a flat-coloured change it can.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0])
        net = self.trainable.net if self.trainable is not None else self.transformer
        out = net(
            hidden_states=torch.cat([latents, source], dim=1),
            encoder_hidden_states=text_embeds,
            pooled_projections=pooled_embeds,
            timestep=sigma * 1000.0,
        ).sample.float()
        if self.cfg.parameterisation == "change":
            return source + out, None
        gate_logits, content = out[:, :1], out[:, 1:]
        gate = torch.sigmoid(gate_logits)
        return gate * content + (1 - gate) * source, gate_logits

    def velocity(self, latents: Tensor, sigma: float | Tensor, source: Tensor, text_embeds: Tensor, pooled_embeds: Tensor) -> Tensor:
        """The velocity (B, 3, H, W) at x = latents for one sigma (a float) or one per row (B,):
        v = (x - x0_hat) / sigma on the path x = (1 - sigma) x0 + sigma eps."""
        x0 = self.predict_clean(latents, sigma, source, text_embeds, pooled_embeds)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0]).clamp_min(1e-3)
        return (latents.float() - x0) / sigma.view(-1, 1, 1, 1)

    @torch.no_grad()
    def sample(
        self,
        source_images: list[Image.Image],
        instructions: list[str],
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        group_ids: Tensor | None = None,
    ) -> Rollout:
        """Edit a batch (images exactly image_size square, any PIL mode), recording the whole trajectory.

        Returns a Rollout with latents (B, T + 1, 3, H, W) in [-1, 1] pixel units and log_probs (B, T).
        Noise is drawn on the policy's device, so on a GPU the generator must live there too.
        """
        sampler = sampler or SamplerConfig()
        check_batch(source_images, instructions, self.height, self.width)
        b, device = len(instructions), self.device
        sources = images_to_tensor(source_images).to(device)
        text, pooled = self.encode_instructions(list(instructions))
        neg_text, neg_pooled = self.encode_instructions([sampler.negative_prompt] * b)
        condition = ShapeEditCondition(sources.float() / 127.5 - 1.0, text, pooled, neg_text, neg_pooled)
        sigmas = self._sigmas(sampler.num_steps)
        stochastic = stochastic_steps(sampler, generator).to(device)
        x = torch.randn((b, 3, self.height, self.width), generator=generator, dtype=torch.float32, device=device)
        latents, log_probs = [x], []
        for t in range(sampler.num_steps):
            v = self._guided_velocity(x, float(sigmas[t]), condition, sampler.guidance_scale)
            noise = sampler.noise_level if stochastic[t] else 0.0
            step = sde_step_with_logprob(x, v, float(sigmas[t]), float(sigmas[t + 1]), noise, sampler.kind, generator=generator)
            x = step.prev_latents
            latents.append(x)
            log_probs.append(step.log_probs)
        return Rollout(
            source_images=sources,
            instructions=list(instructions),
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            stochastic=stochastic.expand(b, -1).clone(),
            edited_images=to_uint8(x),
            group_ids=(torch.arange(b) if group_ids is None else group_ids).to(device=device, dtype=torch.long),
            policy_versions=torch.full((b,), self.version, dtype=torch.long, device=device),
            condition=condition,
            sigmas=sigmas,
            sampler=sampler,
        )

    def log_prob(self, rollout: Rollout, step: int) -> StepOutput:
        """Step `step` of a stored rollout under the current weights (differentiable when grad is on); rows
        for which it was an ODE step get log-prob 0, as stored (EditingPolicy.log_prob)."""
        if not 0 <= step < rollout.num_steps:
            raise ValueError(f"step must be in [0, {rollout.num_steps}), got {step}")
        sampler = rollout.sampler
        stochastic = rollout.stochastic[:, step]
        s, s_next = float(rollout.sigmas[step]), float(rollout.sigmas[step + 1])
        v = self._guided_velocity(rollout.latents[:, step], s, rollout.condition, sampler.guidance_scale)
        out = sde_step_with_logprob(
            rollout.latents[:, step], v, s, s_next, sampler.noise_level if bool(stochastic.any()) else 0.0, sampler.kind,
            prev_latents=rollout.latents[:, step + 1],
        )
        out.log_probs = torch.where(stochastic, out.log_probs, torch.zeros_like(out.log_probs))
        return out

    def flow_velocity(self, rollout: Rollout, latents: Tensor, sigma: float) -> Tensor:
        """The sampler's velocity at (latents, sigma) with the rollout's condition (EditingPolicy.flow_velocity)."""
        return self._guided_velocity(latents, float(sigma), rollout.condition, rollout.sampler.guidance_scale)

    # ---- internals --------------------------------------------------------------------------------------------

    def _trainable(self) -> Trainable:
        if self.trainable is None:
            raise RuntimeError("this policy was loaded without a TrainableConfig; pass trainable=TrainableConfig(...) to train it")
        return self.trainable

    def _sigmas(self, num_steps: int) -> Tensor:
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.sigmas.float().clone()  # (T + 1,), the last one 0

    def _guided_velocity(self, x: Tensor, sigma: float, c: ShapeEditCondition, guidance_scale: float) -> Tensor:
        """One batched forward; with true CFG the unconditional half rides in the same batch."""
        if guidance_scale == 1.0:
            return self.velocity(x, sigma, c.source, c.text_embeds, c.pooled_embeds)
        both = self.velocity(
            torch.cat([x, x]),
            sigma,
            torch.cat([c.source, c.source]),
            torch.cat([c.negative_text_embeds, c.text_embeds]),
            torch.cat([c.negative_pooled_embeds, c.pooled_embeds]),
        )
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)


def flow_matching_loss(
    policy: ShapeEditPolicy,
    source: Tensor,
    target: Tensor,
    instructions: list[str],
    generator: torch.Generator | None = None,
    gate_weight: float = 0.0,
    edit_weight: float = 0.0,
    sigma_location: float = 0.0,
) -> Tensor:
    """Supervised (rectified) flow matching on x_s = (1 - s) x0 + s eps, in the x0 parametrisation.

    Args:
        source, target: (B, 3, H, W) float32 in [-1, 1]; instructions: B strings ("" for the
            unconditional branch of CFG). The text encoder is trained along (call requires_grad_ on it).
        gate_weight: for the 'gated' parameterisation, the weight of a binary cross-entropy that teaches the
            gate the pixels the edit changes (target != source); 0 = the image loss alone.
        edit_weight: the weight of a second squared error averaged over the changed pixels alone: an edit
            touches a few percent of the image, so in the plain mean its pixels hardly count.
        sigma_location: mean of the normal whose sigmoid is sigma; above 0 more of the training is at high noise,
            where the edit must be read from the source and the instruction, not from the noisy image.
    Returns: the scalar mean squared error of the predicted clean image (plus the two terms); sigmas are
        logit-normal (SD3).
    """
    b = target.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=generator) + sigma_location)
    noise = torch.randn(target.shape, generator=generator)
    s = sigma.view(b, 1, 1, 1)
    x = (1 - s) * target + s * noise
    text, pooled = policy.encode_instructions(instructions)
    x0, gate_logits = policy.predict(x, sigma, source, text, pooled)
    loss = torch.nn.functional.mse_loss(x0, target)
    changed = (target != source).any(dim=1, keepdim=True).float()  # (B, 1, H, W)
    if edit_weight:
        loss = loss + edit_weight * ((x0 - target) ** 2 * changed).sum() / (3 * changed.sum()).clamp_min(1.0)
    if gate_weight and gate_logits is not None:
        loss = loss + gate_weight * torch.nn.functional.binary_cross_entropy_with_logits(gate_logits, changed)
    return loss
