"""Frozen against refreshed reward models on ShapeEdit: does a reward that keeps learning from labelled samples of
the current policy (reward.refresh, rl/refresh.py) end with a better policy and less reward hacking?

    python launch/online_rm.py            # after `make demo` (its data, backbone and policy); about an hour
    python launch/online_rm.py --quick    # a smoke run of the whole path, a few minutes

1. train two deliberately weak reward models from the demo's backbone on --pairs candidate pairs: the JRM (alpha
   0.7) and lambda = 0, same pairs, steps and seed;
2. run GRPO (the preset launch/configs/shapeedit.yaml, gold = the oracle) for each condition and seed as Ray jobs:
   `JRM-frozen` and `lambda0-frozen` (the oracle labels the same pairs, which only measure: refresh.steps 0) and
   `JRM-refreshed` and `lambda0-refreshed` (the reward trains on them);
3. write --results (default docs/results/online_rm.json) and print its table (`online_markdown`): held-out gold
   gains, the refreshed-minus-frozen differences with their intervals, hacking rates, the on-policy accuracy of
   the reward before each refresh, labels used, and the refresh's share of the run's time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/online_rm.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from launch.demo import RayCluster, run
from launch.jrm_shapeedit import OBJECTIVES
from reward.config import HelpFormatter
from rl.compare import gold_difference, load_run, run_signal

CONDITIONS = ("JRM-frozen", "JRM-refreshed", "lambda0-frozen", "lambda0-refreshed")
DIFFERENCES = (
    ("JRM-refreshed", "JRM-frozen"),
    ("lambda0-refreshed", "lambda0-frozen"),
    ("JRM-refreshed", "lambda0-refreshed"),
)
REFRESH = {
    "every": 5,
    "pairs": 48,
    "steps": 5,
    "batch_size": 16,
    "lr": 3e-4,
    "original_fraction": 0.5,
    "budget": 2000,
}
"""The refresh of every run (frozen runs: steps 0): after steps 5, 10, 15 (and 20, which labels and measures
only), at most 192 labels; the lr is the weak models' own."""


def weak_pairs(data_dir: Path, n: int, seed: int, out: Path) -> Path:
    """n candidate pairs drawn from data_dir/train.json, their image paths made absolute, written to out."""
    rows = json.loads((data_dir / "train.json").read_text())
    rows = random.Random(seed).sample(rows, n)
    for row in rows:
        for key in ("path_src", "path1", "path2"):
            row[key] = str((data_dir / row[key]).resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows))
    return out


def run_summary(path: Path) -> dict:
    """One run's figures: gold and proxy per evaluation, the gain, its hacking verdict, the reward's accuracy on
    each refresh's new labels before training on them, labels used and the refresh's share of the run's time."""
    r = load_run(path)
    steps, gold = r.series("eval/gold_score")
    refresh = [(step, row) for step, row in sorted(r.rows.items()) if "refresh/version" in row]
    # perf/step_s is a step's whole wall-clock, its refresh included
    busy = sum(row.get(k, 0.0) for row in r.rows.values() for k in ("perf/step_s", "perf/eval_s"))
    return {
        "seed": r.seed,
        "steps": steps.tolist(),
        "gold": [round(float(g), 4) for g in gold],
        "proxy": [round(r.rows[s]["eval/reward_mean"], 4) for s in steps.tolist()],
        "gain": round(float(gold[-1] - gold[0]), 4),
        "verdict": run_signal(r).verdict,
        "accuracy_before": [
            {
                "step": step,
                "accuracy": round(row["refresh/accuracy_before"], 4),
                "labels": row["refresh/new_labels"],
                "strict": row["refresh/new_labels"] - row["refresh/new_ties"],
            }
            for step, row in refresh
        ],
        "labels": refresh[-1][1]["refresh/labels_asked"] if refresh else 0,
        "reward_version": refresh[-1][1]["refresh/version"] if refresh else 0,
        "refresh_share": round(sum(row["perf/refresh_s"] for _, row in refresh) / busy, 4) if busy else None,
    }


def pooled(refreshes: list[dict]) -> dict:
    """The accuracy over the strict pairs of several refreshes (each refresh's accuracy weighted by its strict
    pairs), with a 95% Wilson interval over those pairs."""
    refreshes = [a for a in refreshes if a["strict"]]  # a refresh with ties only has no accuracy (nan)
    n = sum(a["strict"] for a in refreshes)
    if n == 0:
        return {"accuracy": None, "ci": None, "pairs": 0}
    p = sum(a["accuracy"] * a["strict"] for a in refreshes) / n
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"accuracy": round(p, 4), "ci": [round(centre - half, 4), round(centre + half, 4)], "pairs": n}


def condition_summary(runs: list[dict]) -> dict:
    """Over seeds: the gain's mean and sample std, the hacking rate, labels, refresh share, and the reward's
    accuracy on each refresh's new labels before training on them, pooled over the seeds' pairs: at the first
    refresh (the model as trained) and at the later ones (after one refresh or more, in refreshed runs)."""
    gains = [r["gain"] for r in runs]
    return {
        "seeds": len(runs),
        "gain_mean": round(float(np.mean(gains)), 4),
        "gain_std": round(float(np.std(gains, ddof=1)), 4) if len(gains) > 1 else None,
        "hacking_rate": round(float(np.mean([r["verdict"] == "hacking" for r in runs])), 4),
        "accuracy_first": pooled([r["accuracy_before"][0] for r in runs]),
        "accuracy_later": pooled([a for r in runs for a in r["accuracy_before"][1:]]),
        "accuracy_curve": [
            round(float(np.nanmean([r["accuracy_before"][k]["accuracy"] for r in runs])), 4)
            for k in range(min(len(r["accuracy_before"]) for r in runs))
        ],
        "labels": max(r["labels"] for r in runs),
        "refresh_share": round(float(np.mean([r["refresh_share"] for r in runs])), 4),
    }


def accuracy_difference(a: dict, b: dict) -> dict:
    """A's later-refresh accuracy minus B's (condition_summary), with a 95% normal interval over their pairs."""
    pa, pb = a["accuracy_later"], b["accuracy_later"]
    if not pa["pairs"] or not pb["pairs"]:
        return {"mean": None, "ci": None}
    mean = pa["accuracy"] - pb["accuracy"]
    half = 1.96 * math.sqrt(
        pa["accuracy"] * (1 - pa["accuracy"]) / pa["pairs"] + pb["accuracy"] * (1 - pb["accuracy"]) / pb["pairs"]
    )
    return {"mean": round(mean, 4), "ci": [round(mean - half, 4), round(mean + half, 4)]}


def difference_summary(a: list[Path], b: list[Path], labels: tuple[str, str], conditions: dict) -> dict:
    d = gold_difference([load_run(p, labels[0]) for p in a], [load_run(p, labels[1]) for p in b])
    return {
        "accuracy_later": accuracy_difference(conditions[labels[0]], conditions[labels[1]]),
        "a": labels[0],
        "b": labels[1],
        "step": d.step,
        "mean": round(d.mean, 4),
        "ci": [round(d.ci_low, 4), round(d.ci_high, 4)],
        "hacking_rate": [round(x, 4) for x in d.hacking_rate],
        "sentence": d.sentence(),
    }


def accuracy_cell(a: dict) -> str:
    if a["accuracy"] is None:
        return "–"
    return f"{a['accuracy']:.1%} [{a['ci'][0]:.1%}, {a['ci'][1]:.1%}] ({a['pairs']})"


def online_markdown(results: dict) -> str:
    """The tables of docs/results.md's "Online reward refresh" section, from online_rm.json."""
    lines = [
        "| reward | seeds | held-out gold gain | hacking rate | on-policy accuracy at the 1st refresh | at the later "
        "refreshes | accuracy by refresh | labels | refresh share of time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in results["conditions"].items():
        std = "" if s["gain_std"] is None else f" ± {s['gain_std']:.3f}"
        curve = " → ".join(f"{a:.0%}" for a in s["accuracy_curve"])
        lines.append(
            f"| {name} | {s['seeds']} | {s['gain_mean']:+.3f}{std} | {s['hacking_rate']:.0%} | "
            f"{accuracy_cell(s['accuracy_first'])} | {accuracy_cell(s['accuracy_later'])} | {curve} | {s['labels']} | "
            f"{s['refresh_share']:.1%} |"
        )
    lines += [
        "",
        "| difference | held-out gold at the last evaluation | 95% interval (seeds and prompts) "
        "| on-policy accuracy at the later refreshes (95%) |",
        "| --- | --- | --- | --- |",
    ]
    for d in results["differences"]:
        acc = d["accuracy_later"]
        cell = "–" if acc["mean"] is None else f"{acc['mean']:+.1%} [{acc['ci'][0]:+.1%}, {acc['ci'][1]:+.1%}]"
        lines.append(f"| {d['a']} − {d['b']} | {d['mean']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | {cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="the demo's folder: its data/, backbone/ and policy/")
    parser.add_argument("--out", default="runs/online_rm", help="folder of the weak reward models and the runs")
    parser.add_argument("--pairs", type=int, default=1000, help="candidate pairs the weak reward models train on")
    parser.add_argument("--reward-steps", type=int, default=250, help="optimizer steps of the weak reward models")
    parser.add_argument("--seeds", type=int, default=3, help="GRPO runs per condition (seeds 0..N-1)")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS, help="what to run")
    parser.add_argument("--quick", action="store_true", help="everything shortened: a smoke run of the whole path")
    parser.add_argument(
        "--report", action="store_true", help="train and run nothing: write the results of the runs already in --out"
    )
    parser.add_argument(
        "--results",
        default=None,
        help="where the JSON goes (default docs/results/online_rm.json; with --quick, OUT/online_rm.json)",
    )
    args = parser.parse_args(argv)
    demo, out = Path(args.demo).resolve(), Path(args.out).resolve()
    data_dir = demo / "data"
    for need in (data_dir / "train.json", demo / "backbone", demo / "policy"):
        if not need.exists():
            print(f"error: {need} is missing: run `make demo` first (or give --demo)", file=sys.stderr)
            return 2
    if args.quick:
        args.pairs, args.reward_steps, args.seeds = 200, 30, 2
    results_path = Path(args.results or (out / "online_rm.json" if args.quick else "docs/results/online_rm.json"))
    timings: dict[str, float] = {}
    models = {name: out / name for name in ("jrm", "lambda0")}
    runs = {c: [out / "grpo" / f"{c}-seed{seed}" for seed in range(args.seeds)] for c in args.conditions}
    if not args.report:
        train_and_run(args, demo, out, models, runs, timings)
    write_results(args, models, runs, timings, results_path)
    return 0


def train_and_run(args, demo: Path, out: Path, models: dict, runs: dict, timings: dict) -> None:
    """Stages 1 and 2: the weak reward models, then every run of `runs` as a Ray job."""
    py = sys.executable
    data_dir = demo / "data"
    # ---- 1. two weak reward models on the same few candidate pairs ------------------------------------------------
    start = time.perf_counter()
    weak = weak_pairs(data_dir, args.pairs, 0, out / "weak_train.json")
    for name in ("jrm", "lambda0"):
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        run(
            [
                py,
                "reward/train.py",
                f"output_dir={folder}",
                "resume=none",
                "seed=0",
                f"model.backbone={demo / 'backbone'}",
                *OBJECTIVES[name],
                f"data.train={weak}",
                f"data.eval={data_dir / 'val.json'}",
                f"trainer.max_steps={args.reward_steps}",
                f"trainer.eval_steps={args.reward_steps}",
                f"trainer.save_steps={args.reward_steps}",
                "trainer.disable_tqdm=true",
            ]
        )
    timings["weak reward models"] = time.perf_counter() - start

    # ---- 2. GRPO with each reward, frozen and refreshed, as Ray jobs -------------------------------------------
    start = time.perf_counter()
    with RayCluster() as cluster:
        for condition, run_dirs in runs.items():
            model, mode = condition.split("-")
            name = "jrm" if model == "JRM" else "lambda0"
            refresh = {**REFRESH, "steps": REFRESH["steps"] if mode == "refreshed" else 0}
            for seed, run_dir in enumerate(run_dirs):
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                overrides = [
                    f"output_dir={run_dir}",
                    f"seed={seed}",
                    f"policy.path={demo / 'policy'}",
                    f"reward.terms=[{{name: {name}, spec: 'jrm:{models[name] / 'final'}', micro_batch_size: 64}}]",
                    f"reward.gold=oracle:{data_dir}",
                    f"reward.refresh.term={name}",
                    f"reward.refresh.labeller=oracle:{data_dir}",
                    f"reward.refresh.original_data={weak}",
                    *(f"reward.refresh.{k}={v}" for k, v in refresh.items()),
                    f"data.train_prompts={data_dir / 'train_prompts.json'}",
                    f"data.eval_prompts={data_dir / 'test_heldout_prompts.json'}",
                    "eval_every=5",
                ]
                if args.quick:
                    overrides += ["num_rl_steps=4", "eval_every=2", "save_every=4", "data.num_eval=16"]
                    overrides += ["reward.refresh.every=2", "reward.refresh.pairs=16"]
                cluster.submit(overrides)
    timings["grpo"] = time.perf_counter() - start


def write_results(args, models: dict, runs: dict, timings: dict, results_path: Path) -> None:
    """Stage 3: the JSON and its table."""
    per_run = {c: [run_summary(p) for p in paths] for c, paths in runs.items()}
    conditions = {c: condition_summary(r) for c, r in per_run.items()}
    results = {
        "command": "python launch/online_rm.py" + (" --quick" if args.quick else ""),
        "weak_pairs": args.pairs,
        "reward_steps": args.reward_steps,
        "refresh": REFRESH,
        "weak_accuracy": {
            name: json.loads((folder / "eval.json").read_text()).get("eval_pairwise_accuracy")
            for name, folder in models.items()
        },
        "runs": per_run,
        "conditions": conditions,
        "differences": [
            difference_summary(runs[a], runs[b], (a, b), conditions) for a, b in DIFFERENCES if a in runs and b in runs
        ],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    if not timings and results_path.is_file():  # --report: the runs' own timings stay
        results["seconds"] = json.loads(results_path.read_text())["seconds"]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(online_markdown(results))
    for d in results["differences"]:
        print(d["sentence"])
    print(f"\nwrote {results_path}")


if __name__ == "__main__":
    sys.exit(main())
