"""Contact sheet of a ShapeEdit split: source, instruction, and candidates ranked by the oracle.

python -m reward.shapeedit sheet DATA_DIR --split train --rows 8 --out sheet.png
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL = 128  # pixels per image on the sheet
PAD = 6
TEXT = 16


def contact_sheet(data_dir: str | Path, split: str = "train", rows: int = 8, out: str | Path = "sheet.png") -> Path:
    """Draw the first `rows` prompts of a split; returns the PNG path."""
    data_dir = Path(data_dir)
    pairs = json.loads((data_dir / f"{split}.json").read_text())
    prompts: dict[str, dict] = {}
    for row in pairs:
        p = prompts.setdefault(row["prompt_id"], {"instruction": row["prompt"], "src": row["path_src"], "cands": {}})
        for slot in ("1", "2"):
            p["cands"][row[f"path{slot}"]] = (row[f"model{slot}"], row[f"oracle{slot}"]["overall"])
        if len(prompts) > rows:
            break
    chosen = list(prompts.values())[:rows]
    if not chosen:
        raise ValueError(f"{data_dir / f'{split}.json'} has no pairs to draw")
    columns = 1 + max(len(p["cands"]) for p in chosen)
    row_h = TEXT + CELL + TEXT + PAD
    sheet = Image.new("RGB", (PAD + columns * (CELL + PAD), PAD + len(chosen) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for r, p in enumerate(chosen):
        y = PAD + r * row_h
        draw.text((PAD, y), p["instruction"], fill=(0, 0, 0), font=font)
        ranked = sorted(p["cands"].items(), key=lambda kv: -kv[1][1])
        cells = [(p["src"], "source")] + [(path, f"{mode} {score:.2f}") for path, (mode, score) in ranked]
        for c, (path, caption) in enumerate(cells):
            x = PAD + c * (CELL + PAD)
            image = Image.open(data_dir / path).convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
            sheet.paste(image, (x, y + TEXT))
            draw.text((x, y + TEXT + CELL + 2), caption, fill=(0, 0, 0), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
