"""rl/compare.py on synthetic run folders with planted properties: hacking flagged, stable runs not,
identical seeds give zero spread, numbers equal the metrics files, mismatched runs and folders missing a
per-prompt score file refused by name."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from reward.config import save_config
from rl.compare import (
    CompareError,
    band,
    gold_difference,
    hacking_rates,
    hacking_signal,
    load_run,
    run_signal,
    scores_file,
    summarise,
)
from rl.config import RewardConfig, RewardTerm, RLConfig


def write_run(
    root: Path,
    name: str,
    gold,
    proxy,
    seed: int = 0,
    steps: int = 40,
    eval_every: int = 5,
    reward_dir: str = "jrm",
    lr: float = 3e-3,
    gold_spec: str = "oracle:/data/shapeedit",
    noise: float = 0.0,
    log_gold: bool = True,
    prompts: int = 16,
    prompt_spread: float = 0.2,
    jitter: float = 0.01,
) -> Path:
    """A run folder as launch/grpo_edit.py writes it; gold(step) and proxy(step) give the evaluation means.
    Each evaluation's per-prompt scores (eval/scores-step-N.json): fixed deviations of sd ~prompt_spread per
    prompt (the same in every run), plus per-evaluation jitter; their mean is the evaluation's mean, and the
    logged standard errors are theirs."""
    run = root / name
    run.mkdir(parents=True)
    cfg = RLConfig(
        output_dir=str(run),
        seed=seed,
        num_rl_steps=steps,
        eval_every=eval_every,
        reward=RewardConfig(terms=[RewardTerm(spec=f"jrm:/models/{reward_dir}/final")], gold=gold_spec),
    )
    cfg.algo.lr = lr
    save_config(cfg, run / "config.yaml")
    rng = np.random.default_rng(seed)
    lines = []
    for step in range(steps + 1):
        if step:
            lines.append(
                {
                    "step": step,
                    "rollout/reward_mean": float(proxy(step) + noise * rng.normal()),
                    "rollout/reward_std": 1.0,
                    "rollout/zero_std_ratio": 0.0,
                    "train/approx_kl": 1e-5 * step,
                    "train/clipfrac": 0.05,
                }
            )
        if step % eval_every == 0:
            row = {
                "step": step,
                "eval/reward_mean": float(proxy(step)),
                "eval/gold_score": float(gold(step) + noise * rng.normal()),
            }
            if gold_spec == "" or not log_gold:
                del row["eval/gold_score"]
            lines.append(row)
            deviation = np.random.default_rng(1234).uniform(-prompt_spread, prompt_spread, prompts)
            deviation -= deviation.mean()
            per_prompt = {}
            for key, sem_key in (("eval/reward_mean", "eval/reward_sem"), ("eval/gold_score", "eval/gold_sem")):
                if key in row:
                    wobble = rng.normal(0, jitter, prompts)
                    per_prompt[key] = row[key] + deviation + wobble - wobble.mean()
                    row[sem_key] = float(per_prompt[key].std(ddof=1) / math.sqrt(prompts))
            (run / "eval").mkdir(exist_ok=True)
            (run / "eval" / f"scores-step-{step:06d}.json").write_text(
                json.dumps(
                    {
                        "step": step,
                        "instructions": [f"prompt {i}" for i in range(prompts)],
                        "proxy": per_prompt["eval/reward_mean"].tolist(),
                        "gold": per_prompt["eval/gold_score"].tolist() if "eval/gold_score" in per_prompt else None,
                    }
                )
            )
            (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
            (run / "checkpoints" / f"step-{step:06d}" / "state.json").write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def rising(step):
    return 0.25 + 0.004 * step


def hacked_gold(step):  # rises to step 20, then falls well beyond the noise
    return 0.25 + 0.004 * min(step, 20) - 0.006 * max(step - 20, 0)


def test_a_planted_hacking_run_is_flagged_with_its_onset_and_a_stable_one_is_not(tmp_path):
    hacked = load_run(write_run(tmp_path, "hacked", hacked_gold, lambda s: 0.1 * s))
    stable = load_run(write_run(tmp_path, "stable", rising, lambda s: 0.1 * s))
    collapsed = load_run(
        write_run(tmp_path, "collapsed", hacked_gold, lambda s: 0.1 * min(s, 20) - 0.2 * max(s - 20, 0))
    )
    signal = run_signal(hacked)
    assert signal.verdict == "hacking"
    assert signal.best_step == 20
    # gold falls 0.03 per evaluation from step 20 on: at step 25 the drop (0.03) already beats the tolerance,
    # 3 paired standard errors of the jitter (about 3 * sqrt(2) * 0.01 / sqrt(16) = 0.011)
    assert signal.onset == 25
    assert signal.gold_drop == pytest.approx(0.006 * 20)
    assert signal.agreement < 0.5
    assert run_signal(stable).verdict == "improved"
    assert run_signal(stable).onset is None
    assert run_signal(stable).agreement == pytest.approx(1.0)
    assert run_signal(collapsed).verdict == "collapsed"


def per_prompt(means: np.ndarray, jitter: float, prompts: int = 16, seed: int = 0) -> np.ndarray:
    """(E, prompts) scores whose row means are `means`: fixed per-prompt offsets plus per-evaluation jitter."""
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-0.2, 0.2, prompts)
    wobble = rng.normal(0, jitter, (len(means), prompts))
    return means[:, None] + (offsets - offsets.mean()) + (wobble - wobble.mean(1, keepdims=True))


def test_a_drop_within_the_evaluation_noise_is_not_hacking():
    steps = np.arange(0, 50, 10)
    gold = np.array([0.30, 0.32, 0.31, 0.31, 0.30])  # 0.02 below the best
    proxy = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    quiet_proxy = per_prompt(proxy, 0.001)
    assert hacking_signal(steps, proxy, gold, quiet_proxy, per_prompt(gold, 0.05)).verdict == "flat"
    signal = hacking_signal(steps, proxy, gold, quiet_proxy, per_prompt(gold, 0.001))
    assert (signal.verdict, signal.tolerance) == ("hacking", "3 paired standard errors (per prompt)")
    # the proxy must rise beyond its own noise too
    assert hacking_signal(steps, proxy, gold, per_prompt(proxy, 1.0), per_prompt(gold, 0.001)).verdict == "flat"
    short = hacking_signal(steps[:2], proxy[:2], gold[:2], quiet_proxy[:2], per_prompt(gold[:2], 0.001))
    assert short.verdict == "too short"
    # one prompt per evaluation: the change has no noise estimate, so no verdict on it
    assert hacking_signal(steps, proxy, gold, proxy[:, None], gold[:, None]).verdict == "too few prompts"


def test_identical_seeds_give_zero_spread_and_the_numbers_match_the_files(tmp_path):
    runs = [load_run(write_run(tmp_path, f"copy{i}", rising, lambda s: 0.1 * s, noise=0.01)) for i in range(2)]
    (group,), _ = summarise(runs)
    assert group.gold_at_std == 0.0
    assert group.gold_curve_std == 0.0
    assert group.proxy_at_std == 0.0
    rows = [json.loads(line) for line in (runs[0].path / "metrics.jsonl").read_text().splitlines()]
    gold_at_40 = next(r["eval/gold_score"] for r in rows if r["step"] == 40 and "eval/gold_score" in r)
    assert group.at_step == 40
    assert group.gold_at == pytest.approx(gold_at_40)
    kls = [r["train/approx_kl"] for r in rows if "train/approx_kl" in r]
    assert group.kl == pytest.approx(np.mean(kls))
    assert group.steps == "40/40"


def test_seeds_spread_and_groups_by_reward_model(tmp_path):
    runs = [
        load_run(write_run(tmp_path, "jrm0", rising, lambda s: 0.1 * s, seed=0, noise=0.02)),
        load_run(write_run(tmp_path, "jrm1", rising, lambda s: 0.1 * s, seed=1, noise=0.02)),
        load_run(write_run(tmp_path, "l0", hacked_gold, lambda s: 0.1 * s, seed=0, reward_dir="lambda0")),
    ]
    assert [r.label for r in runs] == ["jrm:jrm", "jrm:jrm", "jrm:lambda0"]
    groups, signals = summarise(runs)
    assert [g.label for g in groups] == ["jrm:jrm", "jrm:lambda0"]
    gold = [runs[i].rows[40]["eval/gold_score"] for i in (0, 1)]
    assert groups[0].gold_at_std == pytest.approx(np.std(gold, ddof=1))
    assert groups[0].gold_at_std > 0
    assert math.isnan(groups[1].gold_at_std)  # one seed: no spread
    assert groups[1].verdicts == {"hacking": 1}
    assert signals[runs[2].path].onset == 25


def test_runs_of_different_lengths_and_a_run_still_writing(tmp_path):
    short = write_run(tmp_path, "short", rising, lambda s: 0.1 * s, steps=20, seed=1)
    long = write_run(tmp_path, "long", rising, lambda s: 0.1 * s, steps=40)
    with (short / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "rollout/rew')  # torn last line of a run being written
    runs = [load_run(short), load_run(long)]
    (group,), _ = summarise(runs)
    assert group.at_step == 20
    assert group.steps == "20/20, 40/40"
    b = band(runs, "eval/gold_score")
    assert b.steps.tolist() == list(range(0, 45, 5))
    assert b.count.tolist() == [2] * 5 + [1] * 4
    assert b.mean[-1] == pytest.approx(runs[1].rows[40]["eval/gold_score"])


def test_mismatched_runs_are_refused_by_name(tmp_path):
    a = load_run(write_run(tmp_path, "a", rising, lambda s: s))
    other_gold = load_run(write_run(tmp_path, "b", rising, lambda s: s, gold_spec="oracle:/elsewhere", seed=1))
    with pytest.raises(CompareError, match="reward.gold"):
        summarise([a, other_gold])
    no_gold = load_run(write_run(tmp_path, "c", rising, lambda s: s, gold_spec="", seed=1))
    with pytest.raises(CompareError, match="reward.gold"):
        summarise([a, no_gold])
    other_lr = load_run(write_run(tmp_path, "d", rising, lambda s: s, lr=1e-3, seed=1))
    with pytest.raises(CompareError, match=r"algo.lr.*LABEL=RUN_DIR"):
        summarise([a, other_lr])
    relabelled = load_run(other_lr.path, label="lr1e-3")
    summarise([a, relabelled])  # a different label makes it a different group: fine
    broken = write_run(tmp_path, "e", rising, lambda s: s)
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:10]
    (broken / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CompareError, match=r"metrics.jsonl:4 is not JSON"):
        load_run(broken)
    with pytest.raises(CompareError, match="config.yaml is missing"):
        load_run(tmp_path / "nothing")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.yaml").write_text((a.path / "config.yaml").read_text())
    with pytest.raises(CompareError, match="metrics.jsonl is missing"):
        load_run(tmp_path / "f")


def test_bad_metrics_are_refused_with_file_and_line(tmp_path):
    nan_gold = write_run(tmp_path, "nan", rising, lambda s: s)
    text = (nan_gold / "metrics.jsonl").read_text().replace('"eval/gold_score": 0.27', '"eval/gold_score": NaN', 1)
    (nan_gold / "metrics.jsonl").write_text(text)
    with pytest.raises(CompareError, match=r"metrics.jsonl:\d+ has eval/gold_score=nan at step 5"):
        load_run(nan_gold)
    twice = write_run(tmp_path, "twice", rising, lambda s: s)
    with (twice / "metrics.jsonl").open("a") as f:  # a second run appended to the same file
        f.write(json.dumps({"step": 3, "rollout/reward_mean": 1.0}) + "\n")
    with pytest.raises(CompareError, match="logs rollout/reward_mean for step 3 a second time"):
        load_run(twice)


def test_fresh_runs_and_runs_without_gold(tmp_path):
    fresh = write_run(tmp_path, "fresh", rising, lambda s: s, seed=1)
    (fresh / "metrics.jsonl").write_text(
        (fresh / "metrics.jsonl").read_text().splitlines()[0] + "\n"
    )  # only step 0 so far
    running = load_run(write_run(tmp_path, "running", rising, lambda s: s))
    (group,), signals = summarise([running, load_run(fresh)])
    assert group.at_step == 0 and signals[fresh].verdict == "too short"
    silent = load_run(write_run(tmp_path, "silent", rising, lambda s: s, seed=2, log_gold=False))
    with pytest.raises(CompareError, match="logged no eval/gold_score while the others did"):
        summarise([running, silent])
    without = [
        load_run(write_run(tmp_path, f"nogold{i}", rising, lambda s: 0.1 * s, seed=i, gold_spec="")) for i in range(2)
    ]
    (group,), signals = summarise(without)
    assert group.verdicts == {"no gold": 2}
    assert math.isnan(group.gold_at) and group.proxy_at == pytest.approx(4.0)


def small_drop(step):  # rises to step 20, then falls by 0.03: inside the prompt spread, far outside the jitter
    return 0.25 + 0.004 * min(step, 20) - 0.0015 * max(step - 20, 0)


def test_paired_tolerances_flag_a_drop_inside_the_prompt_spread(tmp_path):
    """The same prompts at every evaluation: the per-prompt change is far less noisy than the prompts' spread,
    so a drop well inside that spread is flagged, and a stable run still is not."""
    hacked = load_run(write_run(tmp_path, "hacked", small_drop, rising, prompts=32))
    paired = run_signal(hacked)
    assert paired.verdict == "hacking" and "paired" in paired.tolerance and paired.onset is not None
    assert run_signal(load_run(write_run(tmp_path, "stable", rising, rising, prompts=32))).verdict == "improved"


def test_a_run_missing_a_score_file_is_refused_naming_it(tmp_path):
    run = write_run(tmp_path, "partial", rising, lambda s: 0.1 * s)
    missing = scores_file(run, 15)
    missing.unlink()
    with pytest.raises(CompareError, match="not a run folder written by launch/grpo_edit.py") as refused:
        load_run(run)
    assert str(missing) in str(refused.value) and "step 15" in str(refused.value)


def test_the_hacking_rule_rates_by_simulation():
    """False positives (flat gold, rising proxy) stay rare and a 0.06 fall is mostly caught
    (launch/hacking_rates.py writes the full table)."""
    assert hacking_rates(14, 32, 0.0, runs=200) <= 0.05
    assert hacking_rates(14, 32, 0.06, runs=200) >= 0.85


def test_gold_difference_separates_reward_models_with_an_interval(tmp_path):
    better = [
        load_run(write_run(tmp_path, f"a{s}", lambda t: rising(t) + 0.1 * t / 40, rising, seed=s, prompts=32), "A")
        for s in range(3)
    ]
    worse = [load_run(write_run(tmp_path, f"b{s}", rising, rising, seed=s, prompts=32), "B") for s in range(3)]
    diff = gold_difference(better, worse)
    assert diff.prompts == 32 and diff.step == 40 and diff.seeds == (3, 3)
    assert (
        diff.mean == pytest.approx(0.1, abs=1e-9)
        and diff.ci_low > 0.05
        and diff.resolved
        and diff.seeds_to_resolve == 0
    )
    assert diff.sentence().startswith("A > B by 0.100 gold at step 40")
    same = gold_difference(
        worse, [load_run(write_run(tmp_path, f"c{s}", rising, rising, seed=10 + s, prompts=32), "C") for s in range(3)]
    )
    assert not same.resolved and same.sentence().startswith("No difference resolved between B and C")
    # seeds that disagree by +-0.02 around a 0.01 difference: unresolved, and more seeds would resolve it
    noisy = [
        load_run(
            write_run(tmp_path, f"n{s}", lambda t, s=s: rising(t) + 0.01 + 0.02 * (s - 1), rising, seed=s, prompts=32),
            "N",
        )
        for s in range(3)
    ]
    unresolved = gold_difference(noisy, worse)
    assert not unresolved.resolved and unresolved.seeds_to_resolve is not None and unresolved.seeds_to_resolve > 3
    assert "seeds per reward model would resolve it" in unresolved.sentence()
    assert diff.hacking_rate == (0.0, 0.0)
    with pytest.raises(CompareError, match=">= 2 seeds"):
        gold_difference(better[:1], worse)


def test_nft_runs_without_a_ratio_compare_beside_grpo_runs_and_a_grpo_run_without_one_is_refused(tmp_path):
    """NFT logs no approx_kl or clipfrac (it has no ratio): its runs sit in one report with GRPO's; a GRPO run
    missing them is another jrm-edit version and refused."""

    def without_ratio_keys(run: Path, algorithm: str) -> Path:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        keep = [{k: v for k, v in r.items() if k not in ("train/approx_kl", "train/clipfrac")} for r in rows]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
        cfg = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(cfg.replace("name: grpo", f"name: {algorithm}", 1))
        return run

    grpo = load_run(write_run(tmp_path, "grpo", rising, lambda s: s))
    nft = load_run(without_ratio_keys(write_run(tmp_path, "nft", rising, lambda s: s, seed=1), "nft"), label="nft")
    summarise([grpo, nft])
    old = load_run(without_ratio_keys(write_run(tmp_path, "old", rising, lambda s: s, seed=2), "grpo"), label="old")
    with pytest.raises(CompareError, match="never logged train/approx_kl while the other grpo runs did"):
        summarise([grpo, old])
