"""launch/compare_runs.py end to end on synthetic runs: the report renders, its numbers match the metrics
files, and bad input exits 2 with a message naming what is wrong."""

import json

import numpy as np
from PIL import Image

from launch.compare_runs import main, split_label
from reward.shapeedit import GenerateConfig, generate
from tests.reward.test_compare import write_reward_run
from tests.rl.test_compare import hacked_gold, rising, write_run


def test_report_of_rl_and_reward_runs(tmp_path, capsys):
    runs = [
        f"JRM={write_run(tmp_path, 'jrm0', rising, lambda s: 0.1 * s, seed=0, noise=0.01)}",
        f"JRM={write_run(tmp_path, 'jrm1', rising, lambda s: 0.1 * s, seed=1, noise=0.01)}",
        f"alpha0={write_run(tmp_path, 'l00', hacked_gold, lambda s: 0.1 * s, seed=0, reward_dir='alpha0')}",
    ]
    data = tmp_path / "data"
    generate(GenerateConfig(out=str(data), pairs=40, seed=3), progress=False)
    rm = [
        f"JRM={write_reward_run(tmp_path, 'rm_a', {50: 3, 100: 0})}",
        f"alpha0={write_reward_run(tmp_path, 'rm_b', {100: 1}, alpha=0.0)}",
    ]
    out = tmp_path / "report"
    assert (
        main(
            [*runs, "--out", str(out), "--reward-runs", *rm, "--probe", str(data / "train.json"), "--probe-pairs", "8"]
        )
        == 0
    )
    assert "report.md" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    groups = {g["label"]: g for g in summary["rl"]["groups"]}
    assert groups["alpha0"]["verdicts"] == {"hacking": 1}
    assert "| alpha0 | 1 | 40/40 |" in md
    gold = [json.loads(line) for line in (tmp_path / "jrm0" / "metrics.jsonl").read_text().splitlines()]
    gold += [json.loads(line) for line in (tmp_path / "jrm1" / "metrics.jsonl").read_text().splitlines()]
    at_40 = [r["eval/gold_score"] for r in gold if r["step"] == 40 and "eval/gold_score" in r]
    assert groups["JRM"]["gold_at"] == np.mean(at_40)
    assert f"{np.mean(at_40):.3f} ± {np.std(at_40, ddof=1):.3f}" in md
    assert "alpha0: the policy hacked it in 1 of 1 runs (onset at steps 25)" in md
    assert summary["reward_models"]["probe_pairs"] == 8
    assert "## Reward models" in md and "<table>" in (out / "report.html").read_text()
    for name in ("curves.png", "reward_models.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 800 and image.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))
        assert f"]({name})" in md


def test_bad_input_exits_2_naming_it(tmp_path, capsys):
    good = write_run(tmp_path, "a", rising, lambda s: s)
    other = write_run(tmp_path, "b", rising, lambda s: s, gold_spec="oracle:/elsewhere")
    assert main([str(good), str(other), "--out", str(tmp_path / "r")]) == 2
    assert "reward.gold differs" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "r")]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert main([str(good), "--out", str(tmp_path / "r"), "--reward-runs", str(good)]) == 2
    assert "needs --probe" in capsys.readouterr().err
    odd = tmp_path / "lr=1e-3"
    odd.mkdir()
    assert split_label(f"JRM={good}") == ("JRM", str(good))
    assert split_label(f"lambda=0={odd}") == ("lambda=0", str(odd))
    assert split_label(f"JRM={odd}") == ("JRM", str(odd))
    assert split_label(str(odd)) == (None, str(odd))
    assert split_label("JRM=nowhere") == (None, "JRM=nowhere")  # loading then names the missing folder


def test_the_report_states_the_gold_difference_with_an_interval(tmp_path):
    """Two reward models with 3 seeds each and per-prompt scores: one sentence with the difference, its
    bootstrap interval and what more seeds would do, in the report and summary.json."""
    runs = [
        f"A={write_run(tmp_path, f'a{s}', lambda t: rising(t) + 0.1 * t / 40, rising, seed=s, prompts=16)}"
        for s in range(3)
    ]
    runs += [f"B={write_run(tmp_path, f'b{s}', rising, rising, seed=s, prompts=16)}" for s in range(3)]
    out = tmp_path / "report"
    assert main([*runs, "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    (difference,) = json.loads((out / "summary.json").read_text())["rl"]["differences"]
    assert difference["labels"] == ["A", "B"] and difference["prompts"] == 16 and difference["ci_low"] > 0
    assert "## Reward models compared on gold" in md and difference["sentence"] in md
    assert difference["sentence"].startswith("A > B by 0.100 gold at step 40")
