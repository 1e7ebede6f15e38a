"""Generate a ShapeEdit dataset: preference pairs with critiques, policy triples and RL prompts.

    python -m reward.shapeedit generate --out data/shapeedit --pairs 10000 --seed 0

Writes, under --out:
  {split}.json          EditReward-Data pairs (`path1` preferred) + `rationale1/2` critiques + oracle scores
  {split}_triples.json  (source, instruction, target) for supervised policy pretraining
  {split}_prompts.json  (source, instruction) with the scene and edits, for RL and the oracle's gold score
  images/{split}/...    PNGs; every path in the json files is relative to --out
  meta.json             the generation settings and counts
Splits: train, val and test_iid share one distribution; test_heldout holds only instructions with a
held-out (family, kind, colour) composition (`edits.is_heldout`), none of which occur in the others.
The same settings give byte-identical output.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from reward.shapeedit.candidates import MODES, Candidate, make_candidate, render_candidate
from reward.shapeedit.critique import scores_1_to_4, write_critique
from reward.shapeedit.edits import Edit, composition_keys, is_heldout, sample_instruction
from reward.shapeedit.oracle import Reference, build_reference, judge
from reward.shapeedit.world import Scene, render, sample_scene

SPLITS = ("train", "val", "test_iid", "test_heldout")


@dataclass
class GenerateConfig:
    out: str
    """Output folder; must be empty or missing unless `overwrite`."""
    pairs: int = 10000
    """Total preference pairs over all splits."""
    seed: int = 0
    """Seed of everything: scenes, instructions, candidates, artifacts."""
    size: int = 64
    """Image side in pixels (at least 16)."""
    candidates: int = 4
    """Candidate edits per prompt (the correct one and failures); every pair of them is a preference pair."""
    val_fraction: float = 0.05
    """Fraction of prompts in the validation split."""
    test_iid_fraction: float = 0.05
    """Fraction of prompts in the in-distribution test split."""
    heldout_fraction: float = 0.05
    """Fraction of prompts in the held-out-composition test split."""
    compose_probability: float = 0.25
    """Probability that an instruction composes two atomic edits."""
    tie_eps: float = 0.02
    """Oracle overall scores closer than this make a tie pair."""
    overwrite: bool = False
    """Allow writing into a non-empty --out."""

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"pairs must be at least 1, got {self.pairs}")
        if not 16 <= self.size <= 1024:
            raise ValueError(f"size must be between 16 and 1024 pixels, got {self.size}")
        if not 2 <= self.candidates <= len(MODES):
            raise ValueError(f"candidates must be between 2 and {len(MODES)} (one per mode), got {self.candidates}")
        fractions = (self.val_fraction, self.test_iid_fraction, self.heldout_fraction)
        if any(f < 0 for f in fractions) or sum(fractions) >= 1:
            raise ValueError(f"split fractions must be >= 0 and leave room for train; got {fractions}")
        if not 0 <= self.compose_probability <= 1:
            raise ValueError(f"compose_probability must lie in [0, 1], got {self.compose_probability}")


def split_sizes(cfg: GenerateConfig) -> dict[str, int]:
    """Prompts per split; each prompt yields C(candidates, 2) pairs, the last one possibly fewer."""
    per_prompt = math.comb(cfg.candidates, 2)
    total = math.ceil(cfg.pairs / per_prompt)
    sizes = {
        "val": round(total * cfg.val_fraction),
        "test_iid": round(total * cfg.test_iid_fraction),
        "test_heldout": round(total * cfg.heldout_fraction),
    }
    sizes["train"] = total - sum(sizes.values())
    return {s: sizes[s] for s in SPLITS}


def _round(d: dict) -> dict:
    return {k: round(v, 6) for k, v in d.items()}


def _save_png(image: np.ndarray, out: Path, relative: str) -> str:
    Image.fromarray(image).save(out / relative, format="PNG", compress_level=1)
    return relative


@dataclass
class Prompt:
    """One (source, instruction) with its ranked candidates, before writing."""

    scene: Scene
    edits: tuple[Edit, ...]
    instruction: str
    heldout: bool
    candidates: list[Candidate]
    images: list[np.ndarray]  # uint8 (H, W, 3) per candidate; index 0 is the correct edit
    judgements: list  # oracle Judgement per candidate
    critiques: list[str]


@dataclass(frozen=True)
class Task:
    """One editing task: a source scene, its instruction, and the oracle's reference at one size."""

    scene: Scene
    edits: tuple[Edit, ...]
    instruction: str
    heldout: bool  # uses a (family, kind, colour) composition reserved for test_heldout
    reference: Reference


def sample_task(rng: np.random.Generator, size: int, compose_probability: float = 0.25) -> Task | None:
    """Draw a scene and an instruction whose every edit is visible at size x size, or None (draw again)."""
    scene = sample_scene(rng)
    drawn = sample_instruction(rng, scene, compose_probability)
    if drawn is None:
        return None
    edits, instruction = drawn
    try:
        reference = build_reference(scene, edits, size, size)
    except ValueError:  # an edit too small to see at this size
        return None
    heldout = any(is_heldout(k) for e in edits for k in composition_keys(scene, e))
    return Task(scene, edits, instruction, heldout, reference)


def make_prompt(rng: np.random.Generator, cfg: GenerateConfig) -> Prompt | None:
    """Sample one prompt and its candidates, or None when the draw cannot be used (then draw again)."""
    task = sample_task(rng, cfg.size, cfg.compose_probability)
    if task is None:
        return None
    scene, edits, instruction, reference = task.scene, task.edits, task.instruction, task.reference
    candidates = [make_candidate(rng, scene, edits, "correct")]
    images = [render_candidate(candidates[0], rng, cfg.size)]
    for mode in rng.permutation(list(MODES[1:])):
        if len(candidates) == cfg.candidates:
            break
        candidate = make_candidate(rng, scene, edits, str(mode))
        if candidate is None:
            continue
        image = render_candidate(candidate, rng, cfg.size)
        if np.array_equal(image, images[0]):
            continue  # the failure is invisible at this size
        candidates.append(candidate)
        images.append(image)
    if len(candidates) < cfg.candidates:
        return None
    judgements = [judge(reference, im) for im in images]
    critiques = [write_critique(scene, edits, c, j) for c, j in zip(candidates, judgements)]
    return Prompt(scene, edits, instruction, task.heldout, candidates, images, judgements, critiques)


def generate(cfg: GenerateConfig, progress: bool = True) -> dict:
    """Write the dataset described in the module docstring; returns the counts also written to meta.json.

    `progress`: a progress bar over the prompts, on stderr when it is a terminal.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"--out {out} is not empty; choose another folder or pass --overwrite")
    sizes = split_sizes(cfg)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    rows: dict[str, dict[str, list]] = {s: {"pairs": [], "triples": [], "prompts": []} for s in SPLITS}
    filled = dict.fromkeys(SPLITS, 0)
    pairs_left = cfg.pairs
    draws = 0
    bar = tqdm(
        total=sum(sizes.values()), desc="shapeedit prompts", unit="prompt", disable=None if progress else True
    )  # None: on a terminal only
    while sum(filled.values()) < sum(sizes.values()):
        draws += 1
        prompt = make_prompt(rng, cfg)
        if prompt is None:
            continue
        if prompt.heldout:
            split = "test_heldout"
        else:
            room = [s for s in SPLITS[:3] if filled[s] < sizes[s]]
            split = room[int(rng.integers(len(room)))] if room else "test_heldout"
            if split == "test_heldout":  # the iid splits are full; this draw would leak
                continue
        if filled[split] >= sizes[split]:
            continue
        index = filled[split]
        filled[split] += 1
        bar.update(1)
        pairs_left -= _write_prompt(out, split, index, prompt, rows[split], cfg, pairs_left)
    bar.close()

    for split in SPLITS:
        for kind, data in rows[split].items():
            name = f"{split}.json" if kind == "pairs" else f"{split}_{kind}.json"
            (out / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    meta = {
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out", "overwrite")},
        "prompts": {s: len(rows[s]["prompts"]) for s in SPLITS},
        "pairs": {s: len(rows[s]["pairs"]) for s in SPLITS},
        "ties": {s: sum(r["tie_case"] for r in rows[s]["pairs"]) for s in SPLITS},
        "draws": draws,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def _write_prompt(
    out: Path, split: str, index: int, prompt: Prompt, rows: dict, cfg: GenerateConfig, pairs_left: int
) -> int:
    """Save one prompt's images and rows; returns the number of pairs written."""
    prompt_id = f"{split}-{index:06d}"
    stem = f"images/{split}/{index:06d}"
    src = _save_png(render(prompt.scene, cfg.size), out, f"{stem}_src.png")
    paths = [_save_png(im, out, f"{stem}_c{i}.png") for i, im in enumerate(prompt.images)]
    edits = [e.to_dict() for e in prompt.edits]
    keys = [list(k) for e in prompt.edits for k in composition_keys(prompt.scene, e)]
    rows["triples"].append(
        {"prompt_id": prompt_id, "instruction": prompt.instruction, "path_src": src, "path_target": paths[0]}
    )
    rows["prompts"].append(
        {
            "prompt_id": prompt_id,
            "instruction": prompt.instruction,
            "path_src": src,
            "scene": prompt.scene.to_dict(),
            "edits": edits,
            "compositions": keys,
            "heldout": prompt.heldout,
        }
    )
    written = 0
    for a, b in itertools.combinations(range(len(prompt.candidates)), 2):
        if written == pairs_left:
            break
        ja, jb = prompt.judgements[a], prompt.judgements[b]
        first, second = (a, b) if ja.overall >= jb.overall else (b, a)
        row = {
            "id": f"{prompt_id}-{first}{second}",
            "prompt_id": prompt_id,
            "split": split,
            "prompt": prompt.instruction,
            "path_src": src,
        }
        for slot, i in (("1", first), ("2", second)):
            dim1, dim2 = scores_1_to_4(prompt.judgements[i])
            row[f"path{slot}"] = paths[i]
            row[f"model{slot}"] = prompt.candidates[i].mode
            row[f"model{slot}_dim1_score"] = dim1
            row[f"model{slot}_dim2_score"] = dim2
            row[f"model{slot}_overall_score"] = dim1 + dim2
            row[f"rationale{slot}"] = prompt.critiques[i]
            row[f"oracle{slot}"] = _round(prompt.judgements[i].to_dict())
        row["tie_case"] = bool(abs(ja.overall - jb.overall) < cfg.tie_eps)
        rows["pairs"].append(row)
        written += 1
    return written
