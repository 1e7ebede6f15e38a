"""Does a pretrained reward backbone know where things are? Both localisation probes, for several backbones.

    python launch/backbone_probe.py --backbone shipped=assets/reward_backbone --backbone mine=runs/backbone \
        --out docs/results/backbone_probe.json

Each backbone is a folder written by reward/pretrain_backbone.py (its `pretrain.json` says how it was trained).
On fresh "where is the ...?" questions about generated scenes (never the training ones) the probe measures:

- `locate_box_error`: the mean absolute error of greedy answers' box coordinates (0-1000 scale; 64 questions),
  beside `constant_box_error`, what always answering the mean box reaches;
- `locate_edge_errors`: with the true box given up to each edge, the distance from the most probable location
  token to the true edge (0-1000 scale; 256 questions), for ymin, xmin, ymax and xmax, their mean
  `locate_edge_error`, beside `constant_edge_error`, always answering each edge's mean.

Greedy answers can collapse onto a few likely boxes, so the first can sit above the constant while the
backbone has learnt a good deal; the second says which edges it has learnt: ymin and xmin place the object,
ymax and xmax follow from its size (docs/reward.md reads the results).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/backbone_probe.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from launch.benchmarking import named_folders, write_json
from reward.config import HelpFormatter
from reward.model import JRM, JRMArgs
from reward.pretrain_backbone import DONE_FILE, locate_edges, locate_error

COLUMNS = (
    ("family", "family"),
    ("patch", "patch"),
    ("steps", "steps"),
    ("tasks", "tasks"),
    ("final_loss", "final loss"),
    ("locate_edge_errors", "edge error ymin / xmin / ymax / xmax"),
    ("constant_edge_errors", "constant answer"),
    ("locate_edge_error", "mean"),
    ("constant_edge_error", "constant"),
    ("locate_box_error", "greedy box error"),
    ("constant_box_error", "constant answer"),
)


def probe(path: str | Path, image_size: int, seed: int) -> dict:
    """How the backbone in `path` was trained (from its pretrain.json) and both probes measured now."""
    record = json.loads((Path(path) / DONE_FILE).read_text())
    settings = record["settings"]
    model = JRM.build(JRMArgs(backbone=str(path)), seed=seed)
    row = {
        "path": str(path),
        "family": model.backbone.config.model_type,
        "patch": model.backbone.config.vision_config.patch_size,
        "steps": settings["trainer"].get("max_steps"),
        "tasks": ",".join(settings["tasks"]),
        "final_loss": record["final_loss"],
    }
    row.update(locate_edges(model, image_size, seed))
    row.update(locate_error(model, image_size, seed))
    return row


def markdown(report: dict) -> str:
    lines = [
        "| backbone | " + " | ".join(title for _, title in COLUMNS) + " |",
        "| --- |" + " --- |" * len(COLUMNS),
    ]
    for name, row in report["backbones"].items():
        cells = []
        for key, _ in COLUMNS:
            value = row[key]
            if value is None:  # no loss logged (fewer steps than logging_steps), no parsable greedy box
                cells.append("–")
            elif key == "final_loss":
                cells.append(f"{value:.3f}")
            elif key.endswith("_errors"):
                cells.append(" / ".join(f"{v:.0f}" for v in value))
            elif key.endswith("_error"):
                cells.append(f"{value:.0f}")
            elif key == "steps":
                cells.append(f"{value:,}")
            else:
                cells.append(str(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--backbone",
        action="append",
        required=True,
        help="NAME=DIR of a backbone saved by reward/pretrain_backbone.py (repeat for several)",
    )
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated scenes, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seeds the questions, the same for every backbone")
    parser.add_argument("--out", default="", help="write the report here as JSON ('' = print only)")
    args = parser.parse_args(argv)
    backbones = named_folders(parser, "--backbone", args.backbone, DONE_FILE, "a pretrained backbone")
    report = {"image_size": args.image_size, "seed": args.seed, "backbones": {}}
    for name, path in backbones.items():
        report["backbones"][name] = probe(path, args.image_size, args.seed)
    print(markdown(report))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
