"""Runs in process (rl/actors.py `local_actors`, seconds a run) on the tiny fixture that learns
(tests/rl/runs.py): the run comparisons of the loop tests catch what they guard against, the NaN guard holds on
one rank under ZeRO-2 and ZeRO-3, NaN rewards stop a run, PPO and the drawn step's KL train, NFT resumes exactly,
the decision-code mean trains at its own algo.decision_lr.

Each comparison passes on a faithful run and fails on a run with one fault planted:
- a micro-batch whose gradient is dropped (what a ZeRO-3 accumulation bug, a lost shard or a skipped
  micro-step would do) fails the weight comparison at the tolerance the 2-rank and ZeRO-3 tests use;
- a resume that restores the weights but not the optimizer state fails the resume comparison.
The Ray tests (tests/rl/test_loop.py) plant the 2-rank faults in real 2-rank runs: one rank's shard skipped,
a NaN loss on one rank.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.benchmarking import save_tiny_learning_policy
from reward.config import load_config
from rl.actors import LocalRewardClient
from rl.algorithms import MicroTargets
from rl.config import RLConfig
from rl.loop import Run
from rl.prompts import load_prompts
from rl.rewards import RewardWorker
from rl.workers import RolloutWorker, build_policy, per_prompt_means
from tests.rl.runs import (
    assert_learned,
    assert_same_metrics,
    assert_same_weights,
    metrics,
    overrides,
    run_in_process,
    tiny_data_and_policy,
    weights,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_data_and_policy(tmp_path_factory.mktemp("bite"))


@pytest.fixture(scope="module")
def whole(root, tmp_path_factory):
    """3 uninterrupted steps in process: the run every comparison below is made against."""
    out = run_in_process(root, tmp_path_factory.mktemp("whole"))
    assert_learned(out)
    return out


def drop_gradient_of(indices):
    """Run.update with the targets of the micro-batches at `indices` zeroed: with GRPO and kl_beta 0 their loss,
    and so their gradient, is 0, while every other micro-batch trains as before."""
    update = Run.update

    def dropping(self, step, micro, targets):
        targets = [MicroTargets(t.values * 0, t.seed) if i in indices else t for i, t in enumerate(targets)]
        return update(self, step, micro, targets)

    return dropping


def test_a_dropped_micro_batch_gradient_fails_the_weight_comparison(root, whole, tmp_path, monkeypatch):
    same = run_in_process(root, tmp_path / "same", "num_rl_steps=1")
    assert_same_weights(weights(same, 1), weights(whole, 1), atol=0)  # in process, the same seed: bitwise
    monkeypatch.setattr(Run, "update", drop_gradient_of({0}))
    planted = run_in_process(root, tmp_path / "planted", "num_rl_steps=1")
    assert_learned(planted)  # the other micro-batch still trains: the fault is only the lost gradient
    with pytest.raises(AssertionError):
        assert_same_weights(weights(planted, 1), weights(whole, 1), atol=1e-5)  # the ZeRO-3 test's tolerance


def resume_after_step_1(whole, out):
    """The run as it stood after step 1 (its step-1 checkpoint, nothing later), continued with resume=auto."""
    shutil.copytree(whole, out)
    for step in (2, 3):
        shutil.rmtree(out / "checkpoints" / f"step-{step:06d}")


def test_resume_equals_the_uninterrupted_run_and_a_lost_optimizer_state_fails_it(root, whole, tmp_path, monkeypatch):
    resumed = tmp_path / "resumed"
    resume_after_step_1(whole, resumed)
    run_in_process(root, resumed)
    assert_learned(resumed)
    assert_same_metrics(resumed, whole)
    assert_same_weights(weights(resumed, 3), weights(whole, 3), atol=0)

    from deepspeed.runtime.engine import DeepSpeedEngine

    load = DeepSpeedEngine.load_checkpoint  # the plant: the weights come back, AdamW's moments start again from zero
    monkeypatch.setattr(
        DeepSpeedEngine,
        "load_checkpoint",
        lambda self, *a, **k: load(self, *a, **{**k, "load_optimizer_states": False}),
    )
    planted = tmp_path / "planted"
    resume_after_step_1(whole, planted)
    run_in_process(root, planted)
    assert_learned(planted)
    assert [r["step"] for r in metrics(planted)] == [r["step"] for r in metrics(whole)]
    with pytest.raises(AssertionError):
        assert_same_weights(weights(planted, 3), weights(whole, 3), atol=1e-6)
    with pytest.raises(AssertionError):
        assert_same_metrics(planted, whole)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_nan_loss_skips_the_update_on_one_rank(root, tmp_path, monkeypatch, stage):
    """Step 1's targets are all NaN: the update is skipped (weights as built), step 2 trains as usual."""
    update = Run.update

    def poisoned(self, step, micro, targets):
        return update(
            self,
            step,
            micro,
            [MicroTargets(t.values * float("nan"), t.seed) for t in targets] if step == 0 else targets,
        )

    monkeypatch.setattr(Run, "update", poisoned)
    out = run_in_process(root, tmp_path / "run", f"cluster.zero_stage={stage}", "num_rl_steps=2")
    first, second = [r for r in metrics(out) if "train/skipped_updates" in r]
    assert first["train/skipped_updates"] == 1 and first["train/nonfinite_losses"] > 0 and "train/loss" not in first
    assert second["train/skipped_updates"] == 0 and second["train/grad_norm"] > 0
    fresh = build_policy(load_config(RLConfig, out / "config.yaml", []).policy, seed=0).trainable_state()
    assert_same_weights(weights(out, 1), fresh, atol=0)
    assert any(not torch.equal(weights(out, 2)[k], fresh[k]) for k in fresh)


def test_grpo_keeps_the_drawn_last_step_near_its_reference(root, tmp_path):
    """The fixture's sampler draws the palette's last step beside the Gaussian steps: with kl_beta the learner
    adds the categorical KL to the reference, 0 while the weights are the reference's (step 1) and > 0 after."""
    out = run_in_process(root, tmp_path / "categorical", "num_rl_steps=2", "algo.kl_beta=0.01")
    assert_learned(out)
    kl = [r["train/kl"] for r in metrics(out) if "train/kl" in r]
    assert kl[0] == 0.0 and kl[1] > 0, kl


def test_ppo_learns_a_value_model(root, tmp_path):
    out = run_in_process(root, tmp_path / "ppo", "algo.name=ppo", "num_rl_steps=2", "algo.kl_beta=0.01")
    assert_learned(out)
    rows = [r for r in metrics(out) if "train/value_loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["train/value_loss"]) and r["train/value_loss"] > 0 for r in rows)


def test_nan_rewards_skip_steps_then_stop_the_run(root, tmp_path):
    """A reward model with a NaN head (a real corrupted checkpoint): every step is skipped and logged, and after
    max_bad_steps in a row the run stops with a message that names the cause."""
    from reward.model import JRM, JRMArgs

    broken = JRM.build(JRMArgs(tiny_hidden=64, tiny_layers=2), seed=0)
    with torch.no_grad():
        broken.head.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan_jrm")
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="2 consecutive steps had NaN/Inf rewards"):
        run_in_process(
            root, run, f"reward.terms=[{{name: broken, spec: 'jrm:{tmp_path / 'nan_jrm'}'}}]", "max_bad_steps=2"
        )
    skipped = [r for r in metrics(run) if r.get("train/skipped_nonfinite_reward") == 1]
    assert [r["step"] for r in skipped] == [1, 2]
    assert not any("train/loss" in r for r in metrics(run))  # no update ever used them


def test_nft_resumes_exactly_and_writes_per_prompt_scores(root, tmp_path):
    """DiffusionNFT: it learns, its first minibatch trains at the sampling weights (drift 0), each evaluation
    writes its per-prompt scores, and the run as it stood after step 1 (its step-1 checkpoint, no step 2),
    resumed with resume=auto, ends with the uninterrupted run's weights and metrics."""
    nft = ("algo.name=nft", "algo.nft_terms=2", "algo.kl_beta=0.01", "eval_every=1", "num_rl_steps=2")
    a = run_in_process(root, tmp_path / "a", *nft)
    assert_learned(a)
    rows = [r for r in metrics(a) if "train/drift" in r]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) and r["train/kl"] >= 0 for r in rows)
    assert rows[0]["train/drift"] == 0.0 and rows[1]["train/kl"] > 0
    scores = json.loads((a / "eval" / "scores-step-000002.json").read_text())
    assert len(scores["instructions"]) == len(scores["proxy"]) == len(scores["gold"]) >= 2

    c = tmp_path / "c"
    shutil.copytree(a, c)
    shutil.rmtree(c / "checkpoints" / "step-000002")
    run_in_process(root, c, *nft)
    assert_learned(c)
    assert_same_weights(weights(c, 2), weights(a, 2), atol=0)
    assert_same_metrics(c, a)


def test_what_the_driver_receives_does_not_grow_with_images_or_weights(root, tmp_path_factory):
    """Evaluations are judged where their edits are and checkpoints written by the learners: the driver's bytes
    for an evaluation and for a checkpoint are the same for 4x the pixels and twice the trained weights."""
    big_root = tiny_data_and_policy(tmp_path_factory.mktemp("big"), size=64, hidden_size=128)
    small = run_in_process(root, tmp_path_factory.mktemp("small") / "run", "num_rl_steps=1", "eval_every=1")
    big = run_in_process(
        big_root,
        tmp_path_factory.mktemp("large") / "run",
        "num_rl_steps=1",
        "eval_every=1",
        "policy.height=64",
        "policy.width=64",
    )
    grew = (big / "checkpoints" / "step-000001" / "policy.safetensors").stat().st_size / (
        small / "checkpoints" / "step-000001" / "policy.safetensors"
    ).stat().st_size
    assert grew > 1.9
    for key in ("perf/eval_driver_bytes", "perf/checkpoint_driver_bytes"):
        got = [r[key] for r in read_rows(big) if key in r]
        want = [r[key] for r in read_rows(small) if key in r]
        assert len(got) == len(want) >= 1 and all(g == pytest.approx(w, rel=0.1) for g, w in zip(got, want)), (
            key,
            got,
            want,
        )
    assert max(r["perf/eval_driver_bytes"] for r in read_rows(big) if "perf/eval_driver_bytes" in r) < 2e6


def read_rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Payload:
    """A pickle that runs code when unpickled without weights_only (it would create the file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_unpickles_weights_only_and_refuses_code(root, whole, tmp_path):
    """DeepSpeed's optimizer files are pickles; resume reads them with weights_only=True (every resume
    goes through the same path), so a planted payload is refused and never runs."""
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    marker = tmp_path / "code-ran"
    optim = next((run / "checkpoints" / "step-000003" / "deepspeed" / "state").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload(marker)}, optim)
    with pytest.raises(Exception, match="Weights only load failed"):
        run_in_process(root, run, "num_rl_steps=4")
    assert not marker.exists()


def test_an_evaluation_with_several_samples_per_prompt_scores_each_prompt_by_their_mean(root, tmp_path):
    """policy.eval_samples=3: each prompt's proxy and gold are the means of its 3 samples, drawn as consecutive
    rows from the evaluation's seed (so the same at every evaluation); the grid shows one sample per prompt."""
    cfg = load_config(RLConfig, None, overrides(root, tmp_path, "policy.eval_samples=3"))
    single = load_config(RLConfig, None, overrides(root, tmp_path, "policy.eval_samples=1"))
    prompts, _ = load_prompts(cfg.data.eval_prompts, 32, 32, 3)
    n = len(prompts)
    assert n >= 2
    reward = RewardWorker(cfg.reward.terms, "cpu", 64, 0.0, gold=cfg.reward.gold)
    three = RolloutWorker(cfg.policy, cfg.seed, LocalRewardClient(reward)).evaluate(prompts, 7, 4, 8)
    repeated = [p for p in prompts for _ in range(3)]
    one = RolloutWorker(single.policy, cfg.seed, LocalRewardClient(reward)).evaluate(repeated, 7, 4, 8)
    assert three.gold == pytest.approx(np.reshape(one.gold, (n, 3)).mean(axis=1).tolist(), abs=1e-12)
    oracle = np.reshape(one.scores.terms["oracle"], (n, 3)).mean(axis=1)
    assert three.scores.terms["oracle"] == pytest.approx(oracle.tolist(), abs=1e-12)
    assert three.grid.shape[0] == n and torch.equal(three.grid[1], one.grid[3])
    assert per_prompt_means([0.2, 0.4, 0.9, 1.0, None, 0.5], 3) == [pytest.approx(0.5), None]


def test_no_secret_reaches_the_run_directory(root, tmp_path, monkeypatch):
    """Tokens in the environment (wandb, Hugging Face, Ray) appear in no file of a run, wandb's offline files
    included; wandb stays offline. The run's files are written by the driver and the learners, which run here
    as they do under Ray."""
    secrets = {
        "WANDB_API_KEY": "wandb-secret-4f1c9e",
        "HF_TOKEN": "hf_secret_8d2b7a",
        "RAY_AUTH_TOKEN": "ray-secret-77a0c3",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be our default, not the test's
    run = tmp_path / "run"
    run_in_process(root, run, "num_rl_steps=1", "wandb=true")
    files = [f for f in run.rglob("*") if f.is_file()]
    assert any("wandb" in f.parts for f in files) and any(f.name == "metrics.jsonl" for f in files)
    assert list(run.glob("wandb/offline-run-*")) and not list(run.glob("wandb/run-*")), "wandb did not stay offline"
    # every evaluation's grid is in the run as an image, its caption naming each row's instruction and scores
    assert len(list(run.glob("wandb/offline-run-*/files/media/images/eval/grid_*.png"))) == len(
        list(run.glob("eval/*.png"))
    )
    (log,) = run.glob("wandb/offline-run-*/*.wandb")
    assert b"1. " in log.read_bytes() and b", gold " in log.read_bytes()
    for f in files:
        data = f.read_bytes()
        for key, value in secrets.items():
            assert value.encode() not in data, f"{key}'s value is in {f}"


@pytest.mark.parametrize("stage", [2, 3])
def test_the_decision_code_mean_trains_at_decision_lr(root, tmp_path, stage):
    """algo.decision_lr is the AdamW lr of the policy's decision weights (the ShapeEdit code mean), a group of
    their own, under ZeRO-2 and ZeRO-3: Adam's first update moves every weight that has a gradient by about its
    group's lr, so after one step the code mean's bias moved by decision_lr and no adapter weight by more than
    lr."""
    save_tiny_learning_policy(tmp_path / "policy", root / "data", decision_code=True)
    extra = [f"policy.path={tmp_path / 'policy'}", "num_rl_steps=1", f"cluster.zero_stage={stage}"]
    out = run_in_process(root, tmp_path / "run", *extra, "algo.decision_lr=0.5")
    assert_learned(out)
    got = weights(out, 1)
    assert 0.45 < got["code_mean.bias"].abs().item() <= 0.5
    cfg = load_config(RLConfig, out / "config.yaml", [])
    adapters = {k: v for k, v in build_policy(cfg.policy, seed=cfg.seed).trainable_state().items() if "lora_" in k}
    assert max((got[k] - v).abs().max().item() for k, v in adapters.items()) <= 0.0101
