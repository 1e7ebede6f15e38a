"""Online reward refresh (rl/refresh.py) in process, on the tiny fixture that learns: which pairs are chosen, that
the reward actor scores with each new version, the label budget, the file queue for people, and that resume=auto
after a stop between refreshes reproduces the uninterrupted run (and fails to when the reward trainer's optimizer
state is not restored)."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from reward.config import load_config
from reward.model import JRM
from rl.actors import local_actors
from rl.config import RLConfig
from rl.loop import train
from rl.refresh import RewardTrainer, select_pairs
from tests.rl.runs import (
    assert_learned,
    assert_same_metrics,
    assert_same_weights,
    metrics,
    overrides,
    refreshed_overrides,
    tiny_data_and_policy,
    tiny_jrm,
    weights,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_jrm(tiny_data_and_policy(tmp_path_factory.mktemp("refresh")))


def run(root, out, *extra):
    train(load_config(RLConfig, None, refreshed_overrides(root, out, *extra)), local_actors)
    return out


def refresh_rows(out) -> list[dict]:
    return [r for r in metrics(out) if "refresh/version" in r]


@pytest.fixture(scope="module")
def whole(root, tmp_path_factory):
    out = run(root, tmp_path_factory.mktemp("whole"))
    assert_learned(out)
    return out


def test_pairs_are_the_top_sample_against_the_rest_of_its_group_taken_round_robin():
    scores = [0.1, 0.9, 0.5, 0.3, 2.0, 1.0, 3.0, 0.0]
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0 ranks 1 > 2 > 3 > 0; group 1 ranks 6 > 4 > 5 > 7: the lowest first, then towards the top
    assert select_pairs(scores, groups, 2, "top", 0) == [(1, 0), (6, 7)]
    assert select_pairs(scores, groups, 4, "top", 0) == [(1, 0), (6, 7), (1, 2), (6, 4)]
    assert select_pairs(scores, groups, 3, "top", 0) == [(1, 0), (6, 7), (1, 2)]
    # rows scored alike are one edit sampled twice: the top's twin and the second copy of a lower edit drop out
    twins = [0.9, 0.9, 0.5, 0.5, 0.1, 2.0, 1.0, 1.0]
    assert select_pairs(twins, groups, 8, "top", 0) == [(0, 2), (5, 4), (5, 6)]
    drawn = select_pairs(scores, groups, 4, "random", 5)
    assert drawn == select_pairs(scores, groups, 4, "random", 5) and len(set(drawn)) == 4
    assert all(groups[i] == groups[j] and i != j for i, j in drawn)


def test_every_refresh_labels_trains_and_the_reward_actor_scores_with_the_new_version(root, whole):
    rows = refresh_rows(whole)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the refresh after the last step labels and measures, but trains nothing that would be used
    assert [r["refresh/version"] for r in rows] == [1, 2, 2] and [r["refresh/trained"] for r in rows] == [1, 1, 0]
    assert all(0 <= r["refresh/accuracy_before"] <= 1 for r in rows)
    assert [r["refresh/labels_asked"] for r in rows] == [4, 8, 12]
    log = [json.loads(line) for line in (whole / "refresh" / "pairs.jsonl").read_text().splitlines()]
    assert len(log) == sum(r["refresh/new_labels"] for r in rows) == rows[-1]["refresh/buffer"]
    assert {r["origin"] for r in log} == {"policy"} and all("Regions:" in r["rationale1"] for r in log)
    # what the checkpoint holds is what the reward actor scored the next step with: a different reward
    state = load_file(whole / "checkpoints" / "step-000003" / "reward_trainer" / "reward.safetensors")
    original = dict(JRM.from_pretrained(root / "jrm").named_parameters())
    assert max((state[k] - original[k]).abs().max().item() for k in state) > 1e-4
    assert json.loads((whole / "checkpoints" / "step-000003" / "state.json").read_text())["reward_version"] == 2


def resume_after_step_1(whole, out):
    shutil.copytree(whole, out)
    for step in (2, 3):
        shutil.rmtree(out / "checkpoints" / f"step-{step:06d}")
    kept = [r for r in (out / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= 1]
    (out / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return out


def test_resume_equals_the_uninterrupted_run_and_a_lost_reward_optimizer_fails_it(root, whole, tmp_path, monkeypatch):
    resumed = run(root, resume_after_step_1(whole, tmp_path / "resumed"))
    assert_same_metrics(resumed, whole)
    assert_same_weights(weights(resumed, 3), weights(whole, 3), atol=0)
    reward = "checkpoints/step-000003/reward_trainer/reward.safetensors"
    assert_same_weights(load_file(resumed / reward), load_file(whole / reward), atol=0)
    assert (resumed / "refresh" / "pairs.jsonl").read_text() == (whole / "refresh" / "pairs.jsonl").read_text()

    load = RewardTrainer.load

    def without_optimizer(self, folder):
        fresh = self.optimizer.state_dict()
        version = load(self, folder)
        self.optimizer.load_state_dict(fresh)
        return version

    monkeypatch.setattr(RewardTrainer, "load", without_optimizer)
    planted = run(root, resume_after_step_1(whole, tmp_path / "planted"))
    with pytest.raises(AssertionError):
        assert_same_weights(load_file(planted / reward), load_file(whole / reward), atol=1e-6)


def test_a_run_stopped_in_the_middle_of_a_refresh_resumes_to_the_uninterrupted_run(root, whole, tmp_path, monkeypatch):
    """The refresh after step 2 fails once it has labelled and remembered its pairs, before training: the run stops
    naming the checkpoint to resume from, and resume=auto (which cuts the buffer back) ends like the whole run."""
    train_reward = RewardTrainer.train

    def failing(self, step):
        if step == 2:
            raise OSError("disk full")
        return train_reward(self, step)

    monkeypatch.setattr(RewardTrainer, "train", failing)
    out = tmp_path / "stopped"
    with pytest.raises(
        RuntimeError, match="refresh after step 2 failed: OSError: disk full; resume=auto .*step-000001"
    ):
        run(root, out)
    assert len((out / "refresh" / "pairs.jsonl").read_text().splitlines()) > refresh_rows(whole)[0]["refresh/buffer"]
    monkeypatch.undo()
    resumed = run(root, out)
    assert_same_metrics(resumed, whole)
    reward = "checkpoints/step-000003/reward_trainer/reward.safetensors"
    assert_same_weights(load_file(resumed / reward), load_file(whole / reward), atol=0)
    assert_same_weights(weights(resumed, 3), weights(whole, 3), atol=0)


def test_the_budget_caps_the_labels_and_steps_0_measures_without_training(root, tmp_path):
    out = run(root, tmp_path / "capped", "reward.refresh.budget=6", "reward.refresh.steps=0")
    rows = refresh_rows(out)
    assert [r["refresh/labels_asked"] for r in rows] == [4, 6, 6]
    assert [r["refresh/version"] for r in rows] == [0, 0, 0] and rows[2]["refresh/new_labels"] == 0
    assert 0 <= rows[0]["refresh/accuracy_before"] <= 1
    state = load_file(out / "checkpoints" / "step-000003" / "reward_trainer" / "reward.safetensors")
    original = dict(JRM.from_pretrained(root / "jrm").named_parameters())
    assert all(torch.equal(state[k], original[k]) for k in state)


def test_people_label_through_a_file_queue_without_blocking_the_run(root, tmp_path, capsys):
    queue = tmp_path / "queue"
    out = tmp_path / "run"
    args = [f"reward.refresh.labeller=queue:{queue}", "num_rl_steps=1"]
    run(root, out, *args)
    pending = sorted((queue / "pending").glob("*.json"))
    assert len(pending) == 4 and refresh_rows(out)[0]["refresh/new_labels"] == 0  # nobody answered yet: no wait
    entry = json.loads(pending[0].read_text())
    assert Image.open(entry["a"]).size == (32, 32) and entry["instruction"]
    (queue / "labels" / pending[0].name).write_text(json.dumps({"preferred": "b", "critique_b": "better"}))
    (queue / "labels" / pending[1].name).write_text(json.dumps({"preferred": "maybe"}))
    (queue / "labels" / pending[2].name).write_text(json.dumps({"preferred": "tie"}))
    (queue / "labels" / ("another-run" + pending[3].name[8:])).write_text(json.dumps({"preferred": "a"}))
    run(root, out, *args[:1], "num_rl_steps=3")  # resumed: the labels are collected after step 2, and train
    rows = {r["step"]: r for r in refresh_rows(out)}
    assert rows[2]["refresh/new_labels"] == 2 and rows[2]["refresh/new_ties"] == 1 and rows[2]["refresh/version"] == 1
    assert rows[3]["refresh/new_labels"] == 0  # a label is collected once; another run's label never
    assert "preferred must be a, b or tie" in capsys.readouterr().out
    labelled = [json.loads(line) for line in (out / "refresh" / "pairs.jsonl").read_text().splitlines()]
    assert labelled[0]["origin"] == "human" and labelled[0]["path1"] == entry["b"]
    assert labelled[0]["rationale1"] == "better" and labelled[1]["tie_case"]


def test_bad_refresh_settings_are_refused_before_any_actor_starts(root, tmp_path):
    data = root / "data"
    bad = {
        "reward.refresh.term=gold": "must name a required jrm: term",
        "reward.refresh.labeller=people": "is not a labeller",
        "reward.refresh.select=best": "select must be top or random",
        "reward.refresh.budget=0": "budget and batch_size >= 1",
    }
    for setting, message in bad.items():
        with pytest.raises(ValueError, match=message):
            load_config(RLConfig, None, refreshed_overrides(root, tmp_path / "x", setting))
    oracle_term = f"reward.terms=[{{name: jrm, spec: 'oracle:{data}'}}]"
    with pytest.raises(ValueError, match="must name a required jrm: term"):
        load_config(RLConfig, None, refreshed_overrides(root, tmp_path / "x") + [oracle_term])
    for setting, error in {
        "reward.refresh.labeller=oracle:/nowhere": FileNotFoundError,
        "reward.refresh.original_data=/nowhere.json": FileNotFoundError,
    }.items():
        with pytest.raises(error, match="nowhere"):
            run(root, tmp_path / "never", setting)
    assert not (tmp_path / "never").exists()
    cfg = load_config(RLConfig, None, refreshed_overrides(root, tmp_path / "x", "reward.refresh.alpha=null"))
    with pytest.raises(ValueError, match="set reward.refresh.alpha"):
        RewardTrainer(cfg)


def test_a_checkpoint_without_reward_trainer_state_is_refused(root, tmp_path):
    plain = tmp_path / "plain"
    train(load_config(RLConfig, None, overrides(root, plain, "num_rl_steps=1")), local_actors)
    with pytest.raises(ValueError, match="holds no reward trainer state"):
        run(root, plain, "num_rl_steps=2")


def test_a_judge_model_labels_by_its_verdicts_and_its_critiques_become_the_targets(root, tmp_path):
    from reward.data import parse_pair
    from rl.refresh import JudgeLabeller, PairToLabel

    labeller = JudgeLabeller(str(root / "jrm"), "cpu", tie_eps=0.02)
    answers = iter(
        [
            ["The square moved. overall 3/8.", "The square moved left. overall 7/8."],
            ["Nothing changed. overall 2/8.", "Nothing changed either. overall 2/8."],
            ["No verdict here.", "overall 5/8."],
        ]
    )
    labeller.judge.critique = lambda sources, instructions, edited: next(answers)
    image = Image.new("RGB", (32, 32), "white")
    pairs = [PairToLabel(image, "move the square left", image, image, (0.1, 0.2 + k)) for k in range(3)]
    rows, asked = labeller.label(pairs, tmp_path, "step-000001", set())
    assert asked == 3 and len(rows) == 2  # a pair whose verdict is missing is asked, but not labelled
    first, tie = rows
    assert first["rationale1"].endswith("7/8.") and first["proxy1"] == 0.2 and not first["tie_case"]
    assert first["label1_score"] == 7 / 8 and first["origin"] == "judge" and tie["tie_case"]
    pair = parse_pair(first, first["id"], tmp_path)
    assert Image.open(pair.chosen).size == (32, 32) and pair.chosen_critique.startswith("The square moved left")
