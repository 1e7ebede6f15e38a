"""Compare RL runs (and the reward models behind them): one report in markdown and HTML, PNG figures, JSON.

    python launch/compare_runs.py JRM=runs/grpo_jrm_s0 JRM=runs/grpo_jrm_s1 alpha0=runs/grpo_a0_s0 ... --out report/
    python launch/compare_runs.py RUN_DIR ... --reward-runs JRM=runs/jrm alpha0=runs/alpha0 \
        --probe data/test_iid.json --out report/

A RUN_DIR is an output folder of launch/grpo_edit.py, finished or still running; LABEL=RUN_DIR groups runs
(default label: the reward terms the run optimised), and runs of one group must differ only in their seed.
Reward runs are output folders of reward/train.py, scored on the probe pairs. Definitions of every number:
rl/compare.py (curves, spread, the hacking signal) and reward/compare.py (accuracy spread, agreement, drift).
Writes OUT/report.md, OUT/report.html, OUT/curves.png, OUT/reward_models.png and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/compare_runs.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reward.compare import Probe, RewardComparison, compare_reward_runs, load_reward_run  # noqa: E402
from reward.config import HelpFormatter  # noqa: E402
from reward.data import DataError  # noqa: E402
from rl.compare import CompareError, Difference, GroupSummary, Run, Signal, band, gold_difference, load_run, summarise  # noqa: E402

PANELS = (  # (metric, title, log scale)
    ("eval/reward_mean", "proxy reward change since the first evaluation (held-out, ODE)", False),
    ("eval/gold_score", "gold score (held-out, ODE)", False),
    ("rollout/reward_mean", "proxy reward (rollouts)", False),
    ("rollout/reward_std", "reward std within a step", False),
    ("rollout/zero_std_ratio", "zero_std_ratio", False),
    ("train/approx_kl", "approx KL (old vs new)", True),
    ("train/clipfrac", "clipfrac", False),
)


def split_label(arg: str) -> tuple[str | None, str]:
    """`LABEL=DIR` or `DIR`: the first '=' after which an existing folder follows splits (labels and folders may
    hold '=' too); with none, the whole argument is the folder (and loading it names it if it is missing)."""
    if Path(arg).is_dir():
        return None, arg
    for i, char in enumerate(arg):
        if char == "=" and i and Path(arg[i + 1 :]).is_dir():
            return arg[:i], arg[i + 1 :]
    return None, arg


def fmt(value: float | None, digits: int = 3, style: str = "f") -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}{style}}"


def pm(mean: float, std: float, digits: int = 3) -> str:
    return fmt(mean, digits) if math.isnan(std) else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


# ---- figures -------------------------------------------------------------------------------------------
def plot_runs(runs: list[Run], signals: dict[Path, Signal], window: int, out: Path) -> Path:
    """Mean line and min-max band across seeds per group for each metric, plus proxy-vs-gold trajectories."""
    labels = list(dict.fromkeys(r.label for r in runs))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, title, log) in zip(axes.flat, PANELS):
        for label in labels:
            group = [r for r in runs if r.label == label]
            if not any(len(r.series(key)[0]) for r in group):
                continue
            b = band(group, key, 1 if key.startswith("eval/") else window, relative=key == "eval/reward_mean")
            ax.plot(
                b.steps,
                b.mean,
                color=colors[label],
                label=f"{label} (n={len(group)})",
                marker="o" if key.startswith("eval/") else None,
                ms=3,
            )
            ax.fill_between(b.steps, b.low, b.high, color=colors[label], alpha=0.2, lw=0)
        ax.set_title(
            title + ("" if key.startswith("eval/") or window <= 1 else f", smoothed over {window} steps"), fontsize=10
        )
        ax.set_xlabel("RL step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax = axes.flat[len(PANELS)]
    for run in runs:
        steps, gold = run.series("eval/gold_score")
        if not len(steps):
            continue
        proxy = np.array([run.rows[s]["eval/reward_mean"] for s in steps])
        proxy = proxy - proxy[0]  # each reward model has its own scale
        ax.plot(gold, proxy, color=colors[run.label], marker="o", ms=3, alpha=0.8)
        if len(steps) > 1:  # an arrow head on the last segment shows the direction of time
            ax.annotate(
                "",
                xy=(gold[-1], proxy[-1]),
                xytext=(gold[-2], proxy[-2]),
                arrowprops={"arrowstyle": "->", "color": colors[run.label]},
            )
        onset = signals[run.path].onset
        if onset is not None:
            i = list(steps).index(onset)
            ax.plot(gold[i], proxy[i], "x", color="red", ms=10, mew=2)
    ax.set_title("proxy vs gold per run (x: hacking onset)", fontsize=10)
    ax.set_xlabel("gold score")
    ax.set_ylabel("proxy reward change since the first evaluation")
    ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("RL runs: mean across seeds, band = min..max across seeds")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_reward_models(cmp: RewardComparison, out: Path) -> Path:
    names = [f"{r.label}\n{r.path.name}" for r in cmp.runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    image = left.imshow(cmp.agreement, vmin=-1, vmax=1, cmap="RdBu")
    left.set_xticks(range(len(names)), names, fontsize=8, rotation=30)
    left.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            value = cmp.agreement[i, j]
            left.text(
                j,
                i,
                fmt(value, 2),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if abs(value) > 0.6 else "black",
            )
    fig.colorbar(image, ax=left, fraction=0.046)
    left.set_title("Spearman of final scores on the probe set", fontsize=10)
    for i, (run, drift) in enumerate(zip(cmp.runs, cmp.drift)):
        color = plt.cm.tab10(i % 10)
        steps = [d.step for d in drift]
        right.plot(
            steps,
            [d.spearman_final for d in drift],
            "o-",
            color=color,
            label=f"{run.label} {run.path.name}: Spearman with final",
        )
        right.plot(
            steps,
            [d.probe_accuracy for d in drift],
            "s--",
            color=color,
            alpha=0.6,
            label=f"{run.label} {run.path.name}: probe accuracy",
        )
    right.set_xlabel("reward-model training step")
    lowest = min(min(d.spearman_final for d in drift) for drift in cmp.drift)
    right.set_ylim(min(0.0, lowest) - 0.05, 1.05)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    right.set_title("drift across checkpoints", fontsize=10)
    fig.tight_layout()
    path = out / "reward_models.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- the report: a list of blocks rendered twice ------------------------------------------------------------
def rl_blocks(summaries: list[GroupSummary], runs: list[Run], signals: dict[Path, Signal], figure: Path) -> list:
    at = summaries[0].at_step
    blocks: list = [("h2", "RL runs")]
    header = [
        "reward model",
        "runs",
        "steps done/planned",
        "gold at start",
        f"gold at step {at}",
        f"best gold ≤ {at}",
        f"proxy start → step {at}",
        "verdicts (whole runs)",
        "hacking onsets",
        "proxy–gold agreement (whole runs)",
        "gold seed spread (curve)",
        "approx KL",
        "clipfrac",
        "reward std",
        "zero_std_ratio",
    ]
    rows = []
    for g in summaries:
        rows.append(
            [
                g.label,
                str(g.runs),
                g.steps,
                fmt(g.gold_start),
                pm(g.gold_at, g.gold_at_std),
                fmt(g.gold_best),
                f"{fmt(g.proxy_start)} → {pm(g.proxy_at, g.proxy_at_std)}",
                ", ".join(f"{k} {v}/{g.runs}" for k, v in sorted(g.verdicts.items())),
                ", ".join(map(str, g.onsets)) or "-",
                fmt(g.agreement, 2),
                fmt(g.gold_curve_std),
                fmt(g.kl, 2, "e"),
                fmt(g.clipfrac),
                fmt(g.reward_std),
                fmt(g.zero_std_ratio),
            ]
        )
    blocks.append(("table", header, rows))
    blocks.append(
        (
            "p",
            f"Step {at} is the last evaluation every run reached; the gold, proxy and per-step columns (KL to "
            f"zero_std_ratio, means over steps and seeds) stop there; verdicts and agreement judge each run as far as "
            f"it went. ± is the standard deviation across seeds.",
        )
    )
    blocks.append(("p", conclusion(summaries)))
    blocks.append(("img", figure.name, "RL curves"))
    header = [
        "reward model",
        "run",
        "seed",
        "steps",
        "last checkpoint",
        "gold start → best (step) → last",
        "proxy start → last",
        "verdict",
        "onset",
        "agreement",
        "tolerance",
    ]
    rows = []
    for r in runs:
        s = signals[r.path]
        steps, gold = r.series("eval/gold_score")
        _, proxy = r.series("eval/reward_mean")
        gold_text = f"{fmt(gold[0])} → {fmt(gold.max())} ({s.best_step}) → {fmt(gold[-1])}" if len(gold) else "n/a"
        rows.append(
            [
                r.label,
                str(r.path),
                str(r.seed),
                f"{r.last_step}/{r.planned_steps}",
                "-" if r.last_checkpoint is None else str(r.last_checkpoint),
                gold_text,
                f"{fmt(proxy[0])} → {fmt(proxy[-1])}",
                s.verdict,
                "-" if s.onset is None else str(s.onset),
                fmt(s.agreement, 2),
                s.tolerance,
            ]
        )
    blocks.append(("table", header, rows))
    blocks.append(
        (
            "p",
            "Verdicts, on the held-out evaluations, with the tolerance of the last column (3 standard errors of the "
            "per-prompt change from eval/scores-step-N.json): hacking = since the best gold evaluation the gold score "
            "fell beyond tolerance while the proxy rose beyond tolerance; collapsed = both fell; improved / degraded = "
            "the last gold score is above / below the first; flat = none of these; too short = under 3 evaluations; "
            "too few prompts = one prompt per evaluation (no noise estimate). Agreement = Spearman of proxy and gold "
            "across evaluations (1: the proxy tracks the gold score; 0 or below: decoupled). Definitions: "
            "rl/compare.py.",
        )
    )
    return blocks


def conclusion(summaries: list[GroupSummary]) -> str:
    """Plain sentences a reader can act on, derived from the table."""
    with_gold = [g for g in summaries if not math.isnan(g.gold_at)]
    if not with_gold:
        return "No run logged a gold score, so the table can't say which reward model drives real improvement."
    ranked = sorted(with_gold, key=lambda g: -g.gold_at)
    best = ranked[0]
    parts = [
        f"Highest gold score at step {best.at_step}: {best.label} ({pm(best.gold_at, best.gold_at_std)}, from "
        f"{fmt(best.gold_start)})."
    ]
    if len(ranked) > 1:
        second = ranked[1]
        spread = (
            max(best.gold_at_std, second.gold_at_std)
            if not (math.isnan(best.gold_at_std) or math.isnan(second.gold_at_std))
            else math.nan
        )
        if math.isnan(spread):
            parts.append(
                f"Next: {second.label} ({fmt(second.gold_at)}); with one seed per reward model the gap can't be told "
                f"from seed noise."
            )
        elif best.gold_at - second.gold_at <= spread:
            parts.append(
                f"Next: {second.label} ({pm(second.gold_at, second.gold_at_std)}): the gap "
                f"({fmt(best.gold_at - second.gold_at)}) is within the seed spread, so these seeds do not separate "
                f"them."
            )
        else:
            parts.append(
                f"Next: {second.label} ({pm(second.gold_at, second.gold_at_std)}): the gap "
                f"({fmt(best.gold_at - second.gold_at)}) exceeds the seed spread."
            )
    for g in with_gold:
        hacked = g.verdicts.get("hacking", 0)
        collapsed = g.verdicts.get("collapsed", 0)
        if hacked:
            parts.append(
                f"{g.label}: the policy hacked it in {hacked} of {g.runs} runs (onset at steps "
                f"{', '.join(map(str, g.onsets))})."
            )
        if collapsed:
            parts.append(f"{g.label}: {collapsed} of {g.runs} runs collapsed (gold and proxy fell together).")
    spreads = [g for g in with_gold if not math.isnan(g.gold_curve_std)]
    if len(spreads) > 1:
        steady = min(spreads, key=lambda g: g.gold_curve_std)
        parts.append(f"Smallest seed-to-seed spread of the gold curve: {steady.label} ({fmt(steady.gold_curve_std)}).")
    return " ".join(parts)


def reward_model_differences(runs: list[Run], signals: dict[Path, Signal]) -> list[Difference]:
    """gold_difference for every pair of labels with gold scores and >= 2 seeds each, in first-seen order."""
    labels = [label for label in dict.fromkeys(r.label for r in runs)]
    groups = {label: [r for r in runs if r.label == label] for label in labels}
    usable = [
        label
        for label in labels
        if len(groups[label]) >= 2 and all(len(r.series("eval/gold_score")[0]) for r in groups[label])
    ]
    return [gold_difference(groups[a], groups[b], signals) for i, a in enumerate(usable) for b in usable[i + 1 :]]


def difference_blocks(differences: list[Difference]) -> list:
    if not differences:
        return []
    blocks: list = [("h2", "Reward models compared on gold")]
    header = [
        "A - B",
        "step",
        "gold difference",
        "95% interval",
        "seeds",
        "prompts",
        "seeds per model to resolve",
        "hacking rate A / B",
        "rate difference 95%",
    ]
    rows = [
        [
            f"{d.labels[0]} - {d.labels[1]}",
            str(d.step),
            f"{d.mean:+.4f}",
            f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]",
            f"{d.seeds[0]}+{d.seeds[1]}",
            str(d.prompts),
            "resolved"
            if d.seeds_to_resolve == 0
            else ("more prompts needed" if d.seeds_to_resolve is None else str(d.seeds_to_resolve)),
            f"{d.hacking_rate[0]:.2f} / {d.hacking_rate[1]:.2f}",
            f"[{d.hacking_diff_ci[0]:+.2f}, {d.hacking_diff_ci[1]:+.2f}]",
        ]
        for d in differences
    ]
    blocks.append(("table", header, rows))
    blocks.extend(("p", d.sentence()) for d in differences)
    blocks.append(
        (
            "p",
            "Intervals: bootstrap resampling the seeds of each reward model and, paired across both, the held-out "
            "prompts (each run's per-prompt scores of that evaluation). Seeds to resolve: the seed part of the "
            "variance shrinks with more seeds, the prompt part does not (rl/compare.py: gold_difference).",
        )
    )
    return blocks


def reward_blocks(cmp: RewardComparison, figure: Path, probe_file: str) -> list:
    blocks: list = [
        ("h2", "Reward models"),
        (
            "p",
            f"Probe set: {cmp.probe_pairs} non-tied pairs of {probe_file}; every checkpoint of every run scores the "
            f"same candidates.",
        ),
    ]
    header = [
        "reward model",
        "runs",
        "eval accuracy (mean ± std)",
        "eval accuracy range",
        "probe accuracy (mean ± std)",
        "Spearman within group",
    ]
    rows = [
        [
            g.label,
            str(g.runs),
            pm(g.accuracy_mean, g.accuracy_std),
            fmt(g.accuracy_range),
            pm(g.probe_accuracy_mean, g.probe_accuracy_std),
            fmt(g.agreement_within),
        ]
        for g in cmp.groups
    ]
    blocks.append(("table", header, rows))
    if all(g.runs == 1 for g in cmp.groups):
        blocks.append(
            (
                "p",
                "One run per setting: the seed-to-seed spread of accuracy and scores needs two or more runs under one "
                "label.",
            )
        )
    names = [f"{r.label} ({r.path.name})" for r in cmp.runs]
    header = ["Spearman / same order"] + names
    rows = [
        [names[i]] + [f"{fmt(cmp.agreement[i, j], 3)} / {fmt(cmp.same_order[i, j], 3)}" for j in range(len(names))]
        for i in range(len(names))
    ]
    blocks.append(("table", header, rows))
    header = ["run", "checkpoint step", "probe accuracy", "Spearman with final", "same order as final"]
    rows = [
        [names[i], str(d.step), fmt(d.probe_accuracy), fmt(d.spearman_final), fmt(d.same_order_final)]
        for i, drift in enumerate(cmp.drift)
        for d in drift
    ]
    blocks.append(("table", header, rows))
    blocks.append(("img", figure.name, "reward-model agreement and drift"))
    return blocks


def markdown(blocks: list) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            _, header, rows = block
            out.append(
                "\n".join(
                    ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                    + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
                )
            )
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list) -> str:
    out = [
        "<!doctype html><meta charset='utf-8'><title>jrm-edit run comparison</title>",
        "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            _, header, rows = block
            out.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                + "</table>"
            )
        elif kind == "img":
            out.append(f"<img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'>")
    return "\n".join(out) + "\n"


def _plain(value):
    """JSON-ready copies of the summaries (paths as text, nan as null)."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name not in ("rows", "config")
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def compare(
    run_args: list[str],
    out: str | Path,
    reward_args: list[str] = (),
    probe: str | None = None,
    probe_pairs: int = 200,
    window: int = 5,
    command: str = "",
) -> Path:
    """Write the report; returns the path of report.md."""
    if not run_args and not reward_args:
        raise CompareError("nothing to compare: give RL run folders and/or --reward-runs")
    if reward_args and not probe:
        raise CompareError("--reward-runs needs --probe PAIRS_FILE (e.g. the ShapeEdit data's test_iid.json)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks: list = [
        ("h1", "jrm-edit run comparison"),
        ("p", f"Written {time.strftime('%Y-%m-%d %H:%M')}" + (f" by: {command}" if command else "")),
    ]
    summary: dict = {}
    if run_args:
        runs = [load_run(path, label) for label, path in map(split_label, run_args)]
        summaries, signals = summarise(runs)
        blocks += rl_blocks(summaries, runs, signals, plot_runs(runs, signals, window, out))
        differences = reward_model_differences(runs, signals)
        blocks += difference_blocks(differences)
        summary["rl"] = {
            "groups": _plain(summaries),
            "runs": [{**_plain(r), "seed": r.seed, "signal": _plain(signals[r.path])} for r in runs],
            "differences": [{**_plain(d), "sentence": d.sentence()} for d in differences],
        }
    if reward_args:
        reward_runs = [load_reward_run(path, label) for label, path in map(split_label, reward_args)]
        cmp = compare_reward_runs(reward_runs, Probe.load(probe, probe_pairs))
        blocks += reward_blocks(cmp, plot_reward_models(cmp, out), probe)
        summary["reward_models"] = _plain(cmp)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(markdown(blocks))
    (out / "report.html").write_text(to_html(blocks))
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="*", help="RL run folders of launch/grpo_edit.py, as DIR or LABEL=DIR")
    parser.add_argument("--out", required=True, help="folder for report.md/.html, the PNGs and summary.json")
    parser.add_argument(
        "--reward-runs", nargs="+", default=[], help="run folders of reward/train.py, as DIR or LABEL=DIR"
    )
    parser.add_argument(
        "--probe",
        help=(
            "pairs file (EditReward-Data json) the reward models are compared on (default: none; --reward-runs needs "
            "one)"
        ),
    )
    parser.add_argument("--probe-pairs", type=int, default=200, help="non-tied probe pairs used")
    parser.add_argument(
        "--smooth", type=int, default=5, help="moving-average window of the per-step curves (figures only)"
    )
    args = parser.parse_args(argv)
    try:
        command = "python launch/compare_runs.py " + " ".join(sys.argv[1:] if argv is None else argv)
        report = compare(
            args.runs,
            args.out,
            args.reward_runs,
            args.probe,
            args.probe_pairs,
            args.smooth,
            command,
        )
    except (CompareError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report} (and report.html, curves.png, summary.json in {report.parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
