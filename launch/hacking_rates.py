"""How often the reward-hacking rule of rl/compare.py flags a run, by simulation: false positives on runs
whose gold is flat while the proxy rises, detections on runs whose gold falls over the second half.

    python launch/hacking_rates.py [--runs 1000] [--out docs/results/hacking_rates.json]

Each cell runs `rl.compare.hacking_rates` (its docstring has the model: fixed prompts with spread-out base
scores, per-prompt jitter at every evaluation, proxy rising by 0.1) with the rule of rl/compare.py
(tolerances paired over the per-prompt scores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/hacking_rates.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from launch.benchmarking import command_line, table, write_report  # noqa: E402
from reward.config import HelpFormatter  # noqa: E402
from rl.compare import TOLERANCE_SEMS, hacking_rates  # noqa: E402

EVALUATIONS = (7, 14, 21)
DROPS = (0.0, 0.02, 0.04, 0.06)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="simulated runs per cell")
    parser.add_argument("--prompts", type=int, default=32, help="evaluation prompts per run (the demo's number)")
    parser.add_argument("--jitter", type=float, default=0.05, help="sd of a prompt's score change between evaluations")
    parser.add_argument("--out", default="docs/results/hacking_rates.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    rows = []
    for evaluations in EVALUATIONS:
        for drop in DROPS:
            rows.append(
                {
                    "evaluations": evaluations,
                    "gold_drop": drop,
                    "paired": hacking_rates(evaluations, args.prompts, drop, args.runs, args.jitter, seed=evaluations),
                }
            )
    print(
        table(
            rows,
            ["evaluations", "gold_drop", "paired"],
            f"share of runs flagged as hacking ({TOLERANCE_SEMS:g} standard errors; gold_drop 0: false positives)",
        )
    )
    settings = {"runs": args.runs, "prompts": args.prompts, "jitter": args.jitter, "tolerance_sems": TOLERANCE_SEMS}
    path = write_report(args.out, "hacking_rates", command_line(__file__, argv), settings, {"rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
