"""Flow-GRPO vs DiffusionNFT on ShapeEdit, side by side: gold reached per minute and per step, and the
hacking verdicts, with the oracle and with a JRM as reward, over several seeds.

    python launch/nft_vs_grpo.py [--seeds 3] [--steps 20] [--data runs/jrm_shapeedit/data] \
        [--jrm runs/jrm_shapeedit/jrm_seed0/final] [--out runs/nft_vs_grpo] [--json docs/results/nft_vs_grpo.json]
    python launch/nft_vs_grpo.py --data runs/demo/data --policy runs/demo/policy --rewards oracle \
        --algorithms grpo,nft --sampler preset --out runs/oracle_nft --json runs/oracle_nft/result.json

Same pretrained policy (made here by launch/pretrain_policy.py when --policy is not given), same prompts,
same sampler (`--sampler`: the Gaussian SDE steps, or the preset's drawn last step), same steps; each run
is one `rl.loop.train` on a local Ray cluster, the runs one after another (NFT and GRPO alternate, so a slower machine
hurts both). Seconds are the run's own: the sum of its steps' and evaluations' wall-clock (actor start-up excluded).
Writes the JSON (per run: label, algorithm, reward, seed, steps, seconds, gold, proxy, verdict; and per
algorithm and reward the mean best gold, time to a gold threshold and verdicts) and a figure next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/nft_vs_grpo.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only (see launch/grpo_edit.py)

import numpy as np  # noqa: E402

from launch.benchmarking import comma_list, command_line, local_ray, machine, table  # noqa: E402
from reward.config import HelpFormatter, load_config  # noqa: E402
from rl.compare import load_run, run_signal  # noqa: E402
from rl.config import RLConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# NFT needs no log-probs, so it may sample with a cheaper ODE (nft-ode4: 4 deterministic steps instead of 8 SDE steps).
GAUSSIAN_SAMPLER = ["policy.sampler.sample_last_step=false", "policy.sampler.gaussian_steps=true"]
"""Both algorithms on the Gaussian SDE steps, with the most probable category last (the preset's sampler when
docs/results/nft_vs_grpo.json was measured; GRPO needs them, NFT's ODE variant ignores them)."""
ALGORITHMS = {
    "grpo": [],
    "nft": ["algo.name=nft", "algo.nft_terms=2"],
    "nft-ode4": ["algo.name=nft", "algo.nft_terms=2", "policy.sampler.noise_level=0.0", "policy.sampler.num_steps=4"],
}


def run_curve(run_dir: Path) -> dict:
    """steps, seconds (cumulative step + evaluation wall-clock), gold and proxy at every evaluation."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed, curve = 0.0, {"steps": [], "seconds": [], "gold": [], "proxy": []}
    for row in rows:
        elapsed += row.get("perf/step_s", 0.0) + row.get("perf/eval_s", 0.0)
        if "eval/gold_score" in row:
            curve["steps"].append(row["step"])
            curve["seconds"].append(round(elapsed, 2))
            curve["gold"].append(row["eval/gold_score"])
            curve["proxy"].append(row["eval/reward_mean"])
    return curve


def time_to(curve: dict, threshold: float) -> float | None:
    """Seconds until the gold score first reaches `threshold` (None: never)."""
    return next((s for s, g in zip(curve["seconds"], curve["gold"]) if g >= threshold), None)


def markdown(report: dict) -> str:
    """The results table docs/results.md and docs/performance.md hold (a test checks they equal this)."""
    lines = [
        "| algorithm | reward | runs | gold start | best gold (mean ± sd) | last gold | s per step | s total | "
        "reached GRPO's best | s to it | verdicts |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in report["summary"]:
        to = "–" if g["seconds_to_threshold"] is None else f"{g['seconds_to_threshold']:.0f}"
        verdicts = ", ".join(f"{k} {v}" for k, v in g["verdicts"].items())
        lines.append(
            f"| {g['algorithm']} | {g['reward']} | {g['runs']} | {g['gold_start']:.3f} | {g['gold_best']:.3f} ± "
            f"{g['gold_best_sd']:.3f} | {g['gold_last']:.3f} | {g['seconds_per_step']:.1f} | {g['seconds_total']:.0f} "
            f"| {g['reached_threshold']}/{g['runs']} | {to} | {verdicts} |"
        )
    for reward in dict.fromkeys(g["reward"] for g in report["summary"]):
        rows = {g["algorithm"]: g for g in report["summary"] if g["reward"] == reward}
        grpo = rows.pop("grpo")
        parts = []
        for name, g in rows.items():
            speed = grpo["seconds_per_step"] / g["seconds_per_step"]
            reach = (
                f"{grpo['seconds_to_threshold'] / g['seconds_to_threshold']:.2f}x"
                if grpo["seconds_to_threshold"] and g["seconds_to_threshold"]
                else "not measurable (a group never reached it)"
            )
            parts.append(
                f"{name}'s steps are {speed:.2f}x as fast as GRPO's, time to GRPO's mean best gold "
                f"({grpo['threshold']:.3f}) GRPO / {name} {reach}"
            )
        lines.append("")
        lines.append(f"{reward} reward: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = sorted({r["reward"] for r in runs})
    fig, axes = plt.subplots(len(rewards), 2, figsize=(10, 3.6 * len(rewards)), squeeze=False)
    colours = {"grpo": "tab:blue", "nft": "tab:orange", "nft-ode4": "tab:green"}
    for row, reward in enumerate(rewards):
        for r in (r for r in runs if r["reward"] == reward):
            for col, x in enumerate(("seconds", "steps")):
                axes[row, col].plot(
                    r[x],
                    r["gold"],
                    color=colours[r["algorithm"]],
                    alpha=0.7,
                    label=r["algorithm"] if r["seed"] == 0 else None,
                )
        for col, x in enumerate(("wall-clock seconds", "RL steps")):
            axes[row, col].set_xlabel(x)
            axes[row, col].set_ylabel("gold (oracle, held-out prompts)")
            axes[row, col].set_title(f"reward: {reward}", fontsize=10)
            axes[row, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="runs per algorithm and reward (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="RL steps per run (default 20)")
    parser.add_argument(
        "--data", default="runs/jrm_shapeedit/data", help="ShapeEdit data folder (python -m reward.shapeedit generate)"
    )
    parser.add_argument(
        "--jrm", default="runs/jrm_shapeedit/jrm_seed0/final", help="the JRM used as reward (reward/train.py's final/)"
    )
    parser.add_argument(
        "--policy", default="", help="a pretrained ShapeEdit policy; default: pretrain one into OUT/policy"
    )
    parser.add_argument(
        "--pretrain-minutes", type=float, default=4.0, help="policy pretraining budget when --policy is not given"
    )
    parser.add_argument("--num-eval", type=int, default=32, help="held-out prompts per evaluation (default 32)")
    parser.add_argument("--out", default="runs/nft_vs_grpo", help="where the runs go")
    parser.add_argument(
        "--json", default="docs/results/nft_vs_grpo.json", help="the results JSON (a PNG figure goes next to it)"
    )
    parser.add_argument("--rewards", default="oracle,jrm", help="which rewards, comma-separated: oracle, jrm")
    parser.add_argument(
        "--algorithms",
        default=",".join(ALGORITHMS),
        help=f"which algorithms, comma-separated, grpo among them: {', '.join(ALGORITHMS)}",
    )
    parser.add_argument(
        "--sampler",
        default="gaussian",
        choices=("gaussian", "preset"),
        help=(
            "gaussian: 8 Gaussian SDE steps and the most probable category last (what docs/results/nft_vs_grpo.json "
            "was measured with); preset: launch/configs/shapeedit.yaml's own (the palette's drawn last step)"
        ),
    )
    args = parser.parse_args(argv)
    chosen_rewards = comma_list(parser, "--rewards", args.rewards, ("oracle", "jrm"))
    algorithms = {name: ALGORITHMS[name] for name in comma_list(parser, "--algorithms", args.algorithms, ALGORITHMS)}
    if "grpo" not in algorithms:
        parser.error("--algorithms: grpo is the baseline the others are compared with; keep it in the list")
    out, data = Path(args.out), Path(args.data)
    policy = Path(args.policy) if args.policy else out / "policy"
    if not (policy / "policy.json").is_file() and not args.policy:
        subprocess.run(
            [
                sys.executable,
                "launch/pretrain_policy.py",
                f"output_dir={policy}",
                f"data_dir={data}",
                f"max_minutes={args.pretrain_minutes}",
                "num_eval=64",
            ],
            cwd=ROOT,
            check=True,
        )
    from rl.loop import train
    from rl.ray_actors import ray_actors

    rewards = {
        name: spec
        for name, spec in {"oracle": f"oracle:{data}", "jrm": f"jrm:{args.jrm}"}.items()
        if name in chosen_rewards
    }
    sampler = GAUSSIAN_SAMPLER if args.sampler == "gaussian" else []
    runs = []
    with local_ray():
        for reward, spec in rewards.items():
            for seed in range(args.seeds):
                for algorithm, extra in algorithms.items():
                    run_dir = out / f"{reward}-{algorithm}-seed{seed}"
                    overrides = [
                        f"output_dir={run_dir}",
                        f"seed={seed}",
                        f"num_rl_steps={args.steps}",
                        "eval_every=5",
                        f"save_every={args.steps}",
                        f"policy.path={policy}",
                        f"reward.terms=[{{name: {reward}, spec: '{spec}'}}]",
                        f"reward.gold=oracle:{data}",
                        f"data.train_prompts={data / 'train_prompts.json'}",
                        f"data.eval_prompts={data / 'test_heldout_prompts.json'}",
                        f"data.num_eval={args.num_eval}",
                        "wandb=false",
                        *sampler,
                        *extra,
                    ]
                    if not (run_dir / "checkpoints" / f"step-{args.steps:06d}" / "state.json").is_file():
                        start = time.perf_counter()
                        train(
                            load_config(
                                RLConfig, ROOT / "launch" / "configs" / "shapeedit.yaml", overrides + ["resume=auto"]
                            ),
                            ray_actors,
                        )
                        print(f"{run_dir}: {time.perf_counter() - start:.0f} s", flush=True)
                    curve = run_curve(run_dir)
                    verdict = run_signal(load_run(run_dir, f"{reward}-{algorithm}")).verdict
                    runs.append(
                        {
                            "label": f"{algorithm}/{reward}",
                            "algorithm": algorithm,
                            "reward": reward,
                            "seed": seed,
                            **curve,
                            "verdict": verdict,
                        }
                    )

    summary = []
    for reward in rewards:
        best_grpo = float(np.mean([max(r["gold"]) for r in runs if r["reward"] == reward and r["algorithm"] == "grpo"]))
        for algorithm in algorithms:
            group = [r for r in runs if r["reward"] == reward and r["algorithm"] == algorithm]
            times = [time_to(r, best_grpo) for r in group]
            summary.append(
                {
                    "algorithm": algorithm,
                    "reward": reward,
                    "runs": len(group),
                    "gold_start": float(np.mean([r["gold"][0] for r in group])),
                    "gold_best": float(np.mean([max(r["gold"]) for r in group])),
                    "gold_best_sd": float(np.std([max(r["gold"]) for r in group], ddof=1))
                    if len(group) > 1
                    else float("nan"),
                    "gold_last": float(np.mean([r["gold"][-1] for r in group])),
                    "seconds_total": float(np.mean([r["seconds"][-1] for r in group])),
                    "seconds_per_step": float(np.mean([r["seconds"][-1] / r["steps"][-1] for r in group])),
                    "threshold": best_grpo,
                    "reached_threshold": sum(t is not None for t in times),
                    "seconds_to_threshold": float(np.mean([t for t in times if t is not None]))
                    if any(t is not None for t in times)
                    else None,
                    "verdicts": {
                        v: sum(r["verdict"] == v for r in group) for v in sorted({r["verdict"] for r in group})
                    },
                }
            )
    columns = [
        "algorithm",
        "reward",
        "runs",
        "gold_start",
        "gold_best",
        "gold_best_sd",
        "gold_last",
        "seconds_total",
        "seconds_per_step",
        "reached_threshold",
        "seconds_to_threshold",
        "verdicts",
    ]
    print(table(summary, columns, "Flow-GRPO vs DiffusionNFT on ShapeEdit (threshold: GRPO's mean best gold)"))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "seeds": args.seeds,
        "steps": args.steps,
        "data": str(data),
        "jrm": args.jrm,
        "policy": str(policy),
        "num_eval": args.num_eval,
        "config": "launch/configs/shapeedit.yaml",
        "algorithms": algorithms,
        "sampler": args.sampler,
    }
    report = {
        "command": command_line(__file__, argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "settings": settings,
        "summary": summary,
        "runs": runs,
    }
    path.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    plot(runs, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
