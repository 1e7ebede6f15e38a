"""The Joint Reward Model (JRM, arXiv 2602.07533): a VLM backbone, a score token, and a reward head.

Sequence per candidate (Qwen chat format):
    user: [source image] [edited image] "Instruction: ... Judge ..."   assistant: <|score|> critique <|im_end|>
reward = head(final hidden state at <|score|>). Training appends the critique after the score token and
puts a next-token loss on it; causality means the score token never sees the critique, so the reward
read in training equals the reward of a prompt-only forward. Scoring is one prefill, no decoding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_model, save_file, save_model
from torch import nn
from torch.nn import functional as F
from transformers.initialization import no_init_weights

from reward.backbone import MODEL_CLASSES, SCORE_TOKEN, ImageOnlyProcessor, build_tiny, load_backbone
from reward.data import to_rgb
from reward.losses import critique_lm_loss, next_token_targets

JUDGE_PROMPT = "Judge how well the second image carries out the instruction on the first image."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class JRMArgs:
    backbone: str = "tiny"
    """"tiny" (random weights, built offline) or a local path / hub id of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model."""
    family: str = "qwen2_vl"
    """Backbone family of the tiny preset: qwen2_vl, qwen2_5_vl or qwen3_vl (real checkpoints say their own)."""
    tiny_hidden: int = 128
    """Tiny preset: language-model width."""
    tiny_layers: int = 4
    """Tiny preset: language-model layers."""
    dimension_heads: int = 0
    """Extra reward heads for per-dimension scores (EditReward-Data has 2: following, quality); 0 for none."""
    uncertainty: bool = False
    """The head also predicts a sigma for the reward and each dimension reward, for the uncertainty-aware
    ranking loss (loss.ranking=uncertainty); `score()` still returns the mean."""
    lora_rank: int = 0
    """Rank of the LoRA adapters trained on the language model; 0 trains every weight (as in rl/ and policies/)."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    """Regex of the modules that get adapters (the vision MLP shares names, hence the language_model prefix)."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    dtype: str = "float32"
    """Backbone weights: float32, bfloat16 or float16. The head and the losses are always float32."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager or flash_attention_2."""
    trust_remote_code: bool = False
    """Allow code shipped with a checkpoint to run (off unless you trust its source)."""
    max_critique_tokens: int = 384
    """Critiques longer than this many tokens are cut for the language-modelling loss."""
    max_instruction_tokens: int = 1024
    """An instruction longer than this many tokens is refused (it would be a data error, and costs memory)."""
    transition_frames: bool = True
    """Feed the edited image as a two-frame clip (source -> edit) through the vision tower's temporal patch
    embedding, so the first layer sees what changed where. Qwen-VL embeds every image as two frames
    (an image is a clip of two equal frames), so this costs nothing; the edit is resized to the source's
    size first. On ShapeEdit it is what lets a tiny random-init JRM learn comparisons in minutes."""

    def to_dict(self) -> dict:
        """Plain data (the Trainer's wandb integration logs the model config through this)."""
        return asdict(self)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.family not in MODEL_CLASSES:
            raise ValueError(f"family must be one of {sorted(MODEL_CLASSES)}, got {self.family!r}")
        if self.dimension_heads < 0:
            raise ValueError(f"dimension_heads must be >= 0, got {self.dimension_heads}")


@dataclass
class JRMOutput:
    rewards: torch.Tensor  # (N,) float32, one per sequence (the mean mu under config.uncertainty)
    dimension_rewards: torch.Tensor | None  # (N, D) float32 when dimension heads exist
    features: torch.Tensor  # (N, H) final hidden state at the score token
    lm_loss: torch.Tensor | None  # scalar, when labels were given
    reward_std: torch.Tensor | None  # (N,) float32 sigma > 0 of each reward, under config.uncertainty
    dimension_std: torch.Tensor | None  # (N, D) float32 sigma > 0, under config.uncertainty with dimension heads


@dataclass
class Critiques:
    texts: list[str]  # B decoded critiques, special tokens removed
    num_tokens: torch.Tensor  # (B,) tokens generated per candidate, up to and including its end token


class JRM(nn.Module):
    """Joint Reward Model. `score()` for users; `forward()` and `encode()` for training."""

    def __init__(self, config: JRMArgs, backbone: nn.Module, processor: ImageOnlyProcessor):
        super().__init__()
        config.validate()
        self.config = config
        self.processor = processor
        self.score_token_id = processor.tokenizer.convert_tokens_to_ids(SCORE_TOKEN)
        if config.freeze_vision:
            for p in _unwrap(backbone).model.visual.parameters():
                p.requires_grad_(False)
        if config.lora_rank > 0:
            lora = LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=config.lora_targets
            )
            backbone = get_peft_model(backbone, lora)
        if config.gradient_checkpointing:
            _unwrap(backbone).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            _unwrap(backbone).enable_input_require_grads()
        self.backbone = backbone
        hidden = _unwrap(backbone).config.get_text_config().hidden_size
        # Outputs: the reward and each dimension reward, then (under uncertainty) one raw sigma for each.
        self.head = nn.Linear(hidden, (1 + config.dimension_heads) * (2 if config.uncertainty else 1))
        nn.init.normal_(self.head.weight, std=1.0 / hidden**0.5)
        nn.init.zeros_(self.head.bias)

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def build(cls, config: JRMArgs, seed: int = 0) -> JRM:
        """A new JRM: the tiny preset (random weights) or a pretrained backbone with a fresh head."""
        config.validate()
        if config.backbone == "tiny":
            backbone, processor = build_tiny(config.family, seed=seed, hidden=config.tiny_hidden, layers=config.tiny_layers)
            backbone = backbone.to(DTYPES[config.dtype])
        else:
            backbone, processor = load_backbone(
                config.backbone, DTYPES[config.dtype], config.attn_implementation, config.trust_remote_code
            )
        torch.manual_seed(seed)
        return cls(config, backbone, processor)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write jrm_config.json, model.safetensors (backbone, adapters and head) and the processor files.

        `state_dict` is for weights gathered elsewhere (DeepSpeed ZeRO hands the Trainer a full one).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"jrm": asdict(self.config), "backbone_config": _unwrap(self.backbone).config.to_dict()}
        (path / "jrm_config.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if state_dict is None:
            save_model(self, str(path / "model.safetensors"))
        else:  # copies, so that tied weights are two tensors, which safetensors accepts
            save_file({k: v.detach().contiguous().clone().cpu() for k, v in state_dict.items()}, str(path / "model.safetensors"))
        self.processor.save_pretrained(str(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | None = None) -> JRM:
        """Load a JRM written by `save_pretrained`; scores round-trip exactly."""
        path = Path(path)
        config_file = path / "jrm_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a JRM checkpoint: {config_file} is missing")
        meta = json.loads(config_file.read_text())
        config = JRMArgs(**meta["jrm"])
        if dtype is not None:
            config.dtype = dtype
        backbone_config = dict(meta["backbone_config"])
        model_type = backbone_config["model_type"]
        config_class = MODEL_CLASSES[model_type].config_class
        with no_init_weights():  # every weight is overwritten from model.safetensors below: skip random init
            backbone = MODEL_CLASSES[model_type]._from_config(config_class.from_dict(backbone_config), dtype=DTYPES[config.dtype])
        processor = ImageOnlyProcessor.from_pretrained(str(path))
        model = cls(config, backbone, processor)
        load_model(model, str(path / "model.safetensors"), strict=True)
        return model

    # --- encoding ----------------------------------------------------------------------------------

    def prompt_text(self, instruction: str) -> str:
        """The chat text for one candidate, ending with the score token."""
        return self.chat_text(f"Instruction: {instruction}\n{JUDGE_PROMPT}")

    def chat_text(self, text: str) -> str:
        """The chat text for [source image][second image] `text`, ending with the score token."""
        messages = [
            {
                "role": "user",
                # Both images first, side by side: corresponding patches of the source and the edit then
                # sit at the same relative position whatever the instruction's length.
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}],
            }
        ]
        chat = self.processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chat + SCORE_TOKEN

    def _cut(self, critique: str) -> str:
        tokenizer = self.processor.tokenizer
        ids = tokenizer(critique, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.config.max_critique_tokens:
            return critique
        return tokenizer.decode(ids[: self.config.max_critique_tokens])

    def check_instruction(self, text: str, where: str) -> None:
        """Refuse an empty instruction or one over model.max_instruction_tokens, naming `where`."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where} is empty; every candidate needs an instruction")
        if len(text) > self.config.max_instruction_tokens:  # a token is at least one character: count only then
            tokens = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            if tokens > self.config.max_instruction_tokens:
                raise ValueError(f"{where} has {tokens} tokens, more than model.max_instruction_tokens ({self.config.max_instruction_tokens})")

    def encode(
        self,
        source_images: list[Image.Image],
        instructions: list[str],
        edited_images: list[Image.Image],
        critiques: list[str | None] | None = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Tokenize candidates; with critiques, `labels` holds the critique tokens (-100 elsewhere).

        Returns:
            input_ids, attention_mask, mm_token_type_ids: (N, L); pixel_values: (patches, C*P*P);
            image_grid_thw: (2N, 3); labels: (N, L) when critiques are given.
        """
        _check_batch(source_images, instructions, edited_images, critiques)
        for i, text in enumerate(instructions):
            self.check_instruction(text, f"instruction {i}")
        return self.encode_chats([self.prompt_text(t) for t in instructions], source_images, edited_images, critiques, padding_side)

    def encode_chats(
        self,
        chats: list[str],
        source_images: list[Image.Image],
        edited_images: list[Image.Image],
        targets: list[str | None] | None = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """`encode` for chat texts that end with the score token (`chat_text`), with optional target texts
        after it (the critiques; the backbone's pretraining answers). Same returns as `encode`."""
        _check_batch(source_images, chats, edited_images, targets)
        eos = self.processor.tokenizer.eos_token
        texts = list(chats)
        if targets is not None:
            texts = [t + self._cut(c) + eos if c else t for t, c in zip(texts, targets)]
        sources = [to_rgb(s) for s in source_images]
        edits = [to_rgb(e) for e in edited_images]
        if self.config.transition_frames:
            edits = [e if e.size == s.size else e.resize(s.size, Image.Resampling.BICUBIC) for s, e in zip(sources, edits)]
        batch = self.processor(text=texts, images=[[s, e] for s, e in zip(sources, edits)], padding=True, padding_side=padding_side, return_tensors="pt")
        batch = dict(batch)
        if self.config.transition_frames:
            batch["pixel_values"] = self._transition(batch["pixel_values"], batch["image_grid_thw"])
        if targets is not None:
            labels = batch["input_ids"].clone()
            score_pos = self._score_positions(batch["input_ids"])
            after = torch.arange(labels.shape[1])[None, :] > score_pos[:, None]
            labels[~after | (batch["attention_mask"] == 0)] = -100
            batch["labels"] = labels
        return batch

    def _transition(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Replace the first temporal frame of every edited image's patches with the source's.

        pixel_values rows are patches, each flattened as (channel, temporal frame, pixels); images come
        in (source, edit) order per candidate, each with grid_thw[i].prod() patches.
        """
        frames = self.processor.image_processor.temporal_patch_size
        counts = grid_thw.prod(-1).tolist()
        out = pixel_values.clone()
        start = 0
        for i in range(0, len(counts), 2):
            n = counts[i]
            source = out[start : start + n].view(n, 3, frames, -1)
            edit = out[start + n : start + 2 * n].view(n, 3, frames, -1)
            edit[:, :, 0] = source[:, :, 0]
            start += 2 * n
        return out

    def _score_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_score = input_ids == self.score_token_id
        counts = is_score.sum(1)
        if not torch.all(counts == 1):
            raise ValueError(f"every sequence needs exactly one {SCORE_TOKEN} token; counts per row: {counts.tolist()}")
        return is_score.int().argmax(1)

    # --- forward and scoring -----------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> JRMOutput:
        """One pass: rewards (and under config.uncertainty their sigmas) at the score token and, with labels,
        the critique LM loss.

        sigma = softplus(raw head output): it grows linearly, not exponentially as exp(log sigma) would, so a
        few pairs the head cannot rank do not blow it up, and it is smooth and positive without a clamp. No
        floor is needed: the ranking loss only adds sigma^2 under a square root (1 + pi sigma^2 / 8) and
        never divides by it, and at sigma -> 0 it is Bradley-Terry.
        """
        base = _unwrap(self.backbone)
        hidden = base.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
        ).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        features = hidden[rows, self._score_positions(input_ids)].float()
        # The head stays float32 even when DeepSpeed casts every parameter to bf16.
        out = F.linear(features, self.head.weight.float(), self.head.bias.float())
        lm_loss = None
        if labels is not None:
            positions, targets = next_token_targets(labels)
            lm_loss = critique_lm_loss(base.lm_head(hidden[positions]), targets)
        width = 1 + self.config.dimension_heads
        std = F.softplus(out[:, width:]) if self.config.uncertainty else None
        return JRMOutput(
            rewards=out[:, 0],
            dimension_rewards=out[:, 1:width] if self.config.dimension_heads else None,
            features=features,
            lm_loss=lm_loss,
            reward_std=None if std is None else std[:, 0],
            dimension_std=std[:, 1:] if std is not None and self.config.dimension_heads else None,
        )

    @torch.inference_mode()
    def score(
        self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image], batch_size: int = 16
    ) -> torch.Tensor:
        """Rewards of edited images, one prefill each, no decoding.

        Args:
            source_images: B PIL images of any mode (converted to RGB).
            instructions: B non-empty strings.
            edited_images: B PIL images.
            batch_size: sequences per forward pass; results do not depend on it.

        Returns:
            (B,) float32 rewards on CPU.
        """
        return self.score_with_features(source_images, instructions, edited_images, batch_size)[0]

    @torch.inference_mode()
    def score_with_features(
        self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image], batch_size: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`score()` plus the (B, H) score-token features of the same pass (for the effective rank)."""
        outputs = list(self._outputs(source_images, instructions, edited_images, batch_size))
        if not outputs:
            return torch.empty(0), torch.empty(0, self.head.in_features)
        return torch.cat([o.rewards for o in outputs]).cpu(), torch.cat([o.features for o in outputs]).cpu()

    @torch.inference_mode()
    def critique(
        self,
        source_images: list[Image.Image],
        instructions: list[str],
        edited_images: list[Image.Image],
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
    ) -> Critiques:
        """The JRM's optional text output: greedy critiques decoded after the score token, in one generate() call.

        Left padding, so that every row continues from its own score token. `min_new_tokens` holds back the
        end token until that many are decoded (benchmarks use it for critiques of a known length).

        Returns:
            Critiques: B texts and (B,) generated token counts.
        """
        was_training = self.training
        self.eval()
        batch = self.encode(source_images, instructions, edited_images, padding_side="left")
        device = self.head.weight.device
        tokenizer = self.processor.tokenizer
        try:
            generated = _unwrap(self.backbone).generate(
                **{k: v.to(device) for k, v in batch.items()},
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        finally:
            self.train(was_training)
        new = generated[:, batch["input_ids"].shape[1] :]
        ends = (new == tokenizer.eos_token_id).int()
        num_tokens = (ends.cumsum(1) - ends == 0).sum(1).cpu()  # up to each row's end token: the rest is padding
        return Critiques(tokenizer.batch_decode(new, skip_special_tokens=True), num_tokens)

    def _outputs(self, sources, instructions, edited, batch_size):
        _check_batch(sources, instructions, edited)  # before slicing, which would hide a mismatch
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        try:
            for i in range(0, len(sources), batch_size):
                batch = self.encode(sources[i : i + batch_size], instructions[i : i + batch_size], edited[i : i + batch_size])
                yield self(**{k: v.to(device) for k, v in batch.items()})
        finally:
            self.train(was_training)


def _check_batch(sources: list, instructions: list, edited: list, critiques: list | None = None) -> None:
    lengths = [len(sources), len(instructions), len(edited)] + ([] if critiques is None else [len(critiques)])
    if len(set(lengths)) > 1:
        raise ValueError(
            f"batch mismatch: {len(sources)} source images, {len(instructions)} instructions, {len(edited)} edited images"
            + (f", {len(critiques)} critiques" if critiques is not None else "")
            + "; give one of each per candidate"
        )


def _unwrap(backbone: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
