"""Measure the ShapeEdit reward models over seeds: the JRM, its lambda = 0 ablation and the trained generative judge.

    python launch/jrm_shapeedit.py                      # 3 seeds each; writes docs/results/jrm_shapeedit.json
    python launch/jrm_shapeedit.py --ablation --seeds 0 --steps 800  # one seed per cell: docs/results/jrm_ablation.json
    python launch/jrm_shapeedit.py --seeds 0 --steps 100 --pretrain-steps 50 --out /tmp/x --json /tmp/x.json   # smoke

One ShapeEdit dataset (10,000 pairs, seed 0) and one pretrained backbone (reward/pretrain_backbone.py) are
made once and shared by every run, so the reward models differ only in their objective and seed. Each run
is reward/train.py (or reward/train_generative.py) as its own process, timed; each model is then judged by
reward/evaluate.py's `evaluate` on test_iid and test_heldout: accuracy over strict pairs with score ties
wrong, by the rejected candidate's failure mode, the effective rank of the score-token features in both
conventions (p_i = s_i / sum s and s_i^2 / sum s^2), and scoring pairs per second.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/jrm_shapeedit.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from launch.benchmarking import comma_list, command_line, machine, table
from reward.config import HelpFormatter
from reward.evaluate import evaluate
from reward.model import JRM, JRMArgs
from reward.pretrain_backbone import locate_error
from reward.shapeedit import GenerateConfig, generate

ROOT = Path(__file__).resolve().parents[1]
JRM_ALPHA = 0.7
"""The paper's weighting, L = 0.3 L_rank + 0.7 L_LM."""
OBJECTIVES = {
    "jrm": [f"loss.alpha={JRM_ALPHA}", "loss.ranking=uncertainty", "model.uncertainty=true"],
    "lambda0": ["loss.alpha=0", "loss.ranking=uncertainty", "model.uncertainty=true"],
}
ABLATIONS = {
    "jrm (grounded critiques, pretrained backbone, uncertainty ranking, alpha 0.7)": ("jrm", []),
    "without the pretrained backbone (random init)": ("jrm", ["model.backbone=tiny"]),
    "without grounding (boxes and region tags cut from the critiques)": ("jrm", ["plain"]),
    "Bradley-Terry ranking instead of uncertainty": ("jrm", ["loss.ranking=bt", "model.uncertainty=false"]),
    "alpha 1/3 instead of 0.7": ("jrm", ["loss.alpha=0.3333"]),
    "lambda = 0 (no critiques)": ("lambda0", []),
}
GROUNDING = re.compile(r"Regions:[^\n]*\n|; now at (?:<\|loc_\d+\|>){4}|<\|(?:bbox_\d+|global)\|> ")
"""What the ablation without grounding cuts from a critique: the region list, the boxes and the region tags."""


def run(cmd: list[str]) -> float:
    """Run one stage as its own process; returns its wall-clock seconds."""
    print("\n$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def plain_copy(data: Path) -> Path:
    """The training and validation pairs with the critiques' grounding cut out (the ablation's data)."""
    for split in ("train", "val"):
        rows = json.loads((data / f"{split}.json").read_text())
        for row in rows:
            for key in ("rationale1", "rationale2"):
                row[key] = GROUNDING.sub("", row[key])
        (data / f"{split}_plain.json").write_text(json.dumps(rows))
    return data / "train_plain.json"


def judge(label: str, run_dir: Path, data: Path) -> dict:
    """Accuracies, by-mode accuracies, effective ranks and speed of one trained reward model."""
    kind = "generative" if label == "generative" else "jrm"
    benchmarks = [f"shapeedit:{data / 'test_iid.json'}", f"shapeedit:{data / 'test_heldout.json'}"]
    iid, heldout = evaluate(
        f"{kind}:{run_dir / 'final'}", benchmarks, run_dir / "eval", batch_size=32, erank=kind == "jrm", device="cpu"
    )
    modes = {
        key.removeprefix("vs_").removesuffix("/accuracy"): value for key, value in iid.items() if key.startswith("vs_")
    }
    seconds = iid["scoring_seconds"] + heldout["scoring_seconds"]
    return {
        "test_iid": iid["accuracy"],
        "test_heldout": heldout["accuracy"],
        "by_mode": modes,
        "erank_s": iid.get("effective_rank"),
        "erank_s2": iid.get("effective_rank_s2"),
        "pairs_per_s": round((iid["comparisons"] + heldout["comparisons"]) / seconds, 2),
    }


def train(label: str, seed: int, run_dir: Path, data: Path, backbone: Path, steps: int, extra: list[str]) -> float:
    train_file = plain_copy(data) if "plain" in extra else data / "train.json"
    eval_file = data / ("val_plain.json" if "plain" in extra else "val.json")
    script = "reward/train_generative.py" if label == "generative" else "reward/train.py"
    cmd = [sys.executable, script, f"output_dir={run_dir}", "resume=none", f"seed={seed}", f"model.backbone={backbone}",
           f"data.train={train_file}", f"data.eval={eval_file}", "trainer.report_to=[]",
           f"trainer.max_steps={steps}", "trainer.disable_tqdm=true"]  # fmt: skip
    cmd += OBJECTIVES.get(label, []) + [o for o in extra if o != "plain"]
    return run(cmd)


def summary(rows: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of each figure."""
    out = {}
    for key in ("test_iid", "test_heldout", "erank_s", "erank_s2", "pairs_per_s", "train_seconds"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"),
            }
    modes = rows[0]["by_mode"].keys()
    out["by_mode"] = {m: float(np.mean([r["by_mode"][m] for r in rows])) for m in modes}
    return out


T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
"""Student's t 97.5% quantiles for 1-10 degrees of freedom (two-sided 95% intervals)."""


def difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% Welch interval (seeds as independent samples); needs >= 2 of each."""
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    t = (
        T_975[max(1, min(int(df), len(T_975))) - 1] if df < len(T_975) + 1 else 1.96 + 2.5 / df
    )  # close to t above 10 df
    half = t * float(np.sqrt(va + vb))
    mean = float(a.mean() - b.mean())
    return mean, mean - half, mean + half


def pct(value: float | None) -> str:
    return "–" if value is None or value != value else f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    """The docs' tables for a report: mean +/- std over seeds per reward model, then by failure mode (test_iid).

    docs/results.md holds exactly this text for the committed JSON (a test checks it).
    """
    models = [m for m in ("jrm", "lambda0", "generative") if m in report]
    lines = [
        "| reward model | seeds | test_iid | test_heldout | erank (s / s^2) | scoring pairs/s | training time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in models:
        s = report[f"{m}_summary"]
        rows = report[m]
        erank = f"{s['erank_s']['mean']:.1f} / {s['erank_s2']['mean']:.1f}" if "erank_s" in s else "–"
        lines.append(
            f"| {m} | {len(rows)} | {pct(s['test_iid']['mean'])} ± {pct(s['test_iid']['std'])} | "
            f"{pct(s['test_heldout']['mean'])} ± {pct(s['test_heldout']['std'])} | {erank} | "
            f"{s['pairs_per_s']['mean']:.0f} | {s['train_seconds']['mean'] / 60:.1f} min |"
        )
    if "jrm" in report and "lambda0" in report and min(len(report["jrm"]), len(report["lambda0"])) >= 2:
        lines.append("")
        for split in ("test_iid", "test_heldout"):
            mean, low, high = difference([r[split] for r in report["jrm"]], [r[split] for r in report["lambda0"]])
            verdict = "resolved" if low > 0 or high < 0 else "not resolved"
            lines.append(
                f"jrm - lambda0 on {split}: {100 * mean:+.1f} points, 95% interval [{100 * low:+.1f}, "
                f"{100 * high:+.1f}] ({verdict}).  "
            )
    modes = list(report[f"{models[0]}_summary"]["by_mode"])
    lines += ["", "| reward model | " + " | ".join(modes) + " |", "| --- |" + " --- |" * len(modes)]
    for m in models:
        by_mode = report[f"{m}_summary"]["by_mode"]
        lines.append(f"| {m} | " + " | ".join(pct(by_mode[k]) for k in modes) + " |")
    return "\n".join(lines) + "\n"


def ablation_markdown(report: dict) -> str:
    """The ablation table (one seed per cell) for docs/results.md."""
    cells = report["cells"]
    modes = list(next(iter(cells.values()))["by_mode"])
    lines = [
        "| cell | test_iid | test_heldout | " + " | ".join(modes) + " |",
        "| --- | --- | --- |" + " --- |" * len(modes),
    ]
    for name, c in cells.items():
        lines.append(
            f"| {name} | {pct(c['test_iid'])} | {pct(c['test_heldout'])} | "
            + " | ".join(pct(c["by_mode"][k]) for k in modes)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the main table needs >= 3)")
    parser.add_argument("--models", default="jrm,lambda0,generative", help="which reward models to train")
    parser.add_argument("--steps", type=int, default=1600, help="training steps of each reward model")
    parser.add_argument("--generative-steps", type=int, default=1600, help="training steps of the generative judge")
    parser.add_argument(
        "--pretrain-steps", type=int, default=1200, help="steps of the backbone's grounding pretraining"
    )
    parser.add_argument("--out", default="runs/jrm_shapeedit", help="folder for the data, the backbone and every run")
    parser.add_argument(
        "--json", default=None, help="report path (default docs/results/jrm_shapeedit.json, or jrm_ablation.json)"
    )
    parser.add_argument("--ablation", action="store_true", help="one seed per ablation cell instead of the seed table")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d+(,\d+)*", args.seeds):
        parser.error(f"--seeds: expected comma-separated integers >= 0, got {args.seeds!r}")
    seeds = [int(s) for s in args.seeds.split(",")]
    models = comma_list(parser, "--models", args.models, ["jrm", "lambda0", "generative"])
    out = Path(args.out)
    report_path = Path(args.json or f"docs/results/{'jrm_ablation' if args.ablation else 'jrm_shapeedit'}.json")

    data = out / "data"
    if not (data / "meta.json").is_file():
        generate(GenerateConfig(out=str(data), pairs=10000, seed=0, overwrite=True))
    backbone = out / "backbone"
    run([sys.executable, "-m", "reward.pretrain_backbone", f"output_dir={backbone}",
                            f"trainer.max_steps={args.pretrain_steps}", "trainer.disable_tqdm=true"])  # fmt: skip
    pretrain_record = json.loads((backbone / "pretrain.json").read_text())

    report: dict = {
        "command": command_line(__file__, argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "settings": {
            "data": "ShapeEdit, 10,000 pairs, seed 0, 64x64",
            "steps": args.steps,
            "generative_steps": args.generative_steps,
            "pretrain_steps": args.pretrain_steps,
            "jrm_alpha": JRM_ALPHA,
            "objectives": OBJECTIVES,
        },  # fmt: skip
        "backbone": {
            "pretrain_seconds": pretrain_record["seconds"],
            "final_loss": pretrain_record["final_loss"],
            **locate_error(JRM.build(JRMArgs(backbone=str(backbone))), 64, seed=0),
        },  # fmt: skip
    }
    rows = []
    if args.ablation:
        cells = {}
        for name, (label, extra) in ABLATIONS.items():
            run_dir = out / "ablation" / re.sub(r"\W+", "_", name)[:40]
            seconds = train(label, seeds[0], run_dir, data, backbone, args.steps, extra)
            cells[name] = dict(judge(label, run_dir, data), train_seconds=round(seconds, 1), seed=seeds[0])
            rows.append(
                {"cell": name, **{k: v for k, v in cells[name].items() if k != "by_mode"}, **cells[name]["by_mode"]}
            )
        report["cells"] = cells
    else:
        for label in models:
            report[label] = []
            for seed in seeds:
                run_dir = out / f"{label}_seed{seed}"
                steps = args.generative_steps if label == "generative" else args.steps
                seconds = train(label, seed, run_dir, data, backbone, steps, [])
                result = dict(seed=seed, **judge(label, run_dir, data), train_seconds=round(seconds, 1))
                report[label].append(result)
                rows.append(
                    {"model": label, **{k: v for k, v in result.items() if k != "by_mode"}, **result["by_mode"]}
                )
            report[f"{label}_summary"] = summary(report[label])
    print(table(rows, list(rows[0]) if rows else []))
    print(ablation_markdown(report) if args.ablation else markdown(report))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
