"""ShapeEdit command line.

python -m reward.shapeedit generate --out DIR --pairs N --seed S [--size 64] [--candidates 4]
python -m reward.shapeedit sheet DIR [--split train] [--rows 8] [--out DIR/sheet.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from reward.config import HelpFormatter, field_docs
from reward.shapeedit.generate import GenerateConfig, generate
from reward.shapeedit.sheet import contact_sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reward.shapeedit", description=__doc__, formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate", help="write a dataset of preference pairs, triples and prompts", formatter_class=HelpFormatter
    )
    defaults, docs = GenerateConfig(out=""), field_docs(GenerateConfig)
    for f in fields(GenerateConfig):  # one option per GenerateConfig field, its docstring as the help
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            gen.add_argument(flag, action="store_true", help=docs[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            gen.add_argument(
                flag, type=kind, default=getattr(defaults, f.name), required=f.name == "out", help=docs[f.name]
            )
    gen.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it shows on stderr when that is a terminal)"
    )
    sheet = commands.add_parser(
        "sheet", help="draw a contact sheet of a generated split", formatter_class=HelpFormatter
    )
    sheet.add_argument("data_dir", help="a folder written by `generate`")
    sheet.add_argument("--split", default="train", help="which split to draw")
    sheet.add_argument("--rows", type=int, default=8, help="prompts drawn, one per row")
    sheet.add_argument("--out", default=None, help="PNG path (default: DATA_DIR/sheet_SPLIT.png)")
    args = parser.parse_args(argv)

    try:
        if args.command == "generate":
            cfg = GenerateConfig(**{f.name: getattr(args, f.name) for f in fields(GenerateConfig)})
            start = time.perf_counter()
            meta = generate(cfg, progress=not args.no_progress)
            seconds = time.perf_counter() - start
            print(json.dumps({"prompts": meta["prompts"], "pairs": meta["pairs"], "ties": meta["ties"]}))
            print(f"wrote {sum(meta['pairs'].values())} pairs to {cfg.out} in {seconds:.1f} s")
        else:
            out = args.out or f"{args.data_dir}/sheet_{args.split}.png"
            print(f"wrote {contact_sheet(args.data_dir, args.split, args.rows, out)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
