"""The project's main job on its embedded default: ShapeEdit on CPU, end to end, ending in a comparison report.

    make demo            # or: python launch/demo.py [--quick] [--out runs/demo] [--seeds 2]

1. generate a ShapeEdit dataset, print its summary, draw a contact sheet;
2. take the shipped pretrained ShapeEdit policy (assets/shapeedit_policy, built by launch/build_assets.py;
   `--from-scratch` rebuilds it by its recipe) and measure it on this data: gold, and the spread of its samples;
3. sample the policy on the train prompts and label every pair of its samples with the oracle
   (launch/policy_pairs.py; pairs whose gold differs by less than --min-gap 0.1 left out): reward data on the
   edits RL will score;
4. take the shipped reward backbone (assets/reward_backbone: the tiny Qwen2-VL pretrained on ShapeEdit grounding
   by reward/pretrain_backbone.py, built by launch/build_assets.py --asset backbone; `--from-scratch` rebuilds it),
   then train two reward models from it with reward/train.py on the candidate pairs mixed with the policy's
   pairs: the grounded JRM (alpha 0.7, uncertainty ranking) and its discriminative-only ablation (lambda = 0),
   same data, steps and seed;
5. measure how each reward model ranks fresh samples of the policy on val and held-out prompts, within groups
   of one prompt, against the oracle (what GRPO's advantages rest on);
6. start a local Ray cluster on 127.0.0.1 and submit one GRPO job per reward model and seed with `ray job submit`
   (launch/grpo_edit.py, preset launch/configs/shapeedit.yaml, gold = the oracle), and the oracle control: GRPO
   (`oracle`) and DiffusionNFT (`oracle-nft`) with the oracle itself as reward, the ceiling the reward models are
   measured against; stop the cluster;
7. compare the runs and the two reward models (launch/compare_runs.py);
8. evaluate the pretrained and the final policy of JRM seed 0 again with launch/evaluate_policy.py (the oracle and
   the JRM, the run's noise) and put their grids side by side in the report (policies.png); print its path.
`--quick` shortens every stage (a smoke run of the whole path, a few minutes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/demo.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from launch.build_assets import ASSETS, load_asset
from launch.jrm_shapeedit import OBJECTIVES
from launch.nft_vs_grpo import ALGORITHMS, run_curve, time_to
from launch.policy_pairs import on_policy, write_policy_pairs
from reward.config import HelpFormatter
from reward.shapeedit import SPLITS, GenerateConfig, generate
from reward.shapeedit.sheet import contact_sheet


def summarise(data_dir: Path) -> str:
    """A few lines on the generated data: sizes per split and mean oracle score per candidate mode."""
    meta = json.loads((data_dir / "meta.json").read_text())
    lines = ["split          prompts   pairs   ties"]
    for split in SPLITS:
        n = meta["prompts"][split]
        lines.append(f"{split:<14} {n:>7} {meta['pairs'][split]:>7} {meta['ties'][split]:>6}")
    scores: dict[str, list[float]] = collections.defaultdict(list)
    for row in json.loads((data_dir / "train.json").read_text()):
        for slot in ("1", "2"):
            scores[row[f"model{slot}"]].append(row[f"oracle{slot}"]["overall"])
    lines.append("candidate mode    mean oracle overall (train)")
    for mode, values in sorted(scores.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        lines.append(f"{mode:<17} {sum(values) / len(values):.3f}  (n={len(values)})")
    return "\n".join(lines)


ROOT = Path(__file__).resolve().parents[1]
NFT = ALGORITHMS["nft"]
"""The oracle control's DiffusionNFT runs: the preset with these overrides (launch/nft_vs_grpo.py's 'nft')."""


def run(cmd: list[str], **kwargs) -> None:
    """Run one stage as its own process (its own threads and memory), failing loudly."""
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, **kwargs)


class RayCluster:
    """A loopback-only local Ray cluster for the GRPO jobs, stopped whatever happens."""

    def __init__(self):
        bin_dir = Path(sys.executable).parent
        self.ray = str(bin_dir / "ray")
        # Ray 2.60 clusters require a token (in ~/.ray/auth_token, made in __enter__); the job client only
        # sends it when RAY_AUTH_MODE=token is set in its environment. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 stops
        # Ray from replacing 127.0.0.1 by the machine's address, so every server listens on loopback only.
        self.env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **os.environ, "RAY_AUTH_MODE": "token"}

    def __enter__(self) -> RayCluster:
        # `ray start` refuses to create the token itself: on a machine that never ran Ray, make one first (kept
        # in ~/.ray/auth_token, never printed).
        subprocess.run(
            [self.ray, "get-auth-token", "--generate"], cwd=ROOT, check=True, env=self.env, stdout=subprocess.DEVNULL
        )
        run(
            [
                self.ray,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                "--disable-usage-stats",
                "--dashboard-host=127.0.0.1",
                "--dashboard-port=8265",
                "--port=6389",
            ],
            env=self.env,
        )
        return self

    def submit(self, overrides: list[str]) -> None:
        """One GRPO job, waited for; its logs stream to this terminal."""
        cmd = [
            self.ray,
            "job",
            "submit",
            "--address",
            "http://127.0.0.1:8265",
            "--working-dir",
            ".",
            "--",
            sys.executable,
            "launch/grpo_edit.py",
            "--config",
            "launch/configs/shapeedit.yaml",
            *overrides,
        ]
        run(cmd, env=self.env)

    def __exit__(self, *exc) -> None:
        subprocess.run([self.ray, "stop"], cwd=ROOT, check=False, env=self.env)


def starting_checkpoint(asset: str, out: Path, from_scratch: bool, quick: bool) -> Path:
    """out/<asset>: a copy of the shipped asset after load_asset checks every file against its manifest, or, with
    from_scratch, the asset rebuilt by its recipe (launch/build_assets.py; with quick, the recipe's smoke version)."""
    folder = out / asset
    if folder.exists():  # every stage starts afresh
        shutil.rmtree(folder)
    if from_scratch:
        build = [sys.executable, "launch/build_assets.py", "--asset", asset, "--out", str(folder)]
        run([*build, "--work", str(out / "assets"), *(["--smoke"] if quick else [])])
    else:
        load_asset(ASSETS[asset])
        shutil.copytree(ASSETS[asset], folder)
    return folder


def doing_nothing(data_dir: Path, split: str, limit: int) -> dict:
    """The oracle's scores of returning each source unchanged, on the policy's evaluation prompts of `split`."""
    from launch.pretrain_policy import load_eval_prompts
    from reward.shapeedit import judge_image

    prompts = load_eval_prompts(data_dir, split, limit, 64)
    judged = [judge_image(p["scene"], p["edits"], p["source"]) for p in prompts]
    return {
        k: round(sum(getattr(j, k) for j in judged) / len(judged), 4)
        for k in ("overall", "following", "consistency", "quality")
    }


def measure_policy(policy_dir: Path, data_dir: Path, num_eval: int, spread_prompts: int) -> dict:
    """The pretrained policy on this demo's data, written to POLICY_DIR/results.json: the oracle's mean over the
    preset's policy.eval_samples ODE samples per prompt (val and test_heldout), and how its samples of one val
    prompt differ under RL's sampler (launch/pretrain_policy.py's group_spread); pretraining's steps and seconds
    come from its manifest."""
    from launch.pretrain_policy import evaluate, gold_by_code_mean, group_spread, load_eval_prompts
    from policies.shapeedit import ShapeEditPolicy
    from reward.config import load_config
    from rl.config import RLConfig

    preset = load_config(RLConfig, ROOT / "launch" / "configs" / "shapeedit.yaml", [])
    policy = ShapeEditPolicy.from_pretrained(policy_dir)
    result = {}
    splits = {split: load_eval_prompts(data_dir, split, num_eval, policy.height) for split in ("val", "test_heldout")}
    for split, prompts in splits.items():
        scores = evaluate(policy, prompts, preset.policy.eval_denoising_steps, samples=preset.policy.eval_samples)
        result.update({f"eval/{split}/{k}": round(v, 4) for k, v in scores.items()})
    if policy.cfg.decision_code:  # the most that moving the decision-code mean alone can give, on held-out prompts
        result["decisions/test_heldout"] = gold_by_code_mean(
            policy, splits["test_heldout"], preset.policy.eval_denoising_steps, preset.policy.eval_samples
        )
    prompts = load_eval_prompts(data_dir, "val", spread_prompts, policy.height)
    spread = group_spread(policy, prompts, preset.policy.sampler, preset.algo.group_size)
    result.update({f"spread/{k}": v for k, v in spread.items()})
    manifest = json.loads((policy_dir / "manifest.json").read_text())
    result.update({k: manifest["measured"][k] for k in ("steps", "trained_s")})
    result["threads"] = manifest["built"]["threads"]
    (policy_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print("pretrained policy: " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    return result


def side_by_side(grids: list[Path], out: Path, gap: int = 16) -> None:
    """The evaluation grids of several checkpoints (source | edits each) next to each other, one PNG."""
    from PIL import Image

    images = [Image.open(g).convert("RGB") for g in grids]
    canvas = Image.new(
        "RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)), "white"
    )
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + gap
    canvas.save(out)


def policy_evaluation(evaluation: Path, run: Path) -> dict:
    """launch/evaluate_policy.py's paired gold difference between the pretrained and the final policy of `run`,
    next to the run's own gold gain (its evaluations at step 0 and at the end)."""
    comparison = json.loads((evaluation / "comparison.json").read_text())
    gold = comparison["metrics"]["gold"]
    curve = run_curve(run)
    step = int(comparison["labels"][1].split("-")[-1])  # the evaluated checkpoint's step
    if step not in curve["steps"] or "mean" not in gold:
        raise RuntimeError(f"{evaluation}: no evaluation of {run} at step {step}, or too few prompts: {gold}")
    return {
        "run": run.name,
        "checkpoints": comparison["labels"],
        "gold_difference": round(gold["mean"], 4),
        "ci": [round(gold["ci_low"], 4), round(gold["ci_high"], 4)],
        "rl_gold_gain": round(curve["gold"][curve["steps"].index(step)] - curve["gold"][0], 4),
        "sentence": gold["sentence"],
        "jrm_sentence": comparison["metrics"]["JRM"]["sentence"],
    }


def write_rl_results(
    path: Path,
    data_dir: Path,
    policy: Path,
    summary: dict,
    num_eval: int,
    on_policy: dict,
    reward_data: dict,
    evaluated: dict | None = None,
) -> None:
    """docs/results/rl_shapeedit.json: doing nothing and the pretrained policy (oracle, val and test_heldout), every
    GRPO run's held-out gold and proxy curves with its verdict, the gold difference between the reward models, the
    reward data (`reward_data`), how each reward model ranks fresh samples of the policy (`on_policy`), and the
    pretrained and final policy evaluated again (`policy_evaluation`)."""
    pretrained = json.loads((policy / "results.json").read_text())
    keys = ("overall", "following", "consistency", "quality")
    runs = []
    for r in summary["rl"]["runs"]:
        rows = [json.loads(line) for line in (Path(r["path"]) / "metrics.jsonl").read_text().splitlines()]
        flat = [
            row["rollout/zero_std_ratio"] for row in rows if "rollout/zero_std_ratio" in row
        ]  # groups GRPO cannot learn from
        step_s = [row["perf/step_s"] for row in rows if "perf/step_s" in row]
        curve = run_curve(Path(r["path"]))  # seconds: the run's own step and evaluation wall-clock so far
        runs.append(
            {
                "label": r["label"],
                "algorithm": "nft" if r["label"].endswith("-nft") else "grpo",
                "seed": r["seed"],
                **curve,
                "verdict": r["signal"]["verdict"],
                "zero_std_ratio": round(sum(flat) / len(flat), 4) if flat else None,
                "step_s": round(sum(step_s) / len(step_s), 2) if step_s else None,
            }
        )
    differences = summary["rl"]["differences"]
    result = {
        "doing_nothing": {split: doing_nothing(data_dir, split, num_eval) for split in ("val", "test_heldout")},
        "pretrained": {
            **{split: {k: pretrained[f"eval/{split}/{k}"] for k in keys} for split in ("val", "test_heldout")},
            "group_gold_std": pretrained["spread/group_gold_std"],
            "identical_groups": pretrained["spread/identical_groups"],
            "spread_gold": pretrained["spread/gold"],
            "gold_by_code_mean": pretrained.get("decisions/test_heldout"),
        },
        "pretraining": {k: pretrained[k] for k in ("steps", "trained_s", "threads")},
        "runs": runs,
        "difference": {
            k: differences[0][k]
            for k in (
                "labels",
                "step",
                "mean",
                "ci_low",
                "ci_high",
                "seeds",
                "prompts",
                "seeds_to_resolve",
                "hacking_rate",
                "hacking_diff_ci",
                "sentence",
            )  # fmt: skip
        }
        if differences
        else None,
        "gains": {
            label: [round(run["gold"][-1] - run["gold"][0], 4) for run in runs if run["label"] == label]
            for label in dict.fromkeys(r["label"] for r in runs)
        },
        "oracle_control": oracle_control(runs),
        "versus_oracle": versus_oracle(runs),
        "reward_data": reward_data,
        "on_policy": on_policy,
        "policy_evaluation": evaluated,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def versus_oracle(runs: list[dict]) -> dict | None:
    """Each reward model's mean held-out gold gain and its share of the oracle-reward GRPO runs' mean gain (None
    where the oracle's gain is within 0.01 of nothing: a share of nothing says nothing)."""
    oracle = [r["gold"][-1] - r["gold"][0] for r in runs if r["label"] == "oracle"]
    if not oracle:
        return None
    ceiling = sum(oracle) / len(oracle)
    out = {}
    for label in dict.fromkeys(r["label"] for r in runs if not r["label"].startswith("oracle")):
        gains = [r["gold"][-1] - r["gold"][0] for r in runs if r["label"] == label]
        mean = sum(gains) / len(gains)
        out[label] = {
            "mean_gain": round(mean, 4),
            "share_of_oracle": round(mean / ceiling, 3) if ceiling > 0.01 else None,
        }
    return {"oracle_mean_gain": round(ceiling, 4), "models": out}


def oracle_control(runs: list[dict]) -> dict | None:
    """The oracle-reward runs side by side: each algorithm's gains, and the wall-clock each takes to reach GRPO's
    mean best gold (`threshold`; the mean over the runs that reach it, with how many did)."""
    groups = {label: [r for r in runs if r["label"] == label] for label in ("oracle", "oracle-nft")}
    if not groups["oracle"]:
        return None
    threshold = sum(max(r["gold"]) for r in groups["oracle"]) / len(groups["oracle"])
    result = {"threshold": round(threshold, 4)}
    for label, group in groups.items():
        times = [t for t in (time_to(r, threshold) for r in group) if t is not None]
        result[label] = {
            "gains": [round(r["gold"][-1] - r["gold"][0], 4) for r in group],
            "best_gains": [round(max(r["gold"]) - r["gold"][0], 4) for r in group],
            "proxy_gains": [round(r["proxy"][-1] - r["proxy"][0], 4) for r in group],
            "reached": f"{len(times)}/{len(group)}",
            "seconds_to_threshold": round(sum(times) / len(times), 1) if times else None,
        }
    grpo_s, nft_s = result["oracle"]["seconds_to_threshold"], result["oracle-nft"]["seconds_to_threshold"]
    result["nft_time_fraction"] = round(nft_s / grpo_s, 3) if grpo_s and nft_s else None
    return result


def rl_markdown(results: dict) -> str:
    """The tables docs/results.md holds for docs/results/rl_shapeedit.json: the policy before RL next to doing
    nothing, every GRPO run's held-out gold, the reward data, the on-policy ranking, the oracle control, the policy
    evaluated again, and the difference between the reward models."""
    keys = ("overall", "following", "consistency", "quality")
    lines = [
        "| policy | split | " + " | ".join(keys) + " |",
        "| --- | --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for name, label in (("doing_nothing", "doing nothing (the source)"), ("pretrained", "pretrained policy")):
        for split in ("val", "test_heldout"):
            lines.append(f"| {label} | {split} | " + " | ".join(f"{results[name][split][k]:.3f}" for k in keys) + " |")
    p = results["pretrained"]
    lines += [
        "",
        f"The pretrained policy's samples of one val prompt under RL's sampler: gold std within a group of 8 "
        f"{p['group_gold_std']:.3f} (mean over prompts), groups whose samples are all one image "
        f"{p['identical_groups']:.0%}, mean gold {p['spread_gold']:.3f}."
        + (
            ""
            if not p.get("gold_by_code_mean")
            else " Its held-out gold with every instruction's decision-code mean fixed (the decisions chosen, "
            "nothing else changed): "
            + ", ".join(f"{mean} {gold:.3f}" for mean, gold in p["gold_by_code_mean"].items())
            + f"; the most that moving the mean alone can add is "
            f"{max(p['gold_by_code_mean'].values()) - results['pretrained']['test_heldout']['overall']:+.3f}."
        ),
        "",
        "| reward model | seed | gold at step 0 | gold at the end (step) | gain | best gold | verdict | groups "
        "without reward spread | s per step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        gain = run["gold"][-1] - run["gold"][0]
        flat = "–" if run.get("zero_std_ratio") is None else f"{run['zero_std_ratio']:.0%}"
        step_s = "–" if run.get("step_s") is None else f"{run['step_s']:.1f}"
        lines.append(
            f"| {run['label']} | {run['seed']} | {run['gold'][0]:.3f} | {run['gold'][-1]:.3f} ({run['steps'][-1]}) | "
            f"{gain:+.3f} | {max(run['gold']):.3f} | {run['verdict']} | {flat} | {step_s} |"
        )
    data = results.get("reward_data")
    if data:
        lines += [
            "",
            f"Reward data: {data['candidate_pairs']} candidate pairs mixed with {data['policy']['pairs']} pairs of the "
            f"policy's own samples ({data['policy']['prompts']} train prompts x {data['policy']['samples']} samples, "
            f"{data['policy']['ties']} ties"
            + (f", pairs whose gold differs by less than {data['min_gap']} left out" if data.get("min_gap") else "")
            + "); the backbone's grounding probe: box error "
            + ("– (no box parsed)" if data["probe_box_error"] is None else f"{data['probe_box_error']:.0f}")
            + f" on the 0-1000 scale (always answering the mean box: {data['constant_box_error']:.0f}).",
        ]
    on_policy = results.get("on_policy")
    if on_policy:
        lines += [
            "",
            "How each reward model ranks fresh samples of the pretrained policy, within the groups of one prompt, "
            "against the oracle (pairs: gold gap >= 0.1; top-1 gain: the gold of the edit it ranks first minus the "
            "group's mean):",
            "",
            "| reward model | split | Spearman | groups | pair accuracy | pairs | top-1 gain |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for split, block in on_policy.items():
            for label, m in block["models"].items():
                rho = "–" if m["spearman"] is None else f"{m['spearman']:+.3f}"
                acc = "–" if m["pair_accuracy"] is None else f"{m['pair_accuracy']:.1%}"
                lines.append(
                    f"| {label} | {split} | {rho} | {m['groups']} | {acc} | {m['pairs']} | {m['top1_gain']:+.3f} |"
                )
        lines += [
            "",
            "Per split: "
            + "; ".join(
                f"{split}: {b['prompts']} prompts x {b['group_size']} samples, identical groups "
                f"{b['identical_groups']:.0%}, gold std within a group {b['gold_spread']:.3f}, the oracle's own top-1 "
                f"gain {b['oracle_top1_gain']:+.3f}"
                for split, b in on_policy.items()
            )
            + ".",
        ]
    control = results.get("oracle_control")
    if control:
        parts = []
        for label in ("oracle", "oracle-nft"):
            c = control[label]
            parts.append(
                f"{label}: held-out gold gains {', '.join(f'{g:+.3f}' for g in c['gains'])} (best "
                f"{', '.join(f'{g:+.3f}' for g in c['best_gains'])}), proxy gains "
                f"{', '.join(f'{g:+.3f}' for g in c['proxy_gains'])}; reached GRPO's mean best gold "
                f"({control['threshold']:.3f}) {c['reached']}"
                + ("" if c["seconds_to_threshold"] is None else f" in {c['seconds_to_threshold']:.0f} s on average")
            )
        fraction = control["nft_time_fraction"]
        lines += [
            "",
            "The oracle control (the oracle itself as reward), per seed: "
            + "; ".join(parts)
            + (f". NFT took {fraction:.2f}x GRPO's wall-clock to get there." if fraction is not None else "."),
        ]
    evaluated = results.get("policy_evaluation")
    if evaluated:
        lines += [
            "",
            f"The pretrained and the final policy of {evaluated['run']}, evaluated again by "
            f"`launch/evaluate_policy.py` with the run's noise (`--noise rl`): {evaluated['sentence']} The run's own "
            f"evaluations gave {evaluated['rl_gold_gain']:+.4f}. {evaluated['jrm_sentence']}",
        ]
    versus = results.get("versus_oracle")
    if versus:
        shares = "; ".join(
            f"{label} {m['mean_gain']:+.3f}"
            + ("" if m["share_of_oracle"] is None else f" ({m['share_of_oracle']:.0%} of the oracle's)")
            for label, m in versus["models"].items()
        )
        lines += [
            "",
            f"Against the oracle control (mean held-out gold gain {versus['oracle_mean_gain']:+.3f}): {shares}.",
        ]
    difference = results["difference"]
    if difference and "hacking_rate" in difference:
        rates = ", ".join(
            f"{label} {rate:.0%}" for label, rate in zip(difference["labels"], difference["hacking_rate"])
        )
        lines += ["", f"Runs the hacking signal calls hacking: {rates}."]
    difference = results["difference"]
    if difference:
        lines += [
            "",
            f"Final held-out gold, bootstrap over seeds and, paired, the {difference['prompts']} prompts: "
            f"**{difference['sentence']}**",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder (its data/ is regenerated)")
    parser.add_argument("--quick", action="store_true", help="every stage shortened: a smoke run of the whole path")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data and the reward models (the shipped checkpoints were built with seed 0)",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="rebuild the pretrained policy and reward backbone by their recipes (launch/build_assets.py: about 45 "
        "minutes; with --quick, their smoke versions) instead of starting from the shipped ones "
        "(assets/shapeedit_policy, assets/reward_backbone)",
    )
    parser.add_argument(
        "--min-gap",
        type=float,
        default=0.1,
        help="pairs of the policy's samples whose oracle scores differ by less are left out of the reward data "
        "(launch/policy_pairs.py --min-gap; 0 keeps every pair)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=(
            "GRPO runs per reward model (seeds 0..N-1; default 3, the fewest for an interval worth reading; 2 with "
            "--quick)"
        ),
    )
    parser.add_argument(
        "--results",
        default=None,
        help=(
            "where the RL results JSON goes (default docs/results/rl_shapeedit.json; with --quick, "
            "OUT/rl_shapeedit.json)"
        ),
    )
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3

    out = Path(args.out).resolve()
    data_dir = out / "data"
    timings = {}
    py = sys.executable
    # ---- 1. ShapeEdit data -------------------------------------------------------------------------
    if data_dir.exists():
        shutil.rmtree(data_dir)
    start = time.perf_counter()
    generate(GenerateConfig(out=str(data_dir), pairs=2000 if args.quick else 10000, seed=args.seed))
    timings["data"] = time.perf_counter() - start
    print(f"\nShapeEdit data generated in {timings['data']:.1f} s\n")
    print(summarise(data_dir))
    sheet = contact_sheet(data_dir, "train", rows=8, out=out / "contact_sheet.png")

    # ---- 2. the policy: the shipped checkpoint (launch/build_assets.py), or rebuilt by its recipe ---------------
    start = time.perf_counter()
    policy = starting_checkpoint("policy", out, args.from_scratch, args.quick)
    measure_policy(policy, data_dir, 16 if args.quick else 64, 8 if args.quick else 32)
    timings["policy"] = time.perf_counter() - start

    # ---- 3. reward data on the policy's own edits: pairs of its samples, labelled by the oracle -------------------
    start = time.perf_counter()
    policy_pairs = write_policy_pairs(
        policy, data_dir, "train", 100 if args.quick else 1000, 4, args.seed, min_gap=args.min_gap
    )
    timings["policy pairs"] = time.perf_counter() - start

    # ---- 4. the reward models: the grounded JRM and its lambda = 0 ablation, from one pretrained backbone ---------
    # Same backbone, data (the candidate pairs and the policy's), steps and seed; every checkpoint is kept for the
    # drift analysis of the report.
    rewards = {"JRM": out / "jrm", "lambda0": out / "lambda0"}
    start = time.perf_counter()
    backbone = starting_checkpoint("backbone", out, args.from_scratch, args.quick)
    timings["backbone"] = time.perf_counter() - start
    steps = 100 if args.quick else 1000
    for name, folder in rewards.items():
        start = time.perf_counter()
        if folder.exists():  # checkpoints of an earlier demo would mix into the drift analysis
            shutil.rmtree(folder)
        run(
            [
                py,
                "reward/train.py",
                f"output_dir={folder}",
                "resume=none",
                f"seed={args.seed}",
                f"model.backbone={backbone}",
                *OBJECTIVES[name.lower()],
                f"data.train={data_dir / 'train.json'}",
                f"data.mix=[{data_dir / 'policy_train.json'}]",
                f"data.eval={data_dir / 'val.json'}",
                f"trainer.max_steps={steps}",
                f"trainer.eval_steps={steps // 4}",
                f"trainer.save_steps={steps // 5}",
                "trainer.save_total_limit=12",
            ]
        )
        timings[f"reward model {name}"] = time.perf_counter() - start

    # ---- 5. how each reward model ranks fresh samples of the policy (seeds the pairs did not use) --------------
    start = time.perf_counter()
    models = {"oracle": f"oracle:{data_dir}", **{n: f"jrm:{f / 'final'}" for n, f in rewards.items()}}
    ranking = on_policy(
        policy, data_dir, models, ("val", "test_heldout"), 8 if args.quick else 32, 8, seed=1000 + args.seed
    )
    probe = json.loads((backbone / "pretrain.json").read_text())
    reward_data = {
        "candidate_pairs": len(json.loads((data_dir / "train.json").read_text())),
        "policy": {k: policy_pairs[k] for k in ("prompts", "samples", "pairs", "ties", "gold", "group_gold_std")},
        "min_gap": args.min_gap,
        "probe_box_error": None if probe["locate_box_error"] is None else round(probe["locate_box_error"], 1),
        "constant_box_error": round(probe["constant_box_error"], 1),
    }
    timings["on-policy ranking"] = time.perf_counter() - start

    # ---- 6. GRPO as Ray jobs: each reward model x each seed ------------------------------------------------
    start = time.perf_counter()
    grpo_runs = []
    if (out / "grpo").exists():
        shutil.rmtree(out / "grpo")
    terms = {
        **{name: (f"jrm:{folder / 'final'}", []) for name, folder in rewards.items()},
        "oracle": (f"oracle:{data_dir}", []),  # the control: the best any reward model could do
        "oracle-nft": (f"oracle:{data_dir}", NFT),
    }
    with RayCluster() as cluster:
        for name, (spec, algorithm) in terms.items():
            control = name.startswith("oracle")
            for seed in range(1 if args.quick and control else args.seeds):  # --quick: one run of each control
                run_dir = out / "grpo" / f"{name}-seed{seed}"
                overrides = [
                    f"output_dir={run_dir}",
                    f"seed={seed}",
                    f"policy.path={policy}",
                    f"reward.terms=[{{name: {name.split('-')[0]}, spec: '{spec}', micro_batch_size: 64}}]",
                    f"reward.gold=oracle:{data_dir}",
                    f"data.train_prompts={data_dir / 'train_prompts.json'}",
                    f"data.eval_prompts={data_dir / 'test_heldout_prompts.json'}",
                    *algorithm,
                ]
                if args.quick:
                    overrides += ["num_rl_steps=3", "eval_every=1", "save_every=3", "data.num_eval=16"]
                cluster.submit(overrides)
                grpo_runs.append(f"{name}={run_dir}")
    timings["grpo"] = time.perf_counter() - start

    # ---- 7. the comparison report ------------------------------------------------------------------------------
    start = time.perf_counter()
    report = out / "report"
    run(
        [
            py,
            "launch/compare_runs.py",
            *grpo_runs,
            "--out",
            str(report),
            "--reward-runs",
            *(f"{name}={folder}" for name, folder in rewards.items()),
            "--probe",
            str(data_dir / "test_iid.json"),
        ]
    )
    timings["report"] = time.perf_counter() - start

    # ---- 8. the pretrained and the final policy of JRM seed 0, side by side (launch/evaluate_policy.py) ------------
    # With the run's config and noise: its scores repeat the run's own evaluations at step 0 and at the end.
    start = time.perf_counter()
    first = out / "grpo" / "JRM-seed0"
    checkpoints = sorted((first / "checkpoints").glob("step-*"))
    if not checkpoints:
        raise RuntimeError(f"{first} saved no checkpoint: nothing to evaluate")
    final = checkpoints[-1]
    evaluation = report / "policy_eval"
    run(
        [
            py,
            "launch/evaluate_policy.py",
            "--config",
            str(first / "config.yaml"),
            "--benchmark",
            f"shapeedit:{data_dir}@test_heldout",
            "--limit",
            str(16 if args.quick else 64),
            "--noise",
            "rl",
            "--seed",
            "0",
            "--checkpoint",
            "base",
            "--checkpoint",
            str(final),
            "--scorer",
            f"gold=oracle:{data_dir}",
            "--scorer",
            f"JRM=jrm:{rewards['JRM'] / 'final'}",
            "--out",
            str(evaluation),
        ]
    )
    side_by_side([evaluation / "base" / "grid.png", evaluation / final.name / "grid.png"], report / "policies.png")
    evaluated = policy_evaluation(evaluation, first)
    with (report / "report.md").open("a") as f:  # the report shows the edits beside the curves
        f.write(
            f"\n## The pretrained and the final policy ({evaluated['run']})\n\n"
            f"![pretrained (left) and {final.name} (right): source | samples](policies.png)\n\n"
            f"{evaluated['sentence']} {evaluated['jrm_sentence']} (launch/evaluate_policy.py, the run's noise: "
            f"the run's own evaluations gave {evaluated['rl_gold_gain']:+.4f}.)\n"
        )
    timings["policy evaluation"] = time.perf_counter() - start
    summary = json.loads((report / "summary.json").read_text())
    results = (
        Path(args.results)
        if args.results
        else (out / "rl_shapeedit.json" if args.quick else ROOT / "docs" / "results" / "rl_shapeedit.json")
    )
    write_rl_results(results, data_dir, policy, summary, 16 if args.quick else 64, ranking, reward_data, evaluated)
    print(f"\nRL results: {results}\n")
    print(rl_markdown(json.loads(results.read_text())))
    print("\nHeld-out prompts (test_heldout, ODE sampling), mean over seeds:")
    print("  reward model   gold at start   gold at step S   best gold   verdicts")
    for g in summary["rl"]["groups"]:
        print(
            f"  {g['label']:<14} {g['gold_start']:>13.4f}   {g['gold_at']:>14.4f}   {g['gold_best']:>9.4f}   "
            f"{g['verdicts']}   (S = {g['at_step']})"
        )
    print(
        "\nStage times: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
        + f"; total {sum(timings.values()) / 60:.1f} min"
    )
    print("\nOutputs:")
    print(f"  data          {data_dir}/  (train/val/test_iid/test_heldout .json, *_triples.json, *_prompts.json)")
    print(f"  contact sheet {sheet}")
    print(f"  backbone      {backbone}  (pretrain.json)")
    for name, folder in rewards.items():
        print(f"  {name:<13} {folder / 'final'}  (metrics: {folder / 'metrics.jsonl'})")
    print(f"  policy        {policy}  (results.json)")
    print(f"  GRPO runs     {out / 'grpo'}/*  (metrics.jsonl, eval/*.png, checkpoints/)")
    print(f"  report        {report / 'report.md'}  (report.html, curves.png, reward_models.png, summary.json)")
    print(f"  policies      {report / 'policies.png'}  (pretrained | final grids; {evaluation}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
