"""The tiny RL run every loop test builds on, and the checks that compare two runs.

The fixture learns: its policy is an untrained ShapeEdit palette policy whose 'keep the source pixel' logit is
lowered (KEEP_LOGIT), and its sampler draws the palette's last step, so every sample of a group is a different
edit with a different oracle reward, advantages are non-zero and every step has a gradient. `assert_learned`
checks that before any two runs are compared: a comparison of runs in which nothing is learned passes whatever
is lost (a gradient, a micro-batch, the optimizer state).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from policies.shapeedit import ShapeEditPolicy, ShapeEditPolicyConfig
from reward.config import load_config
from reward.shapeedit import GenerateConfig, generate
from rl.actors import in_process_actors
from rl.config import RLConfig
from rl.loop import train
from rl.workers import build_policy

# The built policy keeps each source pixel with probability ~0.98 (log(50 K)); at 3.0 an untrained one paints
# a few pixels in ten with random palette colours, so the drawn edits of one prompt differ.
KEEP_LOGIT = 3.0


def tiny_data_and_policy(root: Path) -> Path:
    """ShapeEdit prompts at 32x32 (root/data) and a random tiny policy for them (root/policy); returns root."""
    generate(GenerateConfig(out=str(root / "data"), pairs=300, size=32, seed=0), progress=False)
    rows = json.loads((root / "data" / "train_prompts.json").read_text())
    cfg = ShapeEditPolicyConfig(
        image_size=32, patch_size=8, hidden_size=64, num_layers=2, text_hidden_size=32, text_layers=1, max_instruction_tokens=24
    )
    policy = ShapeEditPolicy.build(cfg, [r["instruction"] for r in rows])
    with torch.no_grad():
        policy.transformer.pixel_head[-1].bias[0] = KEEP_LOGIT
    policy.save_pretrained(root / "policy")
    return root


def overrides(root, out, *extra):
    """A 3-step GRPO run: 2 prompts x 4 samples, micro-batches of 4, Gaussian SDE steps and a drawn last step."""
    data = root / "data"
    return [
        f"output_dir={out}", f"policy.path={root / 'policy'}", "policy.height=32", "policy.width=32", "policy.sampler.num_steps=3",
        "policy.sampler.noise_level=0.9", "policy.sampler.sample_last_step=true", "policy.sampler.gaussian_steps=true",
        "policy.lora_rank=4", "policy.eval_steps=3",
        f"reward.terms=[{{name: oracle, spec: 'oracle:{data}'}}]", f"reward.gold=oracle:{data}",
        f"data.train_prompts={data / 'train_prompts.json'}", f"data.eval_prompts={data / 'test_heldout_prompts.json'}", "data.num_eval=4",
        "algo.prompts_per_step=2", "algo.group_size=4", "algo.micro_batch_size=4", "algo.updates_per_step=1", "algo.lr=0.01",
        "num_steps=3", "save_every=1", "eval_every=3", "keep_checkpoints=3", "wandb=false", "cluster.num_rollout_workers=2", *extra,
    ]


def run_in_process(root, out, *extra):
    """The run of `overrides(root, out, *extra)` with one rollout worker, in this process (no Ray); returns out."""
    cfg = load_config(RLConfig, None, overrides(root, out, "cluster.num_rollout_workers=1", *extra))
    with in_process_actors(cfg) as actors:
        train(cfg, actors)
    return out


def metrics(run) -> list[dict]:
    """metrics.jsonl without timings and batching (not reproducible)."""
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "reward/node_"))} for r in rows]


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run) / "checkpoints" / f"step-{step:06d}" / "policy.safetensors"))


def assert_learned(run) -> None:
    """Every step of the run had reward spread in some group and a non-zero gradient, and its first checkpoint's
    weights moved by more than AdamW's weight decay alone would have moved them."""
    rows = [r for r in metrics(run) if "train/grad_norm" in r]
    assert rows, f"{run}: no training step logged"
    for r in rows:
        assert r["train/grad_norm"] > 0, f"{run}: step {r['step']} had no gradient: {r}"
        assert r["rollout/zero_std_ratio"] < 1, f"{run}: step {r['step']} had no group with reward spread: {r}"
    cfg = load_config(RLConfig, Path(run) / "config.yaml", [])
    first = min(r["step"] for r in rows)
    fresh = build_policy(cfg.policy, seed=cfg.seed).trainable_state()
    decay = (1 - cfg.algo.lr * cfg.algo.weight_decay) ** first
    got = weights(run, first)
    moved = max((got[k] - fresh[k] * decay).abs().max().item() for k in fresh)
    assert moved > 0.1 * cfg.algo.lr, f"{run}: step {first} moved the trainable weights by at most {moved:.2e} beyond weight decay"


def assert_same_metrics(got_dir, want_dir, rel=1e-6, abs=1e-9) -> None:
    got, want = metrics(got_dir), metrics(want_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=rel, abs=abs), (g["step"], k)


def assert_same_weights(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
