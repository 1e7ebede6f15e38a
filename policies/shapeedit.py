"""The ShapeEdit policy: a small pixel-space flow-matching editor that trains on a CPU.

An SD3-style MMDiT (diffusers' SD3Transformer2DModel, joint text-image attention) over 8x8-pixel patches
of the 64x64 image, with the source image concatenated on the channel axis and a small CLIP text encoder
(transformers' CLIPTextModel) over a word-level tokenizer; a per-pixel head predicts the clean edit (by
default as a classifier over keeping the source pixel and the palette colours), from which the velocity
follows. Pixel space, not a VAE latent space: ShapeEdit images are flat colours with hard edges, 8x8 patches already
give only 64 tokens, and the oracle judges exactly the pixels the policy writes. Pretrain it with
`python launch/pretrain_policy.py`; RL adapts it with LoRA on the transformer (the text encoder stays frozen, so
rollouts store its outputs).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
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

from policies.adapters import Trainable, TrainableConfig, saved_trainable, trained_decision_mean
from policies.images import check_batch, images_to_tensor, to_uint8
from policies.rollout import Rollout
from policies.sampling import SamplerConfig, stochastic_steps
from policies.sde import StepOutput, sde_step_with_logprob

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # [EOS] is not id 2: CLIP treats eos id 2 as legacy
# Regex (peft's target_modules, matched against whole module names): attention and the image stream's feed-forward.
PARAMETERISATIONS = ("palette", "gated", "change")
QUERIES = (
    2  # a head that reads source colours gets 2 x QUERIES colour-query maps, from its token and instruction features
)
# The ShapeEdit world's colours (policies/ and reward/ are leaves and do not import each other).
# Copied from reward.shapeedit.world.SHAPE_COLOURS
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "pink": (250, 140, 200),
    "cyan": (40, 200, 220),
}
# Copied from reward.shapeedit.world.BACKGROUND_COLOURS
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (130, 130, 130),
    "brown": (110, 70, 40),
    "navy": (20, 40, 110),
}
SHAPEEDIT_PALETTE = (*SHAPE_COLOURS.values(), *BACKGROUND_COLOURS.values())  # the default palette, in this order
CODE_MEAN_BOUND = 2.0  # the decision code's mean stays in (-2, 2): at -2, 98% of codes fall below 0
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
    parameterisation: str = "palette"
    """How the network's output becomes the clean-image estimate x0_hat: 'palette' = a per-pixel classifier's mean
    over keeping the source pixel and the palette colours (and its most probable category at the last step);
    'gated' = m * c + (1 - m) * source with a per-pixel gate m and content c; both from a per-pixel head that also
    sees the source and noisy pixels; 'change' = source + a change read from the patch tokens alone."""
    head_features: int = 8
    """'palette' and 'gated': features per pixel that the transformer hands to the per-pixel head."""
    head_hidden: int = 32
    """'palette' and 'gated': width of the per-pixel head's two hidden layers."""
    head_text_features: int = 16
    """'palette' and 'gated': features of the pooled instruction that the head reads at every pixel (0 = none)."""
    palette: list[list[int]] = field(default_factory=lambda: [list(c) for c in SHAPEEDIT_PALETTE])
    """'palette' only: the RGB colours (0-255) the head may write besides keeping the source pixel (default: the
    13 colours of ShapeEdit renders)."""
    head_source_colours: bool = True
    """'palette' only (ignored otherwise): the head also reads each source pixel's palette colour (one-hot) and
    colour queries from the tokens and the instruction read at that colour, so an edit can take an object's own
    pixels inside a patch."""
    decision_code: bool = False
    """'palette' and 'gated': the network also reads a decision code z per edit, drawn with the initial noise
    from N(mu, 1) and fixed along the trajectory (ShapeEditCondition.codes), added to the pooled instruction.
    Pretraining against a demonstrator that answers differently by z (launch/pretrain_policy.py `demonstrator`)
    makes the policy's samples of one prompt differ in their decisions (which object, which value), not in
    speckle: what group-relative RL compares. The mean mu is a linear function of the pooled instruction, 0
    after pretraining and trained by RL: the draw of z is a step of the policy, its log-prob (over the latent's
    dimensions, like the SDE steps') counted in the first stochastic step, so RL can move which decisions the
    policy takes, not only how it draws them."""
    head_sigma: bool = False
    """'palette' and 'gated': the per-pixel head reads the noise level sigma and the noisy pixels scaled by
    (1 - sigma). Without it the head sees each noisy pixel at full weight whatever the noise level (only the
    transformer's features carry sigma), and where the edit must draw something new (move, add, resize, swap)
    it followed pure noise at the first sampling steps (docs/policies.md)."""
    last_step: str = "most_probable"
    """'palette' only: the deterministic last step (to sigma 0) gives each pixel its 'most_probable' category, or
    the categories' 'mean' (the plain Euler step, which ends on blends where the classifier is unsure). A sampler
    with sample_last_step draws each pixel's category instead (RL rollouts)."""

    def __post_init__(self):
        if self.last_step not in ("most_probable", "mean"):
            raise ValueError(f"last_step must be 'most_probable' or 'mean', got {self.last_step!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % 32:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of the head size 32")
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {self.parameterisation!r}")
        if self.head_sigma and self.parameterisation == "change":
            raise ValueError("head_sigma needs the 'palette' or 'gated' parameterisation (it has no per-pixel head)")
        if self.decision_code and self.parameterisation == "change":
            raise ValueError("decision_code needs the 'palette' or 'gated' parameterisation (its head reads the code)")
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.palette):
            raise ValueError(f"policy.palette must hold [r, g, b] triples in 0-255, got {self.palette}")


@dataclass
class ShapeEditCondition:
    """What the velocity needs besides x and sigma; computed once per rollout by the frozen text encoder."""

    source: Tensor  # (B, 3, H, W) float32 in [-1, 1]
    text_embeds: Tensor  # (B, L, D_text) CLIP last hidden state of the instruction
    pooled_embeds: Tensor  # (B, D_text) CLIP pooled output of the instruction
    negative_text_embeds: Tensor  # (B, L, D_text) of the negative prompt (used when guidance_scale > 1)
    negative_pooled_embeds: Tensor  # (B, D_text)
    codes: Tensor  # (B,) the decision code of each edit (zeros for a policy without one)


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
        head_outputs: int = 4,
        head_source_colours: int = 0,
        decision_code: bool = False,
        head_sigma: bool = False,
    ):
        """SD3Transformer2DModel's arguments (out_channels = the features per pixel handed to the head), the
        head's width, the features of the pooled instruction it reads at every pixel (0 = none) and its outputs
        per pixel (4 = gate logit and colour for 'gated'; 1 + palette size = category logits for 'palette'), and
        the palette size when the head also reads each source pixel's palette colour (0 = it does not), and
        whether the head reads the noise level (ShapeEditPolicyConfig.head_sigma)."""
        if in_channels != 6:
            raise ValueError(
                f"the gated transformer reads (noisy image, source): in_channels must be 6, got {in_channels}"
            )
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
        # The decision code joins the pooled instruction, which conditions every block (adaLN) and the head.
        self.code_to_pooled = nn.Linear(1, pooled_projection_dim) if decision_code else None
        # The mean of the code's draw given the instruction: 0 (the pretraining's N(0, 1)) until RL trains it.
        self.code_mean = nn.Linear(pooled_projection_dim, 1) if decision_code else None
        if self.code_mean is not None:
            nn.init.zeros_(self.code_mean.weight)
            nn.init.zeros_(self.code_mean.bias)
        # Linear layers over channels-last pixels: 2x faster than 1x1 convolutions on a CPU.
        self.text_to_head = nn.Linear(pooled_projection_dim, head_text_features) if head_text_features else None
        # With source colours: QUERIES maps of one score per palette colour from the patch tokens and from the
        # instruction ("change the pixels of colour k here"; "the instruction names colour k"), each read at the
        # pixel's own source colour; the head gets those scores and the colour one-hot.
        k = head_source_colours
        self.colour_queries = nn.Linear(out_channels + head_text_features, 2 * QUERIES * k) if k else None
        self.pixel_head = nn.Sequential(
            nn.Linear(
                out_channels + head_text_features + 6 + k + 2 * QUERIES * bool(k) + decision_code + head_sigma,
                head_hidden,
            ),
            nn.SiLU(),
            nn.Linear(head_hidden, head_hidden),
            nn.SiLU(),
            nn.Linear(head_hidden, head_outputs),
        )

    def forward(
        self,
        hidden_states: Tensor,
        pooled_projections: Tensor,
        source_colours: Tensor | None = None,
        codes: Tensor | None = None,
        **kwargs,
    ) -> Transformer2DModelOutput:
        """hidden_states (B, 6, H, W) = (noisy image, source); source_colours (B, K, H, W), each source pixel's
        palette colour one-hot (when the head reads them); codes (B,) the decision codes (when it has them);
        returns sample (B, head_outputs, H, W)."""
        if self.code_to_pooled is not None:
            if codes is None:
                raise ValueError("this network reads a decision code per edit: pass codes (B,)")
            pooled_projections = pooled_projections + self.code_to_pooled(codes[:, None].to(pooled_projections.dtype))
        features = super().forward(hidden_states=hidden_states, pooled_projections=pooled_projections, **kwargs).sample
        pixels = [features.permute(0, 2, 3, 1), hidden_states.permute(0, 2, 3, 1)]  # (B, H, W, C) each
        if self.config.head_sigma:
            # The noisy pixels scaled by their signal's share (1 - sigma), and sigma itself: a pixel head that read
            # them unscaled trusted pure noise like a nearly clean pixel (its guess flipped with the noise draw on
            # 16-19% of the pixels of move and add edits at sigma 0.999), and the ODE then followed that speckle.
            sigma = (kwargs["timestep"] / 1000.0).to(pixels[0].dtype)[:, None, None, None]
            noisy, source = pixels[1].split(3, dim=-1)
            pixels[1] = torch.cat([(1 - sigma) * noisy, source, sigma.expand(*noisy.shape[:3], 1)], dim=-1)
        if self.text_to_head is not None:
            # The instruction straight to every pixel: "pixels of the named colour" needs no attention to find.
            pixels.append(self.text_to_head(pooled_projections)[:, None, None, :].expand(*pixels[0].shape[:3], -1))
        if self.colour_queries is not None:
            if source_colours is None:
                raise ValueError("this head reads the source pixels' palette colours: pass source_colours (B, K, H, W)")
            onehot = source_colours.permute(0, 2, 3, 1)  # (B, H, W, K)
            context = torch.cat([pixels[0], *pixels[2:]], dim=-1)  # the token's features and the instruction's
            queries = self.colour_queries(context).unflatten(-1, (2 * QUERIES, onehot.shape[-1]))  # (B, H, W, 2Q, K)
            # Each query read at the pixel's own source colour: an edit can then take an object's own pixels
            # inside a patch, where the patch token alone paints the whole 8x8 block.
            pixels += [onehot, (queries * onehot[..., None, :]).sum(-1)]
        if self.code_to_pooled is not None:  # and straight to every pixel: the head makes the per-pixel decisions
            pixels.append(codes[:, None, None, None].to(pixels[0].dtype).expand(*pixels[0].shape[:3], 1))
        return Transformer2DModelOutput(sample=self.pixel_head(torch.cat(pixels, dim=-1)).permute(0, 3, 1, 2))


def build_tokenizer(instructions: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer learnt from instructions; unknown words map to [UNK]."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(
        instructions, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    )
    eos = tok.token_to_id("[EOS]")
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )


# The tiny policy's sizes and vocabulary (ShapeEditPolicy.tiny; the tests build theirs from these)
TINY = ShapeEditPolicyConfig(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_layers=2,
    text_hidden_size=32,
    text_layers=1,
    max_instruction_tokens=12,
)
TINY_INSTRUCTIONS = [
    "make the red circle blue",
    "remove the green square",
    "move the star to the top left",
    "turn the background white",
]


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
        if self.trainable is not None and cfg.decision_code:
            # trained beside the adapters: the offset always, the instruction's weights when asked for
            transformer.code_mean.bias.requires_grad_(True)
            transformer.code_mean.weight.requires_grad_(trainable.decision_mean == "instruction")
        # 'palette': the colours the head chooses among, in the model's [-1, 1] pixel units, (K, 3).
        self.palette = torch.tensor(cfg.palette, dtype=torch.float32).reshape(-1, 3) / 127.5 - 1.0

    # ---- construction and persistence ----------------------------------------------------------------

    @classmethod
    def tiny(
        cls, height: int = 32, width: int = 32, trainable: TrainableConfig | None = None, seed: int = 0
    ) -> ShapeEditPolicy:
        """A small random policy of the real architecture (tests, CPU): square images of `height` pixels."""
        if height != width:
            raise ValueError(f"the ShapeEdit policy edits square images, got {width}x{height}")
        return cls.build(replace(TINY, image_size=height), TINY_INSTRUCTIONS, seed=seed, trainable=trainable)

    @classmethod
    def build(
        cls,
        cfg: ShapeEditPolicyConfig,
        instructions: list[str],
        seed: int = 0,
        trainable: TrainableConfig | None = None,
    ) -> ShapeEditPolicy:
        """A freshly initialised policy whose vocabulary is learnt from `instructions`."""
        if cfg.parameterisation == "palette" and not cfg.palette:
            raise ValueError("parameterisation 'palette' needs policy.palette: a list of [r, g, b] colours in 0-255")
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
        if cfg.parameterisation in ("gated", "palette"):
            outputs = 4 if cfg.parameterisation == "gated" else 1 + len(cfg.palette)
            transformer = GatedSD3Transformer(
                **shared,
                in_channels=6,
                out_channels=cfg.head_features,
                head_hidden=cfg.head_hidden,
                head_text_features=cfg.head_text_features,
                head_outputs=outputs,
                decision_code=cfg.decision_code,
                head_sigma=cfg.head_sigma,
                head_source_colours=len(cfg.palette)
                if cfg.parameterisation == "palette" and cfg.head_source_colours
                else 0,
            )
            if cfg.parameterisation == "palette":
                with torch.no_grad():  # an untrained policy keeps the source (p_0 ~ 0.98): it starts as doing nothing
                    transformer.pixel_head[-1].bias[0] = math.log(50 * len(cfg.palette))
        else:  # in: noisy image + source image; out: the change from the source
            transformer = SD3Transformer2DModel(**shared, in_channels=6, out_channels=3)
        return cls(cfg, transformer, text_encoder, tokenizer, trainable)

    def save_pretrained(self, path: str | Path) -> None:
        """transformer/, text_encoder/, tokenizer/ (their own save_pretrained), policy.json, and, when LoRA
        adapters are on, their weights in adapter.safetensors (the base weights stay the pretrained ones)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.trainable is not None and self.trainable_cfg.lora_rank > 0:
            base = {
                k.replace(".base_layer.", "."): v for k, v in self.transformer.state_dict().items() if "lora_" not in k
            }
            fresh = type(self.transformer).from_config(self.transformer.config)
            fresh.load_state_dict(base)
            fresh.save_pretrained(path / "transformer")
            save_file({k: v.contiguous() for k, v in self.trainable_state().items()}, str(path / "adapter.safetensors"))
        else:
            self.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        meta = {
            "config": asdict(self.cfg),
            "trainable": asdict(self.trainable_cfg) if self.trainable_cfg else None,
            "version": self.version,
        }
        (path / "policy.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, trainable: TrainableConfig | None = None) -> ShapeEditPolicy:
        """Load a saved policy. `trainable` adds fresh LoRA adapters for RL; a saved adapter is loaded back
        when `trainable` is None (then its saved settings apply) or has the same shape."""
        path = Path(path)
        if not (path / "policy.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a saved ShapeEdit policy (no policy.json); train one with launch/pretrain_policy.py"
            )
        meta = json.loads((path / "policy.json").read_text())
        cfg = ShapeEditPolicyConfig(**meta["config"])
        adapter = path / "adapter.safetensors"
        if trainable is None and meta["trainable"] is not None:
            trainable = TrainableConfig(**meta["trainable"])
        policy = cls(
            cfg,
            (SD3Transformer2DModel if cfg.parameterisation == "change" else GatedSD3Transformer).from_pretrained(
                path / "transformer"
            ),
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
            trainable,
        )
        if trainable is not None and saved_trainable(meta["trainable"]) == asdict(trainable):
            if adapter.is_file():
                policy.load_trainable_state(load_file(str(adapter)), meta["version"])
            else:  # a full fine-tune: its trained weights are the saved transformer
                policy.version = meta["version"]
        return policy

    def load_pretrained(self, path: str | Path) -> None:
        """Load the trained weights of a policy saved by save_pretrained onto this one (the same architecture and
        trainable config), as every editing policy does."""
        saved = type(self).from_pretrained(path, trainable=self.trainable_cfg)
        self.load_trainable_state(saved.trainable_state(), saved.version)

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

    def decision_parameters(self) -> list[nn.Parameter]:
        """The decision-code mean's trained weights (TrainableConfig.decision_mean: its offset, or its instruction
        weights too), [] without a decision code."""
        self._trainable()  # refuses a policy loaded without a TrainableConfig, as trainable_parameters does
        if not self.cfg.decision_code:
            return []
        return [p for p in self.transformer.code_mean.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, Tensor]:
        return self._trainable().state()

    def load_trainable_state(self, state: dict[str, Tensor], version: int) -> None:
        trained, mine = trained_decision_mean(state), self._trainable().cfg.decision_mean
        if self.cfg.decision_code and trained not in (None, mine):
            raise KeyError(
                f"these weights trained the decision-code mean with policy.trainable.decision_mean={trained}, this "
                f"policy is set to {mine}: set it as the weights were trained"
            )
        self._trainable().load_state(state)
        self.version = version

    def reference(self) -> contextlib.AbstractContextManager:
        return self._trainable().reference()

    def encode_instructions(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """(B, L, D) hidden states and (B, D) pooled output of the text encoder, padded to a fixed length."""
        batch = self.tokenizer(
            instructions,
            padding="max_length",
            truncation=True,
            max_length=self.cfg.max_instruction_tokens,
            return_tensors="pt",
        ).to(self.device)
        out = self.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.last_hidden_state, out.pooler_output

    def predict(
        self,
        latents: Tensor,
        sigma: float | Tensor,
        source: Tensor,
        text_embeds: Tensor,
        pooled_embeds: Tensor,
        codes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The clean-edit estimate x0_hat (B, 3, H, W) and the head's logits: for 'gated' the gate's (B, 1, H, W),
        for 'palette' the categories' (B, 1 + K, H, W), for 'change' None.

        'palette': every pixel of the clean edit is either the source pixel (category 0) or one of K palette
        colours, and x0_hat = p_0 * source + sum_k p_k * colour_k with p = softmax(logits): the posterior mean
        of a per-pixel classifier, which is the squared-error-optimal x0 estimate when the classifier is
        calibrated, so cross-entropy trains a flow-matching denoiser. A confident pixel is exactly a palette
        colour or the source, so sharp flat colours cost the network nothing.

        'gated': x0_hat = m * c + (1 - m) * source, m = sigmoid(gate logit): where the gate is shut the source
        comes through unchanged, so what should stay stays without the network drawing it. 'change':
        x0_hat = source + change. Either predicts x0, not v: in pixel space a token of 8x8x3 = 192 values
        cannot carry the noise through a 128-wide transformer, but a flat-coloured change it can.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0])
        net = self.trainable.net if self.trainable is not None else self.transformer
        extra = (
            {"source_colours": self.source_colours(source)}
            if self.transformer.config.get("head_source_colours")
            else {}
        )
        if self.cfg.decision_code:
            extra["codes"] = codes
        out = net(
            hidden_states=torch.cat([latents, source], dim=1),
            encoder_hidden_states=text_embeds,
            pooled_projections=pooled_embeds,
            timestep=sigma * 1000.0,
            **extra,
        ).sample.float()
        if self.cfg.parameterisation == "change":
            return source + out, None
        if self.cfg.parameterisation == "palette":
            probs = out.softmax(dim=1)
            colours = torch.einsum("bkhw,kc->bchw", probs[:, 1:], self.palette.to(out.device))
            return probs[:, :1] * source + colours, out
        gate_logits, content = out[:, :1], out[:, 1:]
        gate = torch.sigmoid(gate_logits)
        return gate * content + (1 - gate) * source, gate_logits

    def source_colours(self, source: Tensor) -> Tensor:
        """Each source pixel's nearest palette colour, one-hot (B, K, H, W)."""
        return (
            torch.nn.functional.one_hot(nearest_colour(source, self.palette), len(self.palette))
            .permute(0, 3, 1, 2)
            .to(source.dtype)
        )

    def velocity(
        self,
        latents: Tensor,
        sigma: float | Tensor,
        source: Tensor,
        text_embeds: Tensor,
        pooled_embeds: Tensor,
        codes: Tensor | None = None,
    ) -> Tensor:
        """The velocity (B, 3, H, W) at x = latents for one sigma (a float) or one per row (B,):
        v = (x - x0_hat) / sigma on the path x = (1 - sigma) x0 + sigma eps."""
        x0 = self.predict(latents, sigma, source, text_embeds, pooled_embeds, codes)[0]
        sigma = (
            torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0]).clamp_min(1e-3)
        )
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
        if sampler.sample_last_step and self.cfg.parameterisation != "palette":
            raise ValueError(
                f"sampler.sample_last_step needs the 'palette' parameterisation (a per-pixel classifier); this policy "
                f"is {self.cfg.parameterisation!r}"
            )
        b, device = len(instructions), self.device
        sources = images_to_tensor(source_images).to(device)
        text, pooled = self.encode_instructions(list(instructions))
        neg_text, neg_pooled = self.encode_instructions([sampler.negative_prompt] * b)
        sigmas = self._sigmas(sampler.num_steps)
        stochastic = stochastic_steps(sampler, generator).to(device)
        x = torch.randn((b, 3, self.height, self.width), generator=generator, dtype=torch.float32, device=device)
        codes = torch.zeros(b, dtype=torch.float32, device=device)
        if self.cfg.decision_code:  # drawn after the noise: a policy without a code keeps its stream of draws
            codes = self._code_means(pooled) + torch.randn(b, generator=generator, dtype=torch.float32, device=device)
        condition = ShapeEditCondition(sources.float() / 127.5 - 1.0, text, pooled, neg_text, neg_pooled, codes)
        first = stochastic & ~(stochastic.cumsum(0) > 1)  # (T,) the first stochastic step, where the code counts
        latents, log_probs = [x], []
        for t in range(sampler.num_steps):
            if self._categorical(sampler, t):
                step = self._palette_step(
                    x, float(sigmas[t]), condition, sampler, draw=bool(stochastic[t]), generator=generator
                )
            else:
                v = self._guided_velocity(x, float(sigmas[t]), condition, sampler.guidance_scale)
                noise = sampler.noise_level if stochastic[t] else 0.0
                step = sde_step_with_logprob(
                    x, v, float(sigmas[t]), float(sigmas[t + 1]), noise, sampler.kind, generator=generator
                )
            x = step.prev_latents
            latents.append(x)
            if self.cfg.decision_code and first[t]:
                step.log_probs = step.log_probs + self._code_log_prob(condition)
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
        x, chosen = rollout.latents[:, step], rollout.latents[:, step + 1]
        if self._categorical(sampler, step) and bool(
            stochastic.any()
        ):  # a drawn last step; undrawn, the Euler step's mean
            out = self._palette_step(x, s, rollout.condition, sampler, draw=True, chosen=chosen)
        else:
            v = self._guided_velocity(x, s, rollout.condition, sampler.guidance_scale)
            noise = sampler.noise_level if bool(stochastic.any()) else 0.0
            out = sde_step_with_logprob(x, v, s, s_next, noise, sampler.kind, prev_latents=chosen)
        if self.cfg.decision_code:
            first = stochastic & ~rollout.stochastic[:, :step].any(dim=1)  # (B,) the row's first stochastic step
            out.log_probs = out.log_probs + torch.where(first, self._code_log_prob(rollout.condition), 0.0)
        out.log_probs = torch.where(stochastic, out.log_probs, torch.zeros_like(out.log_probs))
        return out

    @contextlib.contextmanager
    def code_mean_fixed(self, value: float):
        """Within the block every instruction's decision-code mean is `value` (clamped just inside the bound), and
        the mean's weights come back afterwards: the policy with its decisions chosen and nothing else changed
        (launch/policy_binding.py's probe; the demo's gold by code mean, the most that moving the mean can give)."""
        if not self.cfg.decision_code:
            raise ValueError("code_mean_fixed needs a policy with a decision code (ShapeEditPolicyConfig)")
        layer = self.transformer.code_mean
        saved = layer.weight.detach().clone(), layer.bias.detach().clone()
        bound = CODE_MEAN_BOUND * (1 - 1e-6)
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.fill_(CODE_MEAN_BOUND * math.atanh(max(-bound, min(bound, value)) / CODE_MEAN_BOUND))
        try:
            yield self
        finally:
            with torch.no_grad():
                layer.weight.copy_(saved[0])
                layer.bias.copy_(saved[1])

    def decision_draw(self, rollout: Rollout) -> tuple[Tensor, Tensor] | None:
        """(B,) each edit's decision-code mean under the current weights and (B,) the codes drawn (the draw is
        N(mean, 1)); None without a decision code (EditingPolicy.decision_draw)."""
        if not self.cfg.decision_code:
            return None
        return self._code_means(rollout.condition.pooled_embeds), rollout.condition.codes.float()

    def _code_means(self, pooled: Tensor) -> Tensor:
        """(B,) the mean of each edit's code draw, from its pooled instruction (the trained network's), kept within
        +-CODE_MEAN_BOUND by a tanh: pretraining drew the codes from N(0, 1), and a code far outside that range asks
        the network for edits it never learnt (RL on a noisy reward drove an unbounded mean to +-80 in 20 steps)."""
        net = self.trainable.net if self.trainable is not None else self.transformer
        return CODE_MEAN_BOUND * torch.tanh(net.code_mean(pooled.float())[:, 0] / CODE_MEAN_BOUND)

    def _code_log_prob(self, condition: ShapeEditCondition) -> Tensor:
        """(B,) log N(z; mu, 1) of each edit's code, over the latent's dimensions (3 H W): the draw counts as one
        more dimension of the first stochastic step, whose log-prob is a mean over dimensions."""
        z, mu = condition.codes, self._code_means(condition.pooled_embeds)
        return (-0.5 * (z - mu) ** 2 - 0.5 * math.log(2 * math.pi)) / (3 * self.height * self.width)

    def flow_velocity(self, rollout: Rollout, latents: Tensor, sigma: float) -> Tensor:
        """The sampler's velocity at (latents, sigma) with the rollout's condition (EditingPolicy.flow_velocity)."""
        return self._guided_velocity(latents, float(sigma), rollout.condition, rollout.sampler.guidance_scale)

    # ---- internals --------------------------------------------------------------------------------------------

    def _trainable(self) -> Trainable:
        if self.trainable is None:
            raise RuntimeError(
                "this policy was loaded without a TrainableConfig; pass trainable=TrainableConfig(...) to train it"
            )
        return self.trainable

    def _sigmas(self, num_steps: int) -> Tensor:
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.sigmas.float().clone()  # (T + 1,), the last one 0

    def _categorical(self, sampler: SamplerConfig, step: int) -> bool:
        """Whether `step` is the palette's last step, a choice of one category per pixel: always when the
        sampler draws it (sample_last_step), else when the policy takes the most probable category."""
        if step != sampler.num_steps - 1:
            return False
        return self.cfg.parameterisation == "palette" and (
            sampler.sample_last_step or self.cfg.last_step == "most_probable"
        )

    def category_image(self, category: Tensor, source: Tensor) -> Tensor:
        """'palette': the image (B, 3, H, W) of each pixel's category (B, H, W): 0 keeps the source pixel, 1 + k
        paints palette colour k."""
        colours = self.palette.to(source.device)[(category - 1).clamp_min(0)].permute(0, 3, 1, 2)
        return torch.where(category[:, None] == 0, source, colours)

    def _palette_step(
        self,
        x: Tensor,
        sigma: float,
        c: ShapeEditCondition,
        sampler: SamplerConfig,
        draw: bool,
        chosen: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """'palette' only, the last step from x at sigma (to sigma 0, where an ODE step would land on x0_hat): each
        pixel becomes one category, the source pixel or a palette colour, instead of the categories' mean (a
        blend no render has, where the classifier is unsure). Under CFG the logits are guided like the velocity:
        uncond + w (cond - uncond).

        draw=False: the most probable category, log-prob 0 (deterministic; evaluation). draw=True (the sampler's
        sample_last_step, noise_level > 0): each pixel's category drawn from softmax(logits / temperature)
        (Gumbel-max, with `generator`); its log-prob is the image's categorical log-likelihood averaged over
        pixels (a pixel's probability sums the categories that give its colour: keeping a red source pixel and
        painting it red are one outcome), so a stored edit (`chosen`) is scored without knowing which category
        drew it.
        """
        logits = self._guided(lambda *inputs: self.predict(*inputs)[1], x, sigma, c, sampler.guidance_scale).float()
        log_p = (logits / sampler.temperature).log_softmax(dim=1)  # (B, 1 + K, H, W)
        palette = self.palette.to(x.device)
        if chosen is None:
            scores = log_p
            if draw:
                u = torch.rand(log_p.shape, generator=generator, dtype=torch.float32, device=x.device)
                scores = log_p - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))  # Gumbel-max: a draw from softmax
            chosen = self.category_image(scores.argmax(dim=1), c.source).to(x.dtype)
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        if not draw:
            return StepOutput(chosen, torch.zeros(x.shape[0], dtype=torch.float32, device=x.device), chosen, zero)
        same = (
            torch.cat(
                [
                    (chosen - c.source).abs().amax(dim=1, keepdim=True),
                    (chosen[:, None] - palette[None, :, :, None, None]).abs().amax(dim=2),
                ],
                dim=1,
            )
            < 1e-3
        )  # (B, 1 + K, H, W): the categories that give each pixel its colour
        if not same.any(dim=1).all():
            raise ValueError(
                "the stored edit has pixels that are neither the source's nor a palette colour: not drawn by this "
                "policy's last step"
            )
        pixel = torch.logsumexp(log_p.masked_fill(~same, float("-inf")), dim=1)  # (B, H, W)
        return StepOutput(chosen, pixel.flatten(1).mean(dim=1), chosen, zero, log_categories=log_p)

    def _guided_velocity(self, x: Tensor, sigma: float, c: ShapeEditCondition, guidance_scale: float) -> Tensor:
        return self._guided(self.velocity, x, sigma, c, guidance_scale)

    def _guided(self, output, x: Tensor, sigma: float, c: ShapeEditCondition, guidance_scale: float) -> Tensor:
        """output(latents, sigma, source, text_embeds, pooled_embeds, codes) in one batched forward; with true CFG
        the unconditional half rides in the same batch and the result is uncond + w (cond - uncond)."""
        if guidance_scale == 1.0:
            return output(x, sigma, c.source, c.text_embeds, c.pooled_embeds, c.codes)
        both = output(
            torch.cat([x, x]),
            sigma,
            torch.cat([c.source, c.source]),
            torch.cat([c.negative_text_embeds, c.text_embeds]),
            torch.cat([c.negative_pooled_embeds, c.pooled_embeds]),
            torch.cat([c.codes, c.codes]),
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
    edit_average: str = "batch",
    codes: Tensor | None = None,
    distractor_weight: float = 0.0,
) -> Tensor:
    """Supervised (rectified) flow matching on x_s = (1 - s) x0 + s eps, in the x0 parametrisation.

    Args:
        source, target: (B, 3, H, W) float32 in [-1, 1]; instructions: B strings ("" for the
            unconditional branch of CFG). The text encoder is trained along (call requires_grad_ on it).
        gate_weight: for the 'gated' parameterisation, the weight of a binary cross-entropy that teaches the
            gate the pixels the edit changes (target != source); 0 = the image loss alone.
        edit_weight: the weight of a second squared error averaged over the changed pixels alone: an edit
            touches a few percent of the image, so in the plain mean its pixels hardly count.
        edit_average: 'batch' averages that term over all the batch's changed pixels (a background edit, most
            of its image, then outweighs a recoloured shape 40 to 1); 'image' over each image's changed pixels,
            then over the images, so every edit weighs the same whatever its area.
        sigma_location: mean of the normal whose sigmoid is sigma; above 0 more of the training is at high noise,
            where the edit must be read from the source and the instruction, not from the noisy image.
        codes: (B,) each target's decision code, for a policy with one (ShapeEditPolicyConfig.decision_code).
        distractor_weight: the weight of a third term averaged (like edit_weight's) over the pixels the edit keeps
            that are not the source's background (its most common colour): the other objects. edit_weight alone
            makes a changed pixel weigh tens of unchanged ones, so a network unsure which object is meant paints
            every candidate ("the blue triangle": all triangles); this term makes that cost as much.
    Returns: the scalar mean squared error of the predicted clean image (plus the two terms); sigmas are
        logit-normal (SD3). For the 'palette' parameterisation the cross-entropy of `palette_loss` instead.
    """
    b = target.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=generator) + sigma_location)
    noise = torch.randn(target.shape, generator=generator)
    s = sigma.view(b, 1, 1, 1)
    x = (1 - s) * target + s * noise
    text, pooled = policy.encode_instructions(instructions)
    x0, logits = policy.predict(x, sigma, source, text, pooled, codes)
    changed = (target != source).any(dim=1, keepdim=True).float()  # (B, 1, H, W)
    distractors = (1 - changed) * (~background_pixels(source)).float() if distractor_weight else None
    if policy.cfg.parameterisation == "palette":
        return palette_loss(
            policy.palette, logits, target, changed, edit_weight, edit_average, distractors, distractor_weight
        )
    per_pixel = ((x0 - target) ** 2).mean(dim=1, keepdim=True)
    loss = per_pixel.mean()
    if edit_weight:
        loss = loss + edit_weight * changed_mean(per_pixel, changed, edit_average)
    if distractor_weight:
        loss = loss + distractor_weight * changed_mean(per_pixel, distractors, edit_average)
    if gate_weight and logits is not None:
        loss = loss + gate_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, changed)
    return loss


def nearest_colour(images: Tensor, palette: Tensor) -> Tensor:
    """The index of each pixel's nearest palette colour (max-channel distance), (B, H, W); images (B, 3, H, W)
    and palette (K, 3) in the same units."""
    return (images[:, None] - palette.to(images.device)[None, :, :, None, None]).abs().amax(dim=2).argmin(dim=1)


def changed_mean(per_pixel: Tensor, changed: Tensor, average: str) -> Tensor:
    """The mean of a (B, 1, H, W) per-pixel loss over the changed pixels: of the whole batch ('batch'), or of each
    image and then over the images that change any pixel ('image')."""
    if average == "batch":
        return (per_pixel * changed).sum() / changed.sum().clamp_min(1.0)
    if average == "image":
        count = changed.sum(dim=(1, 2, 3))
        per_image = (per_pixel * changed).sum(dim=(1, 2, 3)) / count.clamp_min(1.0)
        return per_image.sum() / (count > 0).sum().clamp_min(1)
    raise ValueError(f"edit_average must be 'batch' or 'image', got {average!r}")


def background_pixels(source: Tensor) -> Tensor:
    """(B, 1, H, W): the pixels of each source image's most common colour (a ShapeEdit render's background)."""
    rgb = ((source + 1.0) * 127.5).round().long()  # (B, 3, H, W) in 0-255
    key = (rgb[:, 0] * 256 + rgb[:, 1]) * 256 + rgb[:, 2]  # (B, H, W): one integer per colour
    common = key.flatten(1).mode(dim=1).values  # (B,)
    return (key == common[:, None, None])[:, None]


def palette_loss(
    palette: Tensor,
    logits: Tensor,
    target: Tensor,
    changed: Tensor,
    edit_weight: float,
    edit_average: str = "batch",
    distractors: Tensor | None = None,
    distractor_weight: float = 0.0,
) -> Tensor:
    """Cross-entropy of the 'palette' head against each pixel's category: 0 where the edit keeps the source
    pixel, else 1 + the index of the target's (nearest) palette colour; `edit_weight` adds the cross-entropy
    averaged over the changed pixels alone, `distractor_weight` over the `distractors` mask (flow_matching_loss)."""
    category = torch.where(changed[:, 0] > 0, nearest_colour(target, palette) + 1, 0)
    per_pixel = torch.nn.functional.cross_entropy(logits, category, reduction="none")[:, None]  # (B, 1, H, W)
    loss = per_pixel.mean()
    if edit_weight:
        loss = loss + edit_weight * changed_mean(per_pixel, changed, edit_average)
    if distractor_weight:
        loss = loss + distractor_weight * changed_mean(per_pixel, distractors, edit_average)
    return loss
