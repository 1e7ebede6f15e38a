"""launch/policy_pairs.py on a tiny policy and a tiny ShapeEdit set: the policy's pairs are EditReward-Data that
reward/train.py reads, bad requests are refused before sampling, and on fresh samples the oracle ranks its own
judgements perfectly."""

import dataclasses
import json

import pytest

from launch.policy_pairs import main, on_policy, write_policy_pairs
from policies.sampling import SamplerConfig
from policies.shapeedit import ShapeEditPolicy
from reward.data import load_pairs
from reward.shapeedit import GenerateConfig, generate
from tests.policies.test_shapeedit_policy import TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    data = root / "data"
    generate(GenerateConfig(out=str(data), pairs=160, seed=0, val_fraction=0.2), progress=False)
    instructions = [
        r["instruction"] for split in ("train", "val") for r in json.loads((data / f"{split}_prompts.json").read_text())
    ]
    # the data's size: the oracle knows its renders
    policy = ShapeEditPolicy.build(dataclasses.replace(TINY, image_size=64), instructions, seed=0)
    policy.save_pretrained(root / "policy")
    return root / "policy", data


# As built, the classifier keeps every source pixel at p ~ 0.98, so RL's Gaussian steps give groups of one edit; the
# drawn last step spreads them.
DRAWN = SamplerConfig(num_steps=8, noise_level=0.7, sample_last_step=True, gaussian_steps=False)


def test_the_policys_pairs_are_training_data(world):
    policy, data = world
    counts = write_policy_pairs(policy, data, "train", prompts=3, samples=3, seed=0, sampler=DRAWN, overwrite=True)
    rows = json.loads((data / "policy_train.json").read_text())
    assert counts["prompts"] == 3 and 0 < counts["pairs"] == len(rows) <= 9
    assert all(r["origin"] == "policy" and r["split"] == "train" for r in rows)
    assert all(r["oracle1"]["overall"] >= r["oracle2"]["overall"] for r in rows)
    pairs, skipped = load_pairs(data / "policy_train.json", progress=False)
    assert len(pairs) == len(rows) and not skipped
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        write_policy_pairs(policy, data, "train", prompts=3, samples=3, seed=0, sampler=DRAWN)
    gaps = [r["oracle1"]["overall"] - r["oracle2"]["overall"] for r in rows]
    write_policy_pairs(policy, data, "train", prompts=3, samples=3, seed=0, sampler=DRAWN, overwrite=True, min_gap=0.1)
    kept = json.loads((data / "policy_train.json").read_text())  # the same samples, the near-ties left out
    assert len(kept) == sum(g >= 0.1 for g in gaps) and all(
        r["oracle1"]["overall"] - r["oracle2"]["overall"] >= 0.1 for r in kept
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--split", "everything"], "--split must be one of"),
        (["--samples", "1"], "--samples >= 2"),
        (["--policy", "nowhere"], "policy.json not found"),
    ],
)
def test_bad_requests_are_refused_before_sampling(world, capsys, argv, message):
    policy, data = world
    args = ["--policy", str(policy), "--data", str(data), "--prompts", "2", *argv]
    if "--policy" in argv:
        args = args[2:]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_on_policy_ranking_of_fresh_samples(world):
    policy, data = world
    rewards = {"oracle": f"oracle:{data}", "keep": "preservation"}
    result = on_policy(policy, data, rewards, ("val",), 4, 4, seed=1, sampler=DRAWN)["val"]
    assert result["prompts"] == 4 and result["group_size"] == 4 and set(result["models"]) == {"oracle", "keep"}
    oracle = result["models"]["oracle"]
    assert result["identical_groups"] == 0.0 and oracle["groups"] >= 1  # drawn edits differ
    # the oracle orders its own judgements: every pair right, its top-1 the group's best
    assert oracle["spearman"] == pytest.approx(1.0) and oracle["top1_gain"] == result["oracle_top1_gain"] > 0
    assert oracle["pair_accuracy"] in (None, 1.0)
    with pytest.raises(ValueError, match="--samples >= 2"):
        on_policy(policy, data, rewards, ("val",), 4, 1, seed=1)


def test_the_measurement_command_writes_each_splits_figures(world, tmp_path, capsys):
    policy, data = world
    out = tmp_path / "measured.json"
    base = ["--policy", str(policy), "--data", str(data), "--prompts", "2", "--samples", "2", "--measure", str(out)]
    assert main(base) == 2 and "--measure needs --reward NAME=SPEC" in capsys.readouterr().err
    assert main([*base, "--reward", "bad=nothing:here"]) == 2 and "not a reward spec" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--reward", f"oracle=oracle:{data}"]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python launch/policy_pairs.py --policy")
    for split in ("val", "test_heldout"):
        assert result[split]["split"] == split and 1 <= result[split]["prompts"] <= 2  # the split may hold fewer
        assert set(result[split]["models"]["oracle"]) == {"spearman", "groups", "pair_accuracy", "pairs", "top1_gain"}
