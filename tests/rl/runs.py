"""The tiny RL run every loop test builds on, and the checks that compare two runs.

The fixture learns: its policy is an untrained ShapeEdit palette policy whose 'keep the source pixel' logit is
lowered (launch/benchmarking.py tiny_learning_run), and its sampler draws the palette's last step, so every
sample of a group is a different edit with a different oracle reward, advantages are non-zero and every step
has a gradient. `assert_learned`
checks that before any two runs are compared: a comparison of runs in which nothing is learned passes whatever
is lost (a gradient, a micro-batch, the optimizer state).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.benchmarking import tiny_learning_run
from reward.config import load_config
from reward.model import JRM, JRMArgs
from rl.actors import local_actors
from rl.config import RLConfig
from rl.loop import train
from rl.workers import build_policy


def tiny_data_and_policy(root: Path, size: int = 32, hidden_size: int = 64) -> Path:
    """launch/benchmarking.py's tiny_learning_run under root; returns root."""
    tiny_learning_run(root, size, hidden_size)
    return root


def overrides(root, out, *extra):
    """A 3-step GRPO run: 2 prompts x 4 samples, micro-batches of 4, Gaussian SDE steps and a drawn last step, one
    rollout worker (tests/rl/test_multinode.py runs two on a node)."""
    data = root / "data"
    return [
        f"output_dir={out}",
        f"policy.path={root / 'policy'}",
        "policy.height=32",
        "policy.width=32",
        "policy.sampler.num_steps=3",
        "policy.sampler.noise_level=0.9",
        "policy.sampler.sample_last_step=true",
        "policy.sampler.gaussian_steps=true",
        "policy.trainable.lora_rank=4",
        "policy.eval_denoising_steps=3",
        f"reward.terms=[{{name: oracle, spec: 'oracle:{data}'}}]",
        f"reward.gold=oracle:{data}",
        f"data.train_prompts={data / 'train_prompts.json'}",
        f"data.eval_prompts={data / 'test_heldout_prompts.json'}",
        "data.num_eval=4",
        "algo.prompts_per_step=2",
        "algo.group_size=4",
        "algo.micro_batch_size=4",
        "algo.updates_per_step=1",
        "algo.lr=0.01",
        "num_rl_steps=3",
        "save_every=1",
        "eval_every=3",
        "keep_checkpoints=3",
        "wandb=false",
        "cluster.num_rollout_workers=1",
        *extra,
    ]


def tiny_jrm(root: Path) -> Path:
    """A tiny random-weight JRM at root/jrm (the reward the refresh tests train online); returns root."""
    JRM.build(JRMArgs(tiny_hidden=64, tiny_layers=2), seed=0).save_pretrained(root / "jrm")
    return root


def refreshed_overrides(root, out, *extra):
    """`overrides` scored by root/jrm (tiny_jrm), refreshed after every step with 4 oracle labels, 2 steps each."""
    return overrides(
        root,
        out,
        f"reward.terms=[{{name: jrm, spec: 'jrm:{root / 'jrm'}'}}]",
        "reward.refresh.term=jrm",
        "reward.refresh.every=1",
        "reward.refresh.pairs=4",
        f"reward.refresh.labeller=oracle:{root / 'data'}",
        "reward.refresh.steps=2",
        "reward.refresh.batch_size=4",
        "reward.refresh.lr=0.001",
        "reward.refresh.alpha=0.3",
        "reward.refresh.tie_eps=0.001",  # the fixture's samples differ by a few hundredths of gold
        *extra,
    )


def run_in_process(root, out, *extra):
    """The run of `overrides(root, out, *extra)` in this process (no Ray); returns out."""
    cfg = load_config(RLConfig, None, overrides(root, out, *extra))
    train(cfg, local_actors)
    return out


def metrics(run) -> list[dict]:
    """metrics.jsonl without timings and batching (not reproducible), and without the rows that hold nothing
    else (a checkpoint's timing row: a run stopped by a failure saves once more than an uninterrupted one)."""
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    kept = [{k: v for k, v in r.items() if not k.startswith(("perf/", "reward/node_"))} for r in rows]
    return [r for r in kept if len(r) > 1]


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
    assert moved > 0.1 * cfg.algo.lr, (
        f"{run}: step {first} moved the trainable weights by at most {moved:.2e} beyond weight decay"
    )


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
