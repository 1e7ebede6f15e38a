"""reward/compare.py on tiny saved JRMs: identical seeds agree exactly, drift is measured against final/,
accuracies equal the ones computed by hand, and runs that differ in more than the seed are refused."""

import json
import math

import numpy as np
import pytest

from reward.compare import (
    Probe,
    compare_reward_runs,
    load_reward_run,
    probe_accuracy,
    same_order,
    score_probe,
    spearman,
)
from reward.config import save_config
from reward.data import DataError
from reward.model import JRM, JRMArgs
from reward.shapeedit import GenerateConfig, generate
from reward.train import TrainConfig

SMALL = dict(tiny_hidden=64, tiny_layers=2)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    data = tmp_path_factory.mktemp("probe")
    generate(GenerateConfig(out=str(data), pairs=40, seed=3), progress=False)
    return Probe.load(data / "train.json", num_pairs=12)


def write_reward_run(root, name, seeds: dict[int, int], alpha=1 / 3, run_seed=0, accuracy=0.7):
    """A reward/train.py run folder whose checkpoint at each step holds a tiny JRM built from seeds[step]."""
    run = root / name
    run.mkdir()
    cfg = TrainConfig(output_dir=str(run), seed=run_seed)
    cfg.model = JRMArgs(**SMALL)
    cfg.loss.alpha = alpha
    save_config(cfg, run / "config.yaml")
    final = max(seeds)
    for step, seed in seeds.items():
        JRM.build(JRMArgs(**SMALL), seed=seed).save_pretrained(
            run / ("final" if step == final else f"checkpoint-{step}")
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in sorted(seeds)))
    (run / "eval.json").write_text(json.dumps({"eval_pairwise_accuracy": accuracy, "eval/accuracy": 0.0}))
    return run


def test_spearman_closed_forms():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(
        0.9486833
    )  # ties get average ranks (ordinal ranks: 0.8)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, float("nan"), 4], [1, 2, 3, 4]))


def test_identical_seeds_agree_exactly_and_drift_is_measured_against_final(tmp_path, probe):
    a = load_reward_run(write_reward_run(tmp_path, "a", {100: 7, 200: 0}, run_seed=0, accuracy=0.70))
    b = load_reward_run(write_reward_run(tmp_path, "b", {100: 8, 200: 0}, run_seed=1, accuracy=0.74))
    assert [s for s, _ in a.checkpoints] == [100, 200]
    cmp = compare_reward_runs([a, b], probe, batch_size=8)
    assert cmp.agreement[0, 1] == pytest.approx(1.0)
    assert cmp.same_order[0, 1] == 1.0
    (group,) = cmp.groups
    assert (group.label, group.runs) == ("alpha=0.333", 2)
    assert group.probe_accuracy_std == 0.0  # same final weights: no spread on the probe
    assert group.agreement_within == pytest.approx(1.0)
    assert group.accuracy_mean == pytest.approx(0.72)  # eval_pairwise_accuracy, not the per-batch eval/accuracy
    assert group.accuracy_std == pytest.approx(np.std([0.70, 0.74], ddof=1))
    final_drift, early_drift = cmp.drift[0][-1], cmp.drift[0][0]
    assert (final_drift.step, final_drift.spearman_final, final_drift.same_order_final) == (200, 1.0, 1.0)
    assert early_drift.step == 100 and early_drift.spearman_final < 0.99  # a different model scores differently
    final_scores = score_probe(JRM.from_pretrained(a.path / "final"), probe, batch_size=4)
    assert cmp.probe_accuracy[0] == probe_accuracy(final_scores, probe.pairs)
    assert cmp.probe_accuracy[0] == float(np.mean(final_scores[: probe.pairs] > final_scores[probe.pairs :]))
    assert same_order(final_scores, -final_scores, probe.pairs) == 0.0


def test_runs_that_differ_in_more_than_the_seed_are_refused(tmp_path, probe):
    a = load_reward_run(write_reward_run(tmp_path, "a", {100: 0}))
    alpha0 = write_reward_run(tmp_path, "b", {100: 1}, alpha=0.0, run_seed=1)
    assert load_reward_run(alpha0).label == "alpha=0"
    with pytest.raises(DataError, match=r"loss.alpha.*LABEL=RUN_DIR"):
        compare_reward_runs([a, load_reward_run(alpha0, label="alpha=0.333")], probe)
    with pytest.raises(DataError, match="config.yaml is missing"):
        load_reward_run(tmp_path / "nowhere")
    unfinished = write_reward_run(tmp_path, "c", {100: 0})
    (unfinished / "final").rename(unfinished / "checkpoint-100")
    with pytest.raises(DataError, match="final is missing: not a finished run"):
        load_reward_run(unfinished)
    no_accuracy = write_reward_run(tmp_path, "d", {100: 0})
    (no_accuracy / "eval.json").write_text(json.dumps({"eval/accuracy": 0.5}))
    with pytest.raises(DataError, match="eval.json has no eval_pairwise_accuracy"):
        load_reward_run(no_accuracy)
    with pytest.raises(DataError, match="at least 3"):
        generate(GenerateConfig(out=str(tmp_path / "tiny"), pairs=4, seed=0), progress=False)
        Probe.load(tmp_path / "tiny" / "val.json", num_pairs=2)
