"""launch/demo.py's pieces: the ranking-agreement stage on a tiny policy and a tiny ShapeEdit set (the oracle ranks
its own judgements perfectly; the drawn last step gives every group spread where the preset's Gaussian steps give a
policy that keeps its source none), and the oracle control's summary."""

import dataclasses
import json

import pytest

from launch.demo import oracle_control, ranking_agreement
from policies.sampling import SamplerConfig
from policies.shapeedit import ShapeEditPolicy
from reward.shapeedit import GenerateConfig, generate
from tests.policies.test_shapeedit_policy import TINY


def test_the_oracle_agrees_with_itself_and_draws_spread_the_groups(tmp_path):
    data = tmp_path / "data"
    generate(GenerateConfig(out=str(data), pairs=160, seed=0, val_fraction=0.2), progress=False)
    instructions = [row["instruction"] for row in json.loads((data / "val_prompts.json").read_text())]
    policy = ShapeEditPolicy.build(
        dataclasses.replace(TINY, image_size=64), instructions, seed=0
    )  # the data's size: the oracle knows its renders
    # as built, the classifier keeps every source pixel at p ~ 0.98: its most probable category is always
    # 'keep', so the Gaussian sampler's groups are identical edits, while the drawn last step spreads them
    policy.save_pretrained(tmp_path / "policy")
    rewards = {"oracle": f"oracle:{data}", "preservation": "preservation"}
    drawn = SamplerConfig(num_steps=8, noise_level=0.7, sample_last_step=True, gaussian_steps=False)
    result = ranking_agreement(tmp_path / "policy", data, rewards, prompts=4, group_size=4, sampler=drawn)
    assert result["prompts"] == 4 and result["group_size"] == 4 and set(result["models"]) == {"oracle", "preservation"}
    assert result["identical_groups"] == 0.0
    gaussian = ranking_agreement(tmp_path / "policy", data, rewards, prompts=4, group_size=4)  # the preset's
    assert gaussian["identical_groups"] == 1.0
    oracle = result["models"]["oracle"]
    assert oracle["groups"] >= 1 and oracle["spearman"] == pytest.approx(1.0, abs=0.05)
    assert oracle["best_gain"] == result["oracle_best_gain"] > 0  # ranking by the oracle keeps each group's best edit
    assert result["gold_spread"] > 0 and result["models"]["preservation"]["best_gain"] <= oracle["best_gain"]


def test_the_oracle_control_summary_by_hand():
    """GRPO's mean best gold is the threshold; each algorithm's mean seconds to reach it over the runs that do."""
    runs = [
        {"label": "oracle", "gold": [0.5, 0.6, 0.7], "proxy": [0.5, 0.6, 0.7], "seconds": [0, 10, 20]},
        {"label": "oracle", "gold": [0.5, 0.55, 0.6], "proxy": [0.5, 0.5, 0.6], "seconds": [0, 12, 24]},
        {"label": "oracle-nft", "gold": [0.5, 0.66, 0.64], "proxy": [0.5, 0.7, 0.6], "seconds": [0, 4, 8]},
        {"label": "oracle-nft", "gold": [0.5, 0.6, 0.64], "proxy": [0.5, 0.6, 0.6], "seconds": [0, 6, 12]},
        {"label": "JRM", "gold": [0.5, 0.9], "proxy": [0.5, 0.9], "seconds": [0, 1]},
    ]
    c = oracle_control(runs)
    assert c["threshold"] == pytest.approx(0.65)
    assert c["oracle"]["gains"] == [0.2, 0.1] and c["oracle"]["reached"] == "1/2"
    assert c["oracle"]["seconds_to_threshold"] == 20
    assert c["oracle-nft"]["best_gains"] == [0.16, 0.14] and c["oracle-nft"]["reached"] == "1/2"
    assert c["oracle-nft"]["seconds_to_threshold"] == 4 and c["nft_time_fraction"] == 0.2
    assert c["oracle-nft"]["proxy_gains"] == [0.1, 0.1]
    assert oracle_control([r for r in runs if r["label"] == "JRM"]) is None
