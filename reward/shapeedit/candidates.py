"""Candidate edits for a (source, instruction): the correct one and realistic failure modes.

Scene-level failures (the edit applied to the wrong object, with the wrong value, only in part, or with
extra unrequested changes, or not at all) and pixel-level artifacts on top of a correct edit (noise,
blur, colour shift). Each candidate keeps the scene it shows, so a critique can describe it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from reward.shapeedit.edits import (
    ADDED_ID,
    SIZE_ORDER,
    Edit,
    apply_edit,
    apply_edits,
    edit_fits,
    sample_edit,
    touched_ids,
)
from reward.shapeedit.world import (
    BACKGROUND_COLOURS,
    KINDS,
    REGIONS,
    SHAPE_COLOURS,
    SIZES,
    Scene,
    fits,
    render,
    size_name,
)

MODES = (
    "correct",
    "not_applied",
    "wrong_object",
    "wrong_attribute",
    "partial",
    "over_edit",
    "noise",
    "blur",
    "colour_shift",
)
ARTIFACTS = ("noise", "blur", "colour_shift")


@dataclass(frozen=True)
class Candidate:
    mode: str  # one of MODES
    scene: Scene  # what the candidate shows, before any artifact
    artifact: str | None = None  # one of ARTIFACTS, applied to the rendered scene
    strength: float = 0.0  # noise std, blur radius (in pixels at 64 px) or largest channel shift


def _wrong_object(source: Scene, edit: Edit, avoid: set[int]) -> Edit | None:
    if edit.target is None:
        return None
    others = [s for s in source.shapes if s.id not in avoid | touched_ids(edit, source)]
    # Prefer a distractor: a shape that shares the target's kind or colour.
    t = source.shape(edit.target)
    others.sort(key=lambda s: (s.kind != t.kind and s.colour != t.colour, s.id))
    for other in others:
        if edit.family == "recolour" and other.colour == edit.colour:
            continue
        if edit.family == "resize" and other.size == edit.size:
            continue
        wrong = replace(edit, target=other.id)
        if edit.family == "swap" and (other.kind, other.colour, other.size) == (
            source.shape(edit.other).kind,
            source.shape(edit.other).colour,
            source.shape(edit.other).size,
        ):
            continue
        if edit_fits(source, wrong):
            return wrong
    return None


def _wrong_attribute(rng: np.random.Generator, source: Scene, edit: Edit) -> Edit | None:
    f = edit.family
    if f == "recolour":
        old = source.shape(edit.target).colour
        return replace(edit, colour=_choice(rng, [c for c in SHAPE_COLOURS if c not in (old, edit.colour)]))
    if f == "background":
        return replace(
            edit, colour=_choice(rng, [c for c in BACKGROUND_COLOURS if c not in (source.background, edit.colour)])
        )
    if f == "add":
        if rng.random() < 0.5:
            return replace(edit, colour=_choice(rng, [c for c in SHAPE_COLOURS if c != edit.colour]))
        return replace(edit, kind=_choice(rng, [k for k in KINDS if k != edit.kind]))
    if f == "move":
        here = source.shape(edit.target)
        options = [r for r in REGIONS if r != edit.region and REGIONS[r] != (here.x, here.y)]
        for r in rng.permutation(options):
            wrong = replace(edit, region=str(r))
            if edit_fits(source, wrong):
                return wrong
        return None
    if f == "resize":
        # The other direction, or two steps in the asked direction when there is no other.
        old = SIZE_ORDER.index(size_name(source.shape(edit.target).size))
        asked = SIZE_ORDER.index(size_name(edit.size))
        for level in (old - (asked - old), asked + (asked - old)):
            if 0 <= level < len(SIZE_ORDER) and level != old:
                wrong = replace(edit, size=SIZES[SIZE_ORDER[level]])
                if edit_fits(source, wrong):
                    return wrong
        return None
    return None  # remove and swap have no attribute to get wrong


def _halfway(target: Scene, source: Scene, edit: Edit) -> Scene | None:
    """The target with `edit` carried only half-way (move, resize); None for other families."""
    if edit.family not in ("move", "resize"):
        return None
    before, after = source.shape(edit.target), target.shape(edit.target)
    if edit.family == "resize":
        return target.replaced(replace(after, size=(before.size + after.size) / 2))
    return target.replaced(after.moved((before.x + after.x) / 2, (before.y + after.y) / 2))


def _choice(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _valid(scene: Scene) -> bool:
    return all(fits(s, scene.shapes) for s in scene.shapes)


def make_candidate(rng: np.random.Generator, source: Scene, edits: tuple[Edit, ...], mode: str) -> Candidate | None:
    """One candidate of `mode` for the instruction `edits` on `source`, or None where the mode does not apply.

    In a composition, the scene-level failures spoil one of the atomic edits and apply the other.
    """
    target = apply_edits(source, edits)
    k = int(rng.integers(len(edits)))
    scene: Scene | None = None
    if mode == "correct":
        return Candidate(mode, target)
    if mode == "not_applied":
        return Candidate(mode, source)
    if mode == "noise":
        return Candidate(mode, target, "noise", float(rng.uniform(0.05, 0.12)))
    if mode == "blur":
        return Candidate(mode, target, "blur", float(rng.uniform(0.6, 1.2)))
    if mode == "colour_shift":
        return Candidate(mode, target, "colour_shift", float(rng.uniform(0.1, 0.25)))
    if mode in ("wrong_object", "wrong_attribute"):
        avoid = set().union(*(touched_ids(e, source) for i, e in enumerate(edits) if i != k))
        wrong = (
            _wrong_object(source, edits[k], avoid)
            if mode == "wrong_object"
            else _wrong_attribute(rng, source, edits[k])
        )
        if wrong is not None:
            scene = apply_edits(source, edits[:k] + (wrong,) + edits[k + 1 :])
    elif mode == "partial":
        if len(edits) == 2:
            scene = apply_edits(source, edits[:k] + edits[k + 1 :])
        else:
            scene = _halfway(target, source, edits[0])
    elif mode == "over_edit":
        avoid = set().union(*(touched_ids(e, source) for e in edits)) | {ADDED_ID}
        family = _choice(rng, ["recolour", "remove", "move", "resize"])
        extra = sample_edit(rng, target, family, avoid)
        if extra is None and not any(e.family == "background" for e in edits):
            extra = sample_edit(rng, target, "background", avoid)
        if extra is not None:
            scene = apply_edit(target, extra)
    else:
        raise ValueError(f"unknown candidate mode {mode!r}; expected one of {MODES}")
    if scene is None or scene == target or not _valid(scene):
        return None
    return Candidate(mode, scene)


def render_candidate(candidate: Candidate, rng: np.random.Generator, size: int) -> np.ndarray:
    """The candidate as a uint8 (size, size, 3) image, with its artifact applied."""
    image = render(candidate.scene, size)
    if candidate.artifact is None:
        return image
    x = image.astype(np.float32) / 255.0
    if candidate.artifact == "noise":
        x = x + rng.normal(0.0, candidate.strength, size=x.shape).astype(np.float32)
    elif candidate.artifact == "colour_shift":
        # Each channel moves towards mid-grey, so that clipping at 0 or 1 cannot hide the cast.
        magnitude = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
        direction = np.where(x.reshape(-1, 3).mean(0) > 0.5, -1.0, 1.0).astype(np.float32)
        x = x + direction * magnitude / magnitude.max() * candidate.strength
    elif candidate.artifact == "blur":
        blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(candidate.strength * size / 64))
        return np.asarray(blurred)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
