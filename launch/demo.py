"""The project's main job on its embedded default: ShapeEdit on CPU.

    make demo            # or: python launch/demo.py [--quick] [--out runs/demo]

Stage 1 (this issue): generate a ShapeEdit dataset, print its summary, draw a contact sheet of sources,
instructions and oracle-ranked candidates. Later stages (train JRM, pretrain the policy, GRPO as a Ray
job, stability report) extend this same script.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/demo.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder (its data/ is regenerated)")
    parser.add_argument("--quick", action="store_true", help="a smaller dataset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = Path(args.out)
    data_dir = out / "data"
    # ---- 1. ShapeEdit data -------------------------------------------------------------------------
    if data_dir.exists():
        shutil.rmtree(data_dir)
    start = time.perf_counter()
    generate(GenerateConfig(out=str(data_dir), pairs=2000 if args.quick else 10000, seed=args.seed))
    print(f"\nShapeEdit data generated in {time.perf_counter() - start:.1f} s\n")
    print(summarise(data_dir))
    sheet = contact_sheet(data_dir, "train", rows=8, out=out / "contact_sheet.png")

    print("\nOutputs:")
    print(f"  data         {data_dir}/  (train/val/test_iid/test_heldout .json, *_triples.json, *_prompts.json)")
    print(f"  contact sheet {sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
