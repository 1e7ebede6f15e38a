"""Comparisons of an editor's own samples, labelled by the oracle: reward data on the distribution RL scores.

The candidate pairs of `generate` are built edits with known failure modes; an editing policy's samples are
pixels. For several samples of one prompt, `label_samples` judges each with the oracle, writes a grounded
critique read off the pixels (`sample_critique`), and returns every pair in the EditReward-Data format of
`generate` (ties by its rule), each row marked `"origin": "policy"`. launch/policy_pairs.py samples a policy
and writes them; reward/train.py mixes them with the candidate pairs (`data.mix`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from reward.data import load_image
from reward.shapeedit.critique import (
    GLOBAL_TAG,
    REGION_TAGS,
    box,
    box_text,
    name,
    request,
    scores_1_to_4,
    status,
    verdict,
)
from reward.shapeedit.edits import ADDED_ID, Edit, apply_edits
from reward.shapeedit.oracle import Judgement, Reference, _dilate, build_reference, closeness, judge, to_array
from reward.shapeedit.world import Scene, shape_mask

DAMAGED = 0.2
"""Share of an untouched object's pixels, or of a typical shape's area of background, that must have lost their
colour for the critique to name the damage."""
CLEAN = 0.9
"""Quality from which the critique calls the image clean."""


def pixel_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding box of a (H, W) bool mask as (ymin, xmin, ymax, xmax) on the 0-1000 scale."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (
        round(1000 * ys.min() / h),
        round(1000 * xs.min() / w),
        round(1000 * (ys.max() + 1) / h),
        round(1000 * (xs.max() + 1) / w),
    )


def sample_critique(source: Scene, edits: tuple[Edit, ...], reference: Reference, image, judgement: Judgement) -> str:
    """A grounded critique of any edited image, in the form of `critique.write_critique`: the regions the
    instruction names (boxes where the source has them, or where the instruction puts an added shape), then the
    untouched objects that lost their colour and the background that was painted over (boxes of those pixels),
    one statement per region, the whole image under <|global|>, and the oracle's verdict. It states only what the
    pixels show: how much of each asked edit was done, which objects and how much background changed unasked.

    Args:
        reference: `build_reference(source, edits, H, W)` at the image's size.
        image: the edited image (PIL or (H, W, 3) array).
        judgement: `judge(reference, image)`.
    """
    h, w = reference.target.shape[:2]
    close = closeness(reference, image)
    wanted = apply_edits(source, edits)
    changed = np.logical_or.reduce(reference.edit_masks)
    lines_for: dict[int, list[str]] = {}
    shown: list[tuple[str, str]] = []  # (box text, words) per region, in order
    for e, score in zip(edits, judgement.following_per_edit):
        for i in [ADDED_ID] if e.family == "add" else [e.target, e.other]:
            if i is None:
                continue
            if i not in lines_for:
                lines_for[i] = []
                s = source.shape(i) if any(t.id == i for t in source.shapes) else wanted.shape(i)
                words = name(source, s) if i != ADDED_ID else f"{s.colour} {s.kind} to add"
                shown.append((box_text(box(s)), words))
            lines_for[i].append(f"asked to {request(source, e)}: {status(score)}")
    statements = [f"the {words}: " + "; ".join(lines_for[i]) for (_, words), i in zip(shown, lines_for)]
    named = set(lines_for)
    damaged = []
    for s in source.shapes:
        mask = shape_mask(s, h, w) & ~changed
        if s.id in named or not mask.any():
            continue
        lost = 1.0 - float(close[mask].mean())
        if lost >= DAMAGED:
            damaged.append(s)
            shown.append((box_text(box(s)), name(source, s)))
            statements.append(f"the {name(source, s)}: not asked; {round(100 * lost)}% of it lost its colour")
    # background that lost its colour, away from every shape's edge (a soft edge is quality's business, not paint)
    outlines = np.zeros((h, w), dtype=bool)
    for scene in (source, wanted):
        for shape in scene.shapes:
            mask = shape_mask(shape, h, w)
            outlines |= _dilate(mask, 1) & ~_dilate(~mask, 1) if mask.any() else False
    painted = reference.background_mask & (close < 0.5) & ~_dilate(outlines, 2)
    touched = painted.sum() >= DAMAGED * reference.blob_area
    if touched:
        shown.append((box_text(pixel_box(painted)), "background"))
        statements.append(f"part of the background: not asked; {int(painted.sum())} pixels painted over")
    shown, statements = shown[: len(REGION_TAGS)], statements[: len(REGION_TAGS)]
    lines = [
        "Regions: " + (" ".join(f"{REGION_TAGS[k]} {b}" for k, (b, _) in enumerate(shown)) if shown else "none") + "."
    ]
    lines += [f"{REGION_TAGS[k]} {text}." for k, text in enumerate(statements)]
    glob = [
        f"asked to {request(source, e)}: {status(score)}"
        for e, score in zip(edits, judgement.following_per_edit)
        if e.family == "background"
    ]
    if not any(e.family == "background" for e in edits):
        glob.append(
            "parts of the background were painted over" if touched else f"the background is still {source.background}"
        )
    others = [s for s in source.shapes if s.id not in named and s not in damaged]
    if others:
        glob.append(
            "the other shapes kept their colours"
            if len(others) > 1
            else f"the {name(source, others[0])} kept its colours"
        )
    artifacts = (
        "The image is clean and sharp."
        if judgement.quality >= CLEAN
        else "The image is not clean: its colours leave the palette (noise, blur or a cast)."
    )
    lines.append(f"{GLOBAL_TAG} " + "; ".join(glob) + ". " + artifacts)
    lines.append(verdict(judgement))
    return "\n".join(lines)


def label_samples(
    prompt: dict, images: list, out: Path, stem: str, split: str, tie_eps: float = 0.02, min_gap: float = 0.0
) -> tuple[list[dict], list[Judgement]]:
    """Judge the samples of one prompt, save them as PNGs and return every pair of distinct samples as an
    EditReward-Data row (the better-judged first, `tie_case` when their overall scores differ by less than
    `tie_eps`, as `generate` does), with the oracle's scores and critiques, marked `"origin": "policy"`. Pairs
    whose overall scores differ by less than `min_gap` are left out (0: every pair).

    Args:
        prompt: a row of `{split}_prompts.json` (prompt_id, instruction, path_src, scene, edits).
        images: the samples (PIL or (H, W, 3) arrays), all of the source's size.
        out: the folder the pairs file will be in; image paths are relative to it.
        stem: where the samples go under `out` (e.g. "images/policy_train/000012"), suffixed _s{k}.png.
    Returns:
        (the pair rows, the judgement of every sample)
    """
    source = Scene.from_dict(prompt["scene"])
    edits = tuple(Edit.from_dict(e) for e in prompt["edits"])
    if len(images) < 2:
        raise ValueError(f"{prompt['prompt_id']}: pairs need at least 2 samples, got {len(images)}")
    arrays = [to_array(im) for im in images]
    h, w = arrays[0].shape[:2]
    sizes = {a.shape[:2] for a in arrays}
    source_size = load_image(out / prompt["path_src"], prompt["prompt_id"]).size[::-1]
    if sizes != {source_size}:
        raise ValueError(
            f"{prompt['prompt_id']}: samples of sizes {sorted(sizes)} for a source of {source_size}: edit at the "
            f"data's size (the oracle judges against its renders)"
        )
    reference = build_reference(source, edits, h, w)
    judgements = [judge(reference, a) for a in arrays]
    critiques = [sample_critique(source, edits, reference, a, j) for a, j in zip(arrays, judgements)]
    paths = []
    for k, a in enumerate(arrays):
        path = f"{stem}_s{k}.png"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(a * 255).astype(np.uint8)).save(out / path)
        paths.append(path)
    rows = []
    for a, b in itertools.combinations(range(len(arrays)), 2):
        if np.array_equal(arrays[a], arrays[b]):
            continue  # one edit twice: no comparison
        if abs(judgements[a].overall - judgements[b].overall) < min_gap:
            continue
        first, second = (a, b) if judgements[a].overall >= judgements[b].overall else (b, a)
        row = {
            "id": f"{prompt['prompt_id']}-s{first}s{second}",
            "prompt_id": prompt["prompt_id"],
            "split": split,
            "origin": "policy",
            "prompt": prompt["instruction"],
            "path_src": prompt["path_src"],
        }
        for slot, i in (("1", first), ("2", second)):
            dim1, dim2 = scores_1_to_4(judgements[i])
            row[f"path{slot}"] = paths[i]
            row[f"model{slot}"] = "policy"
            row[f"model{slot}_dim1_score"] = dim1
            row[f"model{slot}_dim2_score"] = dim2
            row[f"model{slot}_overall_score"] = dim1 + dim2
            row[f"rationale{slot}"] = critiques[i]
            row[f"oracle{slot}"] = {k: round(v, 4) for k, v in judgements[i].to_dict().items()}
        row["tie_case"] = bool(abs(judgements[a].overall - judgements[b].overall) < tie_eps)
        rows.append(row)
    return rows, judgements
