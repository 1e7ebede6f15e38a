"""What a policy trains: LoRA adapters (peft, through diffusers' adapter API) by default, or every weight.

The reference policy for the KL term is the same network with its adapters disabled, so it costs no
memory. A fully fine-tuned network has no adapters to disable: it keeps a frozen copy as its reference.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor, nn

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: a pipeline's load_lora_weights(dir) reads it
POLICY_FILE = "policy.json"  # a saved policy's settings, trainable config and weight version
DECISION_MEANS = ("shared", "instruction")  # TrainableConfig.decision_mean


def saved_trainable(saved: dict | None) -> dict | None:
    """A policy.json's trainable config as this version writes it: a field it was written without reads as its
    default (None stays None)."""
    return None if saved is None else asdict(TrainableConfig(**saved))


def trained_decision_mean(names) -> str | None:
    """The TrainableConfig.decision_mean that trained tensors of these names were saved with: 'instruction' when
    the decision-code mean's instruction weights are among them, 'shared' when only its offset is, None when the
    policy has no decision-code mean."""
    names = list(names)
    if not any(n.endswith("code_mean.bias") for n in names):
        return None
    return "instruction" if any(n.endswith("code_mean.weight") for n in names) else "shared"


@dataclass
class TrainableConfig:
    lora_rank: int = 16
    """Rank of the LoRA adapters; 0 trains every weight (a frozen copy is kept as the KL reference), except the
    decision-code mean's instruction weights unless decision_mean is 'instruction'."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    lora_targets: str = ""
    """Regex of the modules that get adapters, matched against whole module names (peft's target_modules as a
    string, as the reward model's model.lora_targets); '' = the policy's own default. No lora_dropout: the
    sampler and the learner must compute the same log-probs (the on-policy ratio is exactly 1)."""
    gradient_checkpointing: bool = False
    """Recompute the network's activations in the backward pass instead of keeping them (diffusers'
    enable_gradient_checkpointing): the 12B+ editors need it to train at 512x512 on an 80 GB GPU."""
    decision_mean: str = "shared"
    """For a policy with decision weights (the ShapeEdit policy's decision-code mean, mu = 2 tanh((w . instruction
    + b) / 2)):
    'shared' trains b only, one offset of every instruction's mean; 'instruction' trains w too, a mean per
    instruction. 'shared' is the default because, measured with the oracle as reward (docs/rl.md), 'instruction'
    learns noise: eight prompts a step cannot say which of 64 directions of the instruction's features matter, so
    Adam drives each instruction's mean to one end of its bound or the other (sd 1.6 across prompts after 10
    steps), a group's eight codes then fall in one decision and score alike, and the held-out mean moved the wrong
    way. Policies without decision weights have nothing this applies to."""

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 trains every weight), got {self.lora_rank}")
        if not isinstance(self.lora_targets, str):
            raise ValueError(
                f"lora_targets must be a regex string ('' = the policy's default), got {self.lora_targets!r}"
            )
        if self.decision_mean not in DECISION_MEANS:
            raise ValueError(f"decision_mean must be one of {DECISION_MEANS}, got {self.decision_mean!r}")
        try:
            re.compile(self.lora_targets)
        except re.error as e:
            raise ValueError(f"lora_targets {self.lora_targets!r} is not a regex: {e}") from None


class Trainable:
    """The trained part of one network: which parameters, their state for weight sync, the reference."""

    def __init__(self, net: nn.Module, cfg: TrainableConfig, default_targets: str):
        self.net = net
        self.cfg = cfg
        net.requires_grad_(False)
        if cfg.gradient_checkpointing:
            if not hasattr(net, "enable_gradient_checkpointing"):
                raise ValueError(
                    f"{type(net).__name__} cannot recompute activations; set TrainableConfig.gradient_checkpointing "
                    f"(policy.trainable.gradient_checkpointing in RL) false"
                )
            net.enable_gradient_checkpointing()
        if cfg.lora_rank > 0:
            targets = cfg.lora_targets or default_targets
            net.add_adapter(
                LoraConfig(
                    r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, init_lora_weights="gaussian"
                )
            )
            cast_training_params(net, dtype=torch.float32)  # adapters train in fp32 over a bf16 base
            self.frozen = None
        else:
            self.frozen = copy.deepcopy(net).requires_grad_(False)
            net.requires_grad_(True)

    def to(self, device: torch.device | str) -> Trainable:
        """Move the network and, for a full fine-tune, its frozen reference copy (which no pipeline holds)."""
        self.net.to(device)
        if self.frozen is not None:
            self.frozen.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def state(self) -> dict[str, Tensor]:
        """Detached copies of the trained tensors, by name (what weight sync and checkpoints move)."""
        return {n: p.detach().clone() for n, p in self.net.named_parameters() if p.requires_grad}

    def load_state(self, state: dict[str, Tensor]) -> None:
        params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(
                f"trainable state does not match the network: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, p in params.items():
                if state[name].shape != p.shape:
                    raise ValueError(f"trainable tensor {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
                p.copy_(state[name])  # onto the parameter's device and dtype, wherever the tensor is

    @contextlib.contextmanager
    def reference(self):
        """Within this block the network computes the reference policy."""
        if self.frozen is not None:
            live = self.net
            self.net = self.frozen
            try:
                yield
            finally:
                self.net = live
            return
        self.net.disable_adapters()
        try:
            yield
        finally:
            self.net.enable_adapters()

    def save_pretrained(self, path: str | Path, pipeline_cls, settings: dict, version: int) -> None:
        """Write the trained weights (`save`) and POLICY_FILE: the policy's `settings` (what must match to load them
        back), this trainable config and the weight `version`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save(path, pipeline_cls)
        saved = {**settings, "trainable": asdict(self.cfg), "version": version}
        (path / POLICY_FILE).write_text(json.dumps(saved, indent=2) + "\n")

    def load_pretrained(self, path: str | Path, settings: dict) -> int:
        """Load what save_pretrained wrote onto this network, whose policy has the same `settings` and trainable
        config (refused, naming what differs, otherwise); returns the saved weight version. The tensors go where
        the network's parameters are, whatever device they were saved from."""
        path = Path(path)
        if not (path / POLICY_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no saved policy ({POLICY_FILE} is missing)")
        saved = json.loads((path / POLICY_FILE).read_text())
        saved["trainable"] = saved_trainable(saved.get("trainable"))
        mine = {**settings, "trainable": asdict(self.cfg)}
        differ = {key: (saved.get(key), value) for key, value in mine.items() if saved.get(key) != value}
        if differ:
            raise ValueError(f"{path / POLICY_FILE} does not match this policy (saved, this): {differ}")
        self.load_state(self.read_saved(path))
        return saved["version"]

    def save(self, path: Path, pipeline_cls) -> None:
        """LoRA: diffusers' LORA_FILE, which a stock `pipeline_cls.load_lora_weights(path)` reads; full
        fine-tune: the network's own save_pretrained in path/transformer."""
        if self.cfg.lora_rank > 0:
            pipeline_cls.save_lora_weights(
                path,
                transformer_lora_layers=get_peft_model_state_dict(self.net),
                transformer_lora_adapter_metadata=self.net.peft_config["default"].to_dict(),
            )
        else:
            self.net.save_pretrained(path / "transformer")

    def read_saved(self, path: Path) -> dict[str, Tensor]:
        """The tensors save() wrote, named as in state() (ready for load_state)."""
        if self.cfg.lora_rank > 0:
            # diffusers' file has 'transformer.' prefixes and no adapter name; ours are peft's 'default' adapter
            return {
                re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", key.removeprefix("transformer.")): value
                for key, value in load_file(str(path / LORA_FILE)).items()
            }
        names = set(self.state())
        full = type(self.net).from_pretrained(path / "transformer", dtype=self.net.dtype).state_dict()
        return {name: value for name, value in full.items() if name in names}
