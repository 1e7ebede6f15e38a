"""Editing prompts for RL: (source image, instruction) pairs, read once and served in a seeded order.

Formats: a ShapeEdit `*_prompts.json` (rows with path_src and instruction, paths relative to its folder),
or a `.jsonl` with one {"source": image path, "instruction": text} per line (paths relative to the file).
The order is a fresh permutation per epoch drawn from (seed, epoch), so the prompts of step k depend on
k alone: a resumed run sees exactly the prompts the uninterrupted run saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reward.data import DataError, load_image


@dataclass
class Prompt:
    source: Image.Image  # RGB, at the policy's size
    instruction: str


def load_prompts(
    path: str | Path, height: int, width: int, limit: int = 0, skip_bad: bool = False
) -> tuple[list[Prompt], int]:
    """Read prompts, resizing sources to height x width (LANCZOS; ShapeEdit sources already fit).

    Returns (prompts, skipped): a bad row (missing fields, an unreadable source image) raises DataError naming
    the file and row, or with skip_bad is skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist (ShapeEdit: python -m reward.shapeedit generate --out DIR)")
    text = path.read_text()
    try:
        rows = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else json.loads(text)
        )
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: expected a non-empty list of prompts")
    prompts, skipped = [], 0
    for i, row in enumerate(rows):
        if limit and len(prompts) == limit:
            break
        try:
            prompts.append(_prompt(path, i, row, height, width))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    if not prompts:
        raise DataError(f"{path}: no usable prompt ({skipped} bad rows skipped)")
    return prompts, skipped


def _prompt(path: Path, i: int, row, height: int, width: int) -> Prompt:
    where = f"{path} row {i}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    source_key = "path_src" if "path_src" in row else "source"
    instruction = row.get("instruction")
    if source_key not in row or not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: needs a non-empty 'instruction' and 'path_src' (or 'source'); has {sorted(row)}")
    image = load_image(path.parent / row[source_key], where)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return Prompt(image, instruction)


def prompts_for_step(num_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the prompts of RL step `step` (epochs of seeded permutations, concatenated)."""
    out = []
    position = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, num_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        take = min(per_step - len(out), num_prompts - offset)
        out.extend(order[offset : offset + take].tolist())
        position += take
    return out
