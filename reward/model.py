"""The Joint Reward Model (JRM, arXiv 2602.07533): a VLM backbone, a score token, and a reward head.

Sequence per candidate (Qwen chat format):
    user: [source image] [edited image] "Instruction: ... Judge ..."   assistant: <|score|> critique <|im_end|>
reward = head(final hidden state at <|score|>). Training appends the critique after the score token and
puts a next-token loss on it; causality means the score token never sees the critique, so the reward
read in training equals the reward of a prompt-only forward. Scoring is one prefill, no decoding.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from reward.backbone import MODEL_CLASSES, SCORE_TOKEN, ImageOnlyProcessor, build_tiny, load_backbone
from reward.data import check_geometry, to_rgb
from reward.losses import critique_lm_loss, next_token_targets

JUDGE_PROMPT = "Judge how well the second image carries out the instruction on the first image."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_FILE = "adapter_model.safetensors"  # peft's names: PeftModel.from_pretrained(backbone, DIR) reads them
HEAD_FILE = "head.safetensors"


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
    tiny_patch: int = 8
    """Tiny preset: the vision tower's patch side in pixels. Two-by-two patches merge into one visual token, so a
    64x64 image is 16 tokens at 8 and 64 tokens at 4: finer patches let the model see where things are."""
    tiny_vision_depth: int = 2
    """Tiny preset: vision tower blocks."""
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

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.family not in MODEL_CLASSES:
            raise ValueError(f"family must be one of {sorted(MODEL_CLASSES)}, got {self.family!r}")
        if self.dimension_heads < 0:
            raise ValueError(f"dimension_heads must be >= 0, got {self.dimension_heads}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 trains every weight), got {self.lora_rank}")
        if self.tiny_patch < 1 or self.tiny_vision_depth < 1:
            raise ValueError(
                f"tiny_patch and tiny_vision_depth must be >= 1, got {self.tiny_patch} and {self.tiny_vision_depth}"
            )


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


@strict
class JRMConfig(PreTrainedConfig):
    """The transformers config of a JRM checkpoint (`config.json`, model_type "jrm").

    `AutoConfig` / `AutoModel` know it once `reward` is imported (no trust_remote_code). It holds the
    backbone's own config and what scoring needs; how a model was trained (learning rate, frozen tower,
    ...) stays in the run's config.yaml.
    """

    model_type = "jrm"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_vl")}

    backbone_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str = "tiny"
    """The backbone the JRM was built on: "tiny" (rebuilt from `tiny`), a hub id or a local folder. A LoRA
    checkpoint stores only its adapters and head, and loads them onto this backbone."""
    tiny: dict | None = None
    """{family, hidden, layers, seed} of the tiny preset, which is rebuilt bit for bit from them."""
    score_token_id: int = 0
    dimension_heads: int = 0
    uncertainty: bool = False
    transition_frames: bool = True
    max_critique_tokens: int = 384
    max_instruction_tokens: int = 1024
    lora: dict | None = None
    """peft LoraConfig arguments when the backbone carries LoRA adapters (then saved alone), else None."""
    tie_word_embeddings: bool = False


class JRM(PreTrainedModel):
    """Joint Reward Model. `score()` for users; `forward()` and `encode()` for training.

    A transformers model: `save_pretrained` writes config.json and sharded safetensors (or, with LoRA, the
    peft adapter and the head only), `from_pretrained` takes a folder or a hub id, `push_to_hub` uploads.
    Build a new one with `JRM.build(JRMArgs(...))`.
    """

    config_class = JRMConfig
    base_model_prefix = "jrm"
    main_input_name = "input_ids"
    _keep_in_fp32_modules = ["head"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(
        self, config: JRMConfig, backbone: PreTrainedModel | None = None, processor: ImageOnlyProcessor | None = None
    ):
        """`backbone` and `processor` as built by `JRM.build`; without them (from_pretrained) an empty backbone
        is made from `config.backbone_config` for the checkpoint's weights to fill."""
        super().__init__(config)
        if backbone is None:
            backbone = MODEL_CLASSES[config.backbone_config.model_type]._from_config(config.backbone_config)
        else:  # its weights are set: keep post_init from drawing them again
            for module in backbone.modules():
                module._is_hf_initialized = True
        if config.lora is not None:
            backbone = get_peft_model(backbone, LoraConfig(**config.lora))
        self.backbone = backbone
        self.processor = processor
        self.score_token_id = config.score_token_id
        hidden = config.backbone_config.get_text_config().hidden_size
        # Outputs: the reward and each dimension reward, then (under uncertainty) one raw sigma for each.
        self.head = nn.Linear(hidden, (1 + config.dimension_heads) * (2 if config.uncertainty else 1))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.head:
            nn.init.normal_(module.weight, std=1.0 / module.in_features**0.5)
            nn.init.zeros_(module.bias)

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def build(cls, args: JRMArgs, seed: int = 0) -> JRM:
        """A new JRM: the tiny preset (random weights) or a pretrained backbone with a fresh head."""
        if args.backbone == "tiny":
            backbone, processor = build_tiny(
                args.family,
                seed=seed,
                hidden=args.tiny_hidden,
                layers=args.tiny_layers,
                patch=args.tiny_patch,
                vision_depth=args.tiny_vision_depth,
            )
            backbone = backbone.to(DTYPES[args.dtype])
        else:
            backbone, processor = load_backbone(
                args.backbone, DTYPES[args.dtype], args.attn_implementation, args.trust_remote_code
            )
        torch.manual_seed(seed)
        return cls.from_backbone(args, backbone, processor, seed)

    @classmethod
    def from_backbone(
        cls, args: JRMArgs, backbone: PreTrainedModel, processor: ImageOnlyProcessor, seed: int = 0
    ) -> JRM:
        """A JRM with a fresh head on a backbone built elsewhere (its tokenizer must hold the score token)."""
        base = args.backbone
        if base != "tiny" and Path(base).is_dir():
            base = str(Path(base).resolve())  # a LoRA checkpoint finds its backbone from any working directory
        lora = None
        if args.lora_rank > 0:
            lora = {
                "r": args.lora_rank,
                "lora_alpha": args.lora_alpha,
                "lora_dropout": args.lora_dropout,
                "target_modules": args.lora_targets,
            }
        config = JRMConfig(
            backbone_config=backbone.config,
            attn_implementation=backbone.config._attn_implementation,  # else the composite config resets the backbone's
            base_model_name_or_path=base,
            tiny={
                "family": args.family,
                "hidden": args.tiny_hidden,
                "layers": args.tiny_layers,
                "patch": args.tiny_patch,
                "vision_depth": args.tiny_vision_depth,
                "seed": seed,
            }
            if base == "tiny"
            else None,
            score_token_id=processor.tokenizer.convert_tokens_to_ids(SCORE_TOKEN),
            dimension_heads=args.dimension_heads,
            uncertainty=args.uncertainty,
            transition_frames=args.transition_frames,
            max_critique_tokens=args.max_critique_tokens,
            max_instruction_tokens=args.max_instruction_tokens,
            lora=lora,
        )
        if args.freeze_vision:
            for p in backbone.model.visual.parameters():
                p.requires_grad_(False)
        model = cls(config, backbone, processor)
        if args.gradient_checkpointing:
            _unwrap(model.backbone).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            _unwrap(model.backbone).enable_input_require_grads()
        return model

    def save_pretrained(
        self,
        save_directory: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        **kwargs,
    ) -> None:
        """Write config.json, the weights and the processor files.

        Weights: sharded safetensors with an index (shards up to `max_shard_size`), or with LoRA the peft
        adapter (adapter_config.json, adapter_model.safetensors) and head.safetensors only: megabytes where
        the backbone is gigabytes. `state_dict` is for weights gathered elsewhere (DeepSpeed ZeRO hands the
        Trainer a full one).
        """
        if kwargs.pop("push_to_hub", False):
            raise ValueError("use JRM.push_to_hub(repo_id): it uploads the processor files too")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        if self.config.lora is None:
            # Keys as this module names them (not converted to the backbone's hub layout), so that the
            # Trainer's resume loads checkpoint-*/ straight into the model.
            kwargs.setdefault("save_original_format", False)
            super().save_pretrained(str(path), state_dict=state_dict, max_shard_size=max_shard_size, **kwargs)
        else:
            if state_dict is None:
                adapter = get_peft_model_state_dict(self.backbone)
                head = self.head.state_dict()
            else:
                adapter = get_peft_model_state_dict(
                    self.backbone,
                    {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")},
                )
                head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
            self.backbone.peft_config["default"].save_pretrained(str(path))
            save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(path / ADAPTER_FILE))
            save_file({k: v.detach().float().contiguous().cpu() for k, v in head.items()}, str(path / HEAD_FILE))
            self.config.save_pretrained(str(path))
        self.processor.save_pretrained(str(path))

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | None = None, commit_message: str = "Upload JRM"
    ) -> str:
        """Upload what `save_pretrained` writes (weights, config, processor) to a hub model repository;
        returns the commit URL."""
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *args, dtype: str | torch.dtype | None = None, **kwargs
    ) -> JRM:
        """Load a JRM from a folder or a hub id (downloaded with huggingface_hub, which honours HF_HUB_OFFLINE);
        scores round-trip exactly. `dtype` ("bfloat16", torch.bfloat16, ...; default: as saved) applies to
        the backbone, the head stays float32. Other keyword arguments go to PreTrainedModel.from_pretrained."""
        path = _local_folder(pretrained_model_name_or_path)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{pretrained_model_name_or_path} is not a JRM checkpoint: it has no config.json")
        saved_type = json.loads((path / "config.json").read_text()).get("model_type")
        if saved_type != JRMConfig.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {saved_type!r} model, not a JRM: load it with transformers' "
                f"own class"
            )
        config = JRMConfig.from_pretrained(str(path))
        processor = ImageOnlyProcessor.from_pretrained(str(path))
        if config.lora is None:
            kwargs.pop("config", None)  # AutoModel passes the one it read
            model = super().from_pretrained(str(path), *args, config=config, dtype=dtype or "auto", **kwargs)
            model.processor = processor
            return model.eval()
        model = cls(config, _base_backbone(config, dtype or config.backbone_config.dtype or torch.float32), processor)
        model.load_checkpoint(path)
        return model.eval()

    def load_checkpoint(self, path: str | Path) -> None:
        """Load the weights `save_pretrained` wrote into this model, in place (the Trainer's resume): full
        weights (one file or shards) or, for a LoRA JRM, the adapters and the head."""
        path = Path(path)
        if self.config.lora is not None:
            result = set_peft_model_state_dict(self.backbone, load_file(str(path / ADAPTER_FILE)))
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"{path / ADAPTER_FILE} does not fit this JRM: missing {missing[:3]}, unexpected "
                    f"{result.unexpected_keys[:3]}"
                )
            self.head.load_state_dict(load_file(str(path / HEAD_FILE)))
            return
        index = path / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
        state = {}
        for name in files:
            state.update(load_file(str(path / name)))
        missing, unexpected = self.load_state_dict(state, strict=False)
        tied = set(self.all_tied_weights_keys)
        if [k for k in missing if k not in tied] or unexpected:
            raise ValueError(f"{path} does not fit this JRM: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.tie_weights()

    # --- encoding ----------------------------------------------------------------------------------

    def prompt_text(self, instruction: str, num_sources: int = 1) -> str:
        """The chat text for one candidate, ending with the score token."""
        if num_sources == 1:
            return self.chat_text(f"Instruction: {instruction}\n{JUDGE_PROMPT}")
        judge = f"Judge how well the last image carries out the instruction on the first {num_sources} images."
        return self.chat_text(f"Instruction: {instruction}\n{judge}", num_sources)

    def chat_text(self, text: str, num_sources: int = 1) -> str:
        """The chat text for [source image(s)][second image] `text`, ending with the score token."""
        messages = [
            {
                "role": "user",
                # The images first, side by side: corresponding patches of the source and the edit then
                # sit at the same relative position whatever the instruction's length.
                "content": [{"type": "image"}] * (num_sources + 1) + [{"type": "text", "text": text}],
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
                raise ValueError(
                    f"{where} has {tokens} tokens, more than model.max_instruction_tokens "
                    f"({self.config.max_instruction_tokens})"
                )

    def encode(
        self,
        source_images: list[Image.Image | list[Image.Image]],
        instructions: list[str],
        edited_images: list[Image.Image],
        critiques: list[str | None] | None = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Tokenize candidates; with critiques, `labels` holds the critique tokens (-100 elsewhere).

        A candidate's source is one image or a list of them (an edit that combines several images, as in
        MMRB2 and Qwen-Image-Edit-Plus); the chat then shows every source, then the edit.

        Returns:
            input_ids, attention_mask, mm_token_type_ids: (N, L); pixel_values: (patches, C*P*P);
            image_grid_thw: (images, 3), each candidate's sources then its edit; labels: (N, L) when
            critiques are given.
        """
        _check_batch(source_images, instructions, edited_images, critiques)
        sources = [source_list(s, f"source {i}") for i, s in enumerate(source_images)]
        for i, text in enumerate(instructions):
            self.check_instruction(text, f"instruction {i}")
        chats = [self.prompt_text(t, len(s)) for t, s in zip(instructions, sources)]
        return self.encode_chats(chats, sources, edited_images, critiques, padding_side)

    def encode_chats(
        self,
        chats: list[str],
        source_images: list[Image.Image | list[Image.Image]],
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
        sources = [[to_rgb(image) for image in source_list(s, f"source {i}")] for i, s in enumerate(source_images)]
        edits = [to_rgb(e) for e in edited_images]
        for i, (s, e) in enumerate(zip(sources, edits)):  # before the image processor, which fails unnamed
            for k, image in enumerate(s):
                check_geometry(image, f"source image {i}" + (f".{k}" if len(s) > 1 else ""))
            check_geometry(e, f"edited image {i}")
        if self.config.transition_frames:  # the edit takes the first source's size
            edits = [
                e if e.size == s[0].size else e.resize(s[0].size, Image.Resampling.BICUBIC)
                for s, e in zip(sources, edits)
            ]
        images = [[*s, e] for s, e in zip(sources, edits)]
        batch = self.processor(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt")
        batch = dict(batch)
        if self.config.transition_frames:
            batch["pixel_values"] = self._transition(
                batch["pixel_values"], batch["image_grid_thw"], [len(i) for i in images]
            )
        if targets is not None:
            labels = batch["input_ids"].clone()
            score_pos = self._score_positions(batch["input_ids"])
            after = torch.arange(labels.shape[1])[None, :] > score_pos[:, None]
            labels[~after | (batch["attention_mask"] == 0)] = -100
            batch["labels"] = labels
        return batch

    def _transition(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, images_per_candidate: list[int]
    ) -> torch.Tensor:
        """Replace the first temporal frame of every edited image's patches with its first source's.

        pixel_values rows are patches, each flattened as (channel, temporal frame, pixels); a candidate's
        images come as its sources then its edit, image i with grid_thw[i].prod() patches. With several
        sources the edit is read as a change of the first (the image the instruction edits).
        """
        frames = self.processor.image_processor.temporal_patch_size
        counts = grid_thw.prod(-1).tolist()
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        out = pixel_values.clone()
        image = 0
        for k in images_per_candidate:
            first, edit = image, image + k - 1
            n = counts[first]
            source = out[starts[first] : starts[first] + n].view(n, 3, frames, -1)
            out[starts[edit] : starts[edit] + n].view(n, 3, frames, -1)[:, :, 0] = source[:, :, 0]
            image += k
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
        self,
        source_images: list[Image.Image | list[Image.Image]],
        instructions: list[str],
        edited_images: list[Image.Image],
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Rewards of edited images, one prefill each, no decoding.

        Args:
            source_images: B PIL images of any mode (converted to RGB), or B lists of them (several sources).
            instructions: B non-empty strings.
            edited_images: B PIL images.
            batch_size: sequences per forward pass; results do not depend on it.

        Returns:
            (B,) float32 rewards on CPU.
        """
        return self.score_with_features(source_images, instructions, edited_images, batch_size)[0]

    @torch.inference_mode()
    def score_with_features(
        self,
        source_images: list[Image.Image | list[Image.Image]],
        instructions: list[str],
        edited_images: list[Image.Image],
        batch_size: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`score()` plus the (B, H) score-token features of the same pass (for the effective rank)."""
        outputs = list(self._outputs(source_images, instructions, edited_images, batch_size))
        if not outputs:
            return torch.empty(0), torch.empty(0, self.head.in_features)
        return torch.cat([o.rewards for o in outputs]).cpu(), torch.cat([o.features for o in outputs]).cpu()

    @torch.inference_mode()
    def critique(
        self,
        source_images: list[Image.Image | list[Image.Image]],
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
                batch = self.encode(
                    sources[i : i + batch_size], instructions[i : i + batch_size], edited[i : i + batch_size]
                )
                yield self(**{k: v.to(device) for k, v in batch.items()})
        finally:
            self.train(was_training)


def source_list(source: Image.Image | list[Image.Image], where: str) -> list[Image.Image]:
    """A candidate's sources as a non-empty list of PIL images."""
    images = list(source) if isinstance(source, (list, tuple)) else [source]
    if not images or not all(isinstance(i, Image.Image) for i in images):
        raise ValueError(f"{where}: a source is a PIL image or a non-empty list of them, got {source!r:.80}")
    return images


def _check_batch(sources: list, instructions: list, edited: list, critiques: list | None = None) -> None:
    lengths = [len(sources), len(instructions), len(edited)] + ([] if critiques is None else [len(critiques)])
    if len(set(lengths)) > 1:
        raise ValueError(
            f"batch mismatch: {len(sources)} source images, {len(instructions)} instructions, {len(edited)} edited "
            f"images"
            + (f", {len(critiques)} critiques" if critiques is not None else "")
            + "; give one of each per candidate"
        )


def _unwrap(backbone: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone


def _local_folder(name_or_path: str | Path) -> Path:
    """A local folder as is; anything else is a hub model id, fetched (or found in the cache) by huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(str(name_or_path)))
    except (HFValidationError, RepositoryNotFoundError) as e:
        raise FileNotFoundError(
            f"{name_or_path} is neither a local folder nor a hub model id ({e.__class__.__name__})"
        ) from e
    except LocalEntryNotFoundError as e:
        offline = " (HF_HUB_OFFLINE is set: only models already in the cache load)" if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"{name_or_path} is not a local folder and could not be fetched from the hub{offline}"
        ) from e


def _base_backbone(config: JRMConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The backbone a LoRA checkpoint's adapters go on, as it was before training."""
    if config.base_model_name_or_path == "tiny":
        t = config.tiny
        backbone, _ = build_tiny(
            t["family"],
            seed=t["seed"],
            hidden=t["hidden"],
            layers=t["layers"],
            patch=t.get("patch", 8),  # configs saved before the two settings existed
            vision_depth=t.get("vision_depth", 2),
        )
        return backbone.to(dtype)
    backbone, _ = load_backbone(
        config.base_model_name_or_path, dtype, config.backbone_config._attn_implementation or "sdpa"
    )
    return backbone


AutoConfig.register("jrm", JRMConfig)
AutoModel.register(JRMConfig, JRM)
