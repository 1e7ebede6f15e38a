"""launch/demo.py's pieces: the oracle control's summary and the tables of the RL results."""

import pytest

from launch.demo import oracle_control, versus_oracle


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


def test_each_reward_models_share_of_the_oracle_gain_by_hand():
    runs = [
        {"label": "oracle", "gold": [0.5, 0.7]},
        {"label": "oracle", "gold": [0.5, 0.6]},
        {"label": "JRM", "gold": [0.5, 0.6]},
        {"label": "JRM", "gold": [0.5, 0.55]},
        {"label": "oracle-nft", "gold": [0.5, 0.9]},  # the ceiling is GRPO's with the oracle, not NFT's
    ]
    v = versus_oracle(runs)
    assert v["oracle_mean_gain"] == pytest.approx(0.15)
    assert v["models"] == {"JRM": {"mean_gain": 0.075, "share_of_oracle": 0.5}}
    flat = [{"label": "oracle", "gold": [0.5, 0.505]}, {"label": "JRM", "gold": [0.5, 0.6]}]
    assert versus_oracle(flat)["models"]["JRM"]["share_of_oracle"] is None  # a share of nothing says nothing
    assert versus_oracle([{"label": "JRM", "gold": [0.5, 0.6]}]) is None
