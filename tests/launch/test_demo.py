"""launch/demo.py's ranking-agreement stage on a tiny policy and a tiny ShapeEdit set: the oracle ranks its own
judgements perfectly, and the drawn last step gives every group spread where the most probable category of a
policy that keeps its source gives none."""

import dataclasses
import json

import pytest

from launch.demo import ranking_agreement
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
    result = ranking_agreement(
        tmp_path / "policy", data, {"oracle": f"oracle:{data}", "preservation": "preservation"}, prompts=4, group_size=4
    )
    assert result["prompts"] == 4 and result["group_size"] == 4 and set(result["models"]) == {"oracle", "preservation"}
    assert result["identical_groups"] == 0.0 and result["identical_groups_gaussian"] == 1.0
    oracle = result["models"]["oracle"]
    assert oracle["groups"] >= 1 and oracle["spearman"] == pytest.approx(1.0, abs=0.05)
    assert oracle["best_gain"] == result["oracle_best_gain"] > 0  # ranking by the oracle keeps each group's best edit
    assert result["gold_spread"] > 0 and result["models"]["preservation"]["best_gain"] <= oracle["best_gain"]
