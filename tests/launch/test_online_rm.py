"""launch/online_rm.py's figures: one refreshed run read back (tiny, in process), the summary over seeds by hand,
and docs/results.md's table against the committed JSON."""

import json
from pathlib import Path

import pytest

from launch.online_rm import accuracy_difference, condition_summary, online_markdown, run_summary
from reward.config import load_config
from rl.actors import local_actors
from rl.config import RLConfig
from rl.loop import train
from tests.rl.runs import refreshed_overrides, tiny_data_and_policy, tiny_jrm

ROOT = Path(__file__).resolve().parents[2]


def test_a_refreshed_run_reads_back_with_its_accuracy_curve_labels_and_time_share(tmp_path):
    root = tiny_jrm(tiny_data_and_policy(tmp_path / "fixture"))
    out = tmp_path / "run"
    train(load_config(RLConfig, None, refreshed_overrides(root, out, "eval_every=1")), local_actors)
    s = run_summary(out)
    assert s["steps"] == [0, 1, 2, 3] and len(s["gold"]) == len(s["proxy"]) == 4
    assert s["gain"] == pytest.approx(s["gold"][-1] - s["gold"][0], abs=2e-4)
    assert [a["step"] for a in s["accuracy_before"]] == [1, 2, 3]
    assert s["labels"] == 12 and s["reward_version"] == 2 and 0 < s["refresh_share"] < 1


def test_the_summary_over_seeds_by_hand():
    runs = [
        {
            "gain": 0.1,
            "verdict": "hacking",
            "accuracy_before": [{"accuracy": 0.5, "strict": 10}, {"accuracy": 0.7, "strict": 10}],
            "labels": 96,
            "refresh_share": 0.1,
        },
        {
            "gain": 0.3,
            "verdict": "ok",
            "accuracy_before": [{"accuracy": 0.6, "strict": 30}, {"accuracy": 0.9, "strict": 30}],
            "labels": 90,
            "refresh_share": 0.2,
        },
    ]
    s = condition_summary(runs)
    assert s["gain_mean"] == 0.2 and s["gain_std"] == pytest.approx(0.1414, abs=1e-4)
    assert s["hacking_rate"] == 0.5 and s["labels"] == 96 and s["refresh_share"] == 0.15
    assert s["accuracy_curve"] == [0.55, 0.8]
    # pooled over the strict pairs: (0.5 x 10 + 0.6 x 30) / 40 = 0.575; Wilson's interval for 23 of 40
    assert s["accuracy_first"]["accuracy"] == 0.575 and s["accuracy_first"]["pairs"] == 40
    assert s["accuracy_first"]["ci"] == pytest.approx([0.4219, 0.7149], abs=1e-4)
    assert s["accuracy_later"]["accuracy"] == 0.85
    table = online_markdown(
        {
            "conditions": {"JRM-refreshed": s},
            "differences": [
                {"a": "A", "b": "B", "mean": 0.05, "ci": [-0.01, 0.1], "accuracy_later": accuracy_difference(s, s)}
            ],
        }
    )
    assert "| JRM-refreshed | 2 | +0.200 ± 0.141 | 50% | 57.5% [42.2%, 71.5%] (40) |" in table
    assert "| 55% → 80% | 96 | 15.0% |" in table
    # the same 40 pairs twice: 0 +- 1.96 sqrt(2 x 0.85 x 0.15 / 40)
    assert "| A − B | +0.050 | [-0.010, +0.100] | +0.0% [-15.7%, +15.7%] |" in table


def test_the_results_table_equals_its_json():
    path = ROOT / "docs" / "results" / "online_rm.json"
    if not path.is_file():
        pytest.skip("online_rm.json not committed")
    results = json.loads(path.read_text())
    assert online_markdown(results) in (ROOT / "docs" / "results.md").read_text()
    assert all(s["seeds"] >= 3 for s in results["conditions"].values())
