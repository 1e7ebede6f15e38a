"""Every editing policy the RL config can name: `policy.kind` -> how to load it, its own options, its tiny version.

    policy = load_policy("qwen_image_edit", "Qwen/Qwen-Image-Edit-2509", {"plus": True}, TrainableConfig(), ...)

The RL config (rl/config.py `PolicyConfig`: `kind`, and the kind's options under `policy.options`), the rollout
workers and learners (rl/workers.py `build_policy`) and the contract test (tests/policies/test_contract.py) read
this table and nothing else. Adding an editing model is one file in policies/ (a class keeping the contract of
policies/policy.py) and one entry in POLICIES. The modules are imported when a policy is built, so reading the
table costs no diffusers import.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from policies.adapters import TrainableConfig


@dataclass
class ShapeEditOptions:
    """The ShapeEdit policy has no options of its own: everything is in its saved policy.json."""


@dataclass
class KontextOptions:
    max_sequence_length: int = 512
    """T5 tokens of the instruction (1-512)."""


@dataclass
class QwenImageEditOptions:
    plus: bool = False
    """Qwen-Image-Edit-Plus (e.g. Qwen/Qwen-Image-Edit-2509): its pipeline's prompt and resizing, one input image."""
    condition_area: int = 1024 * 1024
    """Pixel area of the source image for its VAE latents (aspect ratio kept; the pipelines' 1024^2)."""


@dataclass
class PolicyEntry:
    """One editing model: where its class lives, its options, and what the RL config must refuse for it."""

    module: str  # policies.<file>
    cls: str  # the class in it
    options: type  # the dataclass of policy.options for this kind
    load: Callable[..., Any]  # (cls, path, options, trainable, dtype, height, width) -> policy
    tiny: Callable[..., Any]  # (cls, size, trainable, options, seed) -> a random-weight policy of the real architecture
    cpu_only: bool = False  # small enough that it never goes to a GPU
    gradient_checkpointing: bool = True  # can recompute the denoiser's activations in the backward
    categorical_last_step: bool = False  # its last step can be a categorical draw (sampler.sample_last_step)
    contract_options: tuple[dict, ...] = ({},)  # the option sets the contract test runs (one variant each)

    def policy_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


def _load_shapeedit(cls, path, options: ShapeEditOptions, trainable, dtype, height, width):
    policy = cls.from_pretrained(path, trainable=trainable)
    if (policy.height, policy.width) != (height, width):
        raise ValueError(
            f"the ShapeEdit policy at {path} edits {policy.width}x{policy.height} images; set policy.height/width "
            f"to match"
        )
    return policy


def _tiny_shapeedit(cls, size, trainable, options: ShapeEditOptions, seed):
    return cls.tiny(size, size, trainable, seed=seed)


def _load_kontext(cls, path, options: KontextOptions, trainable, dtype, height, width):
    return cls.from_pretrained(
        path, torch_dtype=dtype, trainable=trainable, height=height, width=width, **dataclasses.asdict(options)
    )


def _tiny_kontext(cls, size, trainable, options: KontextOptions, seed):
    return cls.tiny(size, size, trainable, seed=seed)


def _load_qwen(cls, path, options: QwenImageEditOptions, trainable, dtype, height, width):
    return cls.from_pretrained(
        path, torch_dtype=dtype, trainable=trainable, height=height, width=width, **dataclasses.asdict(options)
    )


def _tiny_qwen(cls, size, trainable, options: QwenImageEditOptions, seed):
    return cls.tiny(size, size, trainable, seed=seed, plus=options.plus)


POLICIES: dict[str, PolicyEntry] = {
    "shapeedit": PolicyEntry(
        "policies.shapeedit",
        "ShapeEditPolicy",
        ShapeEditOptions,
        _load_shapeedit,
        _tiny_shapeedit,
        cpu_only=True,
        gradient_checkpointing=False,
        categorical_last_step=True,
    ),
    "flux_kontext": PolicyEntry("policies.kontext", "FluxKontextPolicy", KontextOptions, _load_kontext, _tiny_kontext),
    "qwen_image_edit": PolicyEntry(
        "policies.qwen_image_edit",
        "QwenImageEditPolicy",
        QwenImageEditOptions,
        _load_qwen,
        _tiny_qwen,
        contract_options=({}, {"plus": True}),
    ),
}


def policy_entry(kind: str) -> PolicyEntry:
    if kind not in POLICIES:
        raise ValueError(f"policy.kind must be one of {sorted(POLICIES)}, got {kind!r}")
    return POLICIES[kind]


def load_policy(
    kind: str, path: str, options: Any, trainable: TrainableConfig, dtype: torch.dtype, height: int, width: int
):
    """The policy of `kind` at `path` (a folder or hub id), with `options` (the kind's options dataclass) and
    fresh trainable adapters as `trainable` says."""
    entry = policy_entry(kind)
    return entry.load(entry.policy_class(), path, options, trainable, dtype, height, width)


def tiny_policy(kind: str, size: int, trainable: TrainableConfig, options: Any = None, seed: int = 0):
    """A `size` x `size` policy of `kind`'s real architecture with tiny random weights (tests, CPU)."""
    entry = policy_entry(kind)
    return entry.tiny(entry.policy_class(), size, trainable, options or entry.options(), seed)
