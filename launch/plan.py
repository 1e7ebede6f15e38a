"""Preflight plan of an RL job, from its config alone: where each actor goes and what each GPU must hold.

    python launch/grpo_edit.py --config launch/configs/flux_kontext_jrm.yaml --plan
    python launch/plan.py [--out docs/bench/plans.json]     # every shipped GPU preset, as a JSON report

Every model is built on PyTorch's `meta` device (shapes, no storage: nothing is loaded or downloaded; a
12B transformer takes a second). Per GPU it adds up, for the actors rl/ray_actors.py `placement` puts there:
- weights: every component of the policy at policy.dtype (a rollout worker holds them all; a learner holds the
  denoiser, which is all it runs on stored rollouts: `EditingPolicy.drop_encoders`); a full fine-tune adds
  the frozen reference copy; the JRM at the reward actor;
- trainable state: the trained weights in float32, their gradients and AdamW's two moments, with ZeRO-2
  sharding gradients and moments over the learner ranks and ZeRO-3 the trained weights too. ZeRO-3 partitions
  what the learner hands it (rl/learner.py `zero3_modules`): a full fine-tune's denoiser, a LoRA run's adapters;
  the frozen base of a LoRA run and a full fine-tune's reference copy stay whole on every rank;
- activations: the learner's, measured by running the denoiser forward on `meta` tensors of the real token
  counts and adding up what autograd saves for the backward (with gradient checkpointing: the checkpointed
  inputs plus one block's own), for one micro-batch; a rollout worker's no-grad forward keeps about one block's;
  the JRM's no-grad forward, from its widest layer;
- `CUDA_CONTEXT_GIB` per process.
It refuses (exit 2) a config whose busiest GPU exceeds `HEADROOM` of cluster.gpu_memory_gib, naming the GPU,
what is on it, and the settings that would bring it down. Every figure is a plan: launch/gpu_check.py measures
the real peaks on a GPU, and docs/performance.md sets the two side by side.

Model sizes come from the checkpoints' own config files when policy.path / the JRM path is a local folder,
and otherwise from the published configs of FLUX.1 Kontext [dev], Qwen-Image-Edit and Qwen2.5-VL-7B
(launch/presets.py REAL), which the plan names.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as `python launch/plan.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch import nn  # noqa: E402

from launch.benchmarking import command_line, write_report  # noqa: E402
from reward.config import load_config  # noqa: E402
from reward.evaluate import parse_reward_spec  # noqa: E402
from rl.config import RLConfig  # noqa: E402
from rl.ray_actors import placement  # noqa: E402

GIB = 2**30
CUDA_CONTEXT_GIB = 0.6  # CUDA context, cuBLAS workspace and allocator slack, per process
HEADROOM = 0.9  # plan each GPU to at most this fraction of its memory
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Role:
    """What one actor holds on its GPU (GiB)."""

    role: str
    weights: float = 0.0
    trainable: float = 0.0  # float32 trained weights, gradients, AdamW moments (this rank's shards)
    activations: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.activations + CUDA_CONTEXT_GIB


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for the backward while `fn` runs (meta tensors: counted, never allocated). A tensor
    saved by several operations counts once; views of one storage count each (meta tensors have no storage
    to compare), so this errs high."""
    total, seen = 0, {}

    def pack(t):
        nonlocal total
        if id(t) not in seen:
            seen[id(t)] = t  # held, so its id is not reused
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _lora_params(net: nn.Module, targets: str, rank: int) -> int:
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear) and re.fullmatch(targets, name)
    )


# ---- the policies on meta -------------------------------------------------------------------------------------------


@dataclass
class MetaPolicy:
    """A policy's components built on the meta device, and what the plan needs to know of its denoiser."""

    components: dict  # name -> module (or tokenizer, scheduler: not counted)
    denoiser: nn.Module  # the trained network
    forward: Callable[[], object]  # one training forward of a micro-batch through it, on meta tensors
    source: str  # where the sizes came from
    lora_targets: str  # the policy's default LoRA target regex
    blocks: int  # transformer blocks of the denoiser


def _flux(cfg: RLConfig) -> MetaPolicy:
    """FLUX.1 Kontext: its components on meta, its denoiser, a forward of one micro-batch, and where sizes came from."""
    from diffusers import FluxTransformer2DModel

    from launch.presets import REAL, building_on, kontext_components
    from policies.kontext import LORA_TARGETS

    dtype = torch.bfloat16 if cfg.policy.dtype == "bfloat16" else torch.float32
    source = "FLUX.1 Kontext [dev]'s published config"
    components = kontext_components(REAL, "meta")
    local = Path(cfg.policy.path) / "transformer" / "config.json"
    if local.is_file():
        with building_on("meta", dtype):
            components["transformer"] = FluxTransformer2DModel.from_config(json.loads(local.read_text()))
        source = str(local)
    for m in components.values():
        if isinstance(m, nn.Module):
            m.to(dtype)
    net = components["transformer"]
    c = net.config
    B, n = cfg.algo.micro_batch_size, (cfg.policy.height // 16) * (cfg.policy.width // 16)
    L = 512

    def forward():
        x = torch.zeros(B, n, c.in_channels, device="meta", dtype=dtype)
        return net(
            hidden_states=x.repeat(1, 2, 1),
            encoder_hidden_states=torch.zeros(B, L, c.joint_attention_dim, device="meta", dtype=dtype),
            pooled_projections=torch.zeros(B, c.pooled_projection_dim, device="meta", dtype=dtype),
            timestep=torch.ones(B, device="meta", dtype=dtype),
            img_ids=torch.zeros(2 * n, 3, device="meta"),
            txt_ids=torch.zeros(L, 3, device="meta"),
            guidance=torch.ones(B, device="meta", dtype=dtype),
            return_dict=False,
        )

    return MetaPolicy(
        components, net, forward, source, LORA_TARGETS, len(net.transformer_blocks) + len(net.single_transformer_blocks)
    )


def _qwen(cfg: RLConfig) -> MetaPolicy:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from launch.presets import REAL, building_on
    from policies.qwen_image_edit import DEFAULT_LORA_TARGETS

    dtype = torch.bfloat16 if cfg.policy.dtype == "bfloat16" else torch.float32
    local = Path(cfg.policy.path) / "transformer" / "config.json"
    with building_on("meta", dtype):
        if local.is_file():
            net = QwenImageTransformer2DModel.from_config(json.loads(local.read_text()))
            source = str(local)
        else:
            net = QwenImageTransformer2DModel()  # diffusers' defaults are Qwen-Image's published sizes
            source = "Qwen-Image-Edit's published config"
        text = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=REAL.text, vision_config=REAL.vision, tie_word_embeddings=False)
        )
        vae = AutoencoderKLQwenImage()
    components = {"transformer": net, "text_encoder": text, "vae": vae}
    c = net.config
    B, n = cfg.algo.micro_batch_size, (cfg.policy.height // 16) * (cfg.policy.width // 16)
    if cfg.policy.sampler.guidance_scale > 1:
        B *= 2  # true CFG: every forward, the learner's included, runs the conditional and the negative prompt
    L = 256  # instruction tokens after the template (a few dozen for typical prompts; planned generously)

    def forward():
        x = torch.zeros(B, 2 * n, c.in_channels, device="meta", dtype=dtype)
        return net(
            hidden_states=x,
            encoder_hidden_states=torch.zeros(B, L, c.joint_attention_dim, device="meta", dtype=dtype),
            encoder_hidden_states_mask=torch.ones(B, L, device="meta", dtype=torch.long),
            timestep=torch.ones(B, device="meta", dtype=dtype),
            img_shapes=[[(1, cfg.policy.height // 16, cfg.policy.width // 16)] * 2] * B,
            return_dict=False,
        )

    return MetaPolicy(components, net, forward, source, DEFAULT_LORA_TARGETS, len(net.transformer_blocks))


def policy_roles(cfg: RLConfig) -> tuple[Role, Role, str]:
    """The rollout worker's and one learner rank's memory, and where the sizes came from."""
    build = {"flux_kontext": _flux, "qwen_image_edit": _qwen}.get(cfg.policy.kind)
    if build is None:
        raise ValueError(f"policy.kind {cfg.policy.kind!r} runs on CPU: there is no GPU plan to make")
    meta = build(cfg)
    net = meta.denoiser
    bytes_ = DTYPE_BYTES[cfg.policy.dtype]
    all_weights = sum(_params(m) for m in meta.components.values() if isinstance(m, nn.Module)) * bytes_ / GIB
    denoiser = _params(net) * bytes_ / GIB
    p = cfg.policy.trainable
    world = cfg.cluster.learners
    rollout, learner = Role("rollout"), Role("learner")
    rollout.weights, learner.weights = all_weights, denoiser
    if p.lora_rank:
        trained = _lora_params(net, p.lora_targets or meta.lora_targets, p.lora_rank)
        rollout.weights += trained * 4 / GIB
        learner.notes.append(f"LoRA r{p.lora_rank}: {trained / 1e6:.1f}M trained parameters")
    else:
        trained = _params(net)
        rollout.weights += denoiser  # the frozen reference copy of a full fine-tune
        learner.weights += denoiser
        learner.notes.append(f"full fine-tune: {trained / 1e9:.2f}B trained parameters and a frozen reference copy")
    zero3 = cfg.cluster.zero_stage == 3
    if zero3 and not p.lora_rank:
        # the trained denoiser partitioned over the ranks (gathered block by block in the forward); its reference
        # copy not
        learner.weights = denoiser / world + denoiser
    learner.trainable = trained * (4 / (world if zero3 else 1) + 4 / world + 8 / world) / GIB
    net.train()
    full = _saved_bytes(meta.forward) / GIB
    if p.gradient_checkpointing:
        net.enable_gradient_checkpointing()
        boundary = _saved_bytes(meta.forward) / GIB
        learner.activations = boundary + full / meta.blocks
        learner.notes.append(
            f"gradient checkpointing: activations {learner.activations:.1f} GiB per micro-batch (without: {full:.1f})"
        )
    else:
        learner.activations = full
        learner.notes.append(
            f"activations {full:.1f} GiB per micro-batch (gradient checkpointing would make it about "
            f"{full / meta.blocks * 3:.1f})"
        )
    rollout.activations = full / meta.blocks
    return rollout, learner, meta.source


def reward_role(cfg: RLConfig) -> tuple[Role, str]:
    """The reward actor's memory: the largest JRM / generative term (other terms are small), weights and its widest
    layer."""
    from launch.presets import REAL

    role = Role("reward")
    text, vision, source = dict(REAL.text), dict(REAL.vision), "Qwen2.5-VL-7B's published config"
    for term in cfg.reward.terms:
        kind, path = parse_reward_spec(term.spec, f"reward.terms {term.name!r}")
        if kind not in ("jrm", "generative"):
            continue
        config = Path(path) / "config.json"
        if config.is_file():
            saved = json.loads(config.read_text())
            backbone = saved.get("backbone_config", saved)
            text = backbone.get("text_config", text)
            vision = backbone.get("vision_config", vision)
            source = str(config)
        h, inter, layers, vocab = (
            text["hidden_size"],
            text["intermediate_size"],
            text["num_hidden_layers"],
            text["vocab_size"],
        )
        params = (
            vocab * h * 2
            + layers * (4 * h * h + 3 * h * inter)
            + vision["depth"]
            * (4 * vision["hidden_size"] ** 2 + 3 * vision["hidden_size"] * vision["intermediate_size"])
        )
        role.weights = max(role.weights, params * 2 / GIB)
        tokens = (
            722 * (cfg.policy.height * cfg.policy.width) / 512**2
        )  # two images and the instruction, per pair (gpu_check)
        widest = term.micro_batch_size * tokens * (2 * inter + 4 * h) * 2 / GIB  # MLP gate and up, plus residual copies
        role.activations = max(role.activations, widest)
        role.notes.append(f"{term.name}: {params / 1e9:.2f}B parameters, {term.micro_batch_size} pairs per forward")
    return role, source


# ---- the plan -------------------------------------------------------------------------------------------------------


def make_plan(cfg: RLConfig) -> dict:
    """Placement and memory per GPU of one node (every node has the same layout)."""
    c = cfg.cluster
    if not c.gpus_per_node:
        raise ValueError("cluster.gpus_per_node is 0: a CPU run; the plan is for GPU runs")
    rollout, learner, policy_source = policy_roles(cfg)
    reward, reward_source = reward_role(cfg)
    roles = {"rollout": rollout, "learner": learner, "reward": reward}
    gpus = []
    for g in range(c.gpus_per_node):
        here = [p for p in placement(c) if p.slot == g]
        total = sum(roles[p.role].total for p in here)
        gpus.append({"gpu": g, "actors": [f"{p.role} {p.index}" for p in here], "gib": round(total, 2)})
    busiest = max(gpus, key=lambda g: g["gib"])
    limit = c.gpu_memory_gib * HEADROOM
    return {
        "nodes": c.num_nodes,
        "gpus_per_node": c.gpus_per_node,
        "gpu_memory_gib": c.gpu_memory_gib,
        "limit_gib": round(limit, 2),
        "roles": {
            k: {
                "weights": round(r.weights, 2),
                "trainable": round(r.trainable, 2),
                "activations": round(r.activations, 2),
                "context": CUDA_CONTEXT_GIB,
                "total": round(r.total, 2),
                "notes": r.notes,
            }
            for k, r in roles.items()
        },
        "gpus": gpus,
        "busiest": busiest,
        "fits": busiest["gib"] <= limit,
        "sources": {"policy": policy_source, "reward": reward_source},
    }


def advice(plan: dict, cfg: RLConfig) -> str:
    """What would bring the busiest GPU down, in the order to try."""
    r = plan["roles"]
    tips = []
    if not cfg.policy.trainable.gradient_checkpointing:
        tips.append("policy.trainable.gradient_checkpointing=true (the learner's activations)")
    if r["learner"]["activations"] > 4:
        tips.append(f"a smaller algo.micro_batch_size (now {cfg.algo.micro_batch_size}: activations scale with it)")
    if any("reward" in a for a in plan["busiest"]["actors"]):
        tips.append(
            "cluster.reward_gpu on a GPU with fewer actors, or fewer rollout workers / learners per node so the "
            "reward actor has a GPU of its own"
        )
    if not cfg.policy.trainable.lora_rank and cfg.cluster.zero_stage == 2:
        tips.append("cluster.zero_stage=3 (a full fine-tune's weights sharded over the learners)")
    tips.append("fewer actors per GPU (cluster.num_rollout_workers / num_learners below gpus_per_node)")
    return "; ".join(tips)


def format_plan(plan: dict, cfg: RLConfig) -> str:
    lines = [
        f"plan: {plan['nodes']} node(s) x {plan['gpus_per_node']} GPUs of {plan['gpu_memory_gib']:.0f} GiB (planned "
        f"up to {plan['limit_gib']:.1f} GiB each); sizes from {plan['sources']['policy']} and "
        f"{plan['sources']['reward']}"
    ]
    lines.append(f"{'actor':<10}{'weights':>10}{'trainable':>11}{'activations':>13}{'context':>9}{'total GiB':>11}")
    for name, r in plan["roles"].items():
        lines.append(
            f"{name:<10}{r['weights']:>10.2f}{r['trainable']:>11.2f}{r['activations']:>13.2f}"
            f"{r['context']:>9.2f}{r['total']:>11.2f}  " + "; ".join(r["notes"])
        )
    lines.append("per GPU of each node:")
    for g in plan["gpus"]:
        lines.append(f"  GPU {g['gpu']}: {g['gib']:>6.1f} GiB  {', '.join(g['actors']) or '(idle)'}")
    b = plan["busiest"]
    if plan["fits"]:
        lines.append(f"fits: the busiest GPU ({b['gpu']}) plans {b['gib']:.1f} GiB of {plan['limit_gib']:.1f}")
    else:
        lines.append(
            f"DOES NOT FIT: GPU {b['gpu']} ({', '.join(b['actors'])}) plans {b['gib']:.1f} GiB, over "
            f"{plan['limit_gib']:.1f}. Try: {advice(plan, cfg)}"
        )
    return "\n".join(lines)


# ---- every shipped GPU preset: python launch/plan.py ----------------------------------------------------------------


def markdown(report: dict) -> str:
    """The table docs/performance.md holds: per preset, each role's planned GiB and the busiest GPU."""
    lines = [
        "| preset | layout per node | rollout worker GiB | learner GiB | reward actor GiB | busiest GPU GiB (limit) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, plan in report["presets"].items():
        r = plan["roles"]
        layout = "; ".join(
            f"GPU {g['gpu']}: {', '.join(g['actors'])}"
            for g in plan["gpus"]
            if g["gpu"] in (0, plan["gpus_per_node"] - 1)
        )
        lines.append(
            f"| {name} | {layout} | {r['rollout']['total']:.1f} | {r['learner']['total']:.1f} | "
            f"{r['reward']['total']:.1f} | {plan['busiest']['gib']:.1f} ({plan['limit_gib']:.1f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=(
            "The preflight plan of every shipped GPU preset (launch/configs/*.yaml with GPUs), as a JSON report."
        )
    )
    parser.add_argument("--out", default="docs/bench/plans.json", help="where the JSON report goes")
    args = parser.parse_args(argv)
    presets = {}
    for path in sorted((Path(__file__).resolve().parent / "configs").glob("*.yaml")):
        cfg = load_config(RLConfig, path, [])
        if cfg.cluster.gpus_per_node:
            presets[path.stem] = make_plan(cfg)
            print(format_plan(presets[path.stem], cfg) + "\n")
    report = {"presets": presets}
    print(markdown(report))
    print(f"wrote {write_report(args.out, 'plans', command_line(__file__, argv), vars(args), report)}")
    return report


if __name__ == "__main__":
    main()
