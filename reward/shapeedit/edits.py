"""ShapeEdit instructions: atomic edits, how they change a scene, and the English that asks for them.

Seven families (recolour, remove, add, move, resize, background, swap) and compositions of two atomic
edits on different objects. Objects are named by the fewest attributes that pick them out in the source
scene (sometimes one more, as people do), so a reader must work out *which* object is meant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from reward.shapeedit.world import (
    BACKGROUND_COLOURS,
    KINDS,
    REGIONS,
    SHAPE_COLOURS,
    SIZES,
    Scene,
    Shape,
    fits,
    region_name,
    size_name,
)

FAMILIES = ("recolour", "remove", "add", "move", "resize", "background", "swap")
SIZE_ORDER = ("small", "medium", "large")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": (
        "make the {ref} {colour}",
        "change the colour of the {ref} to {colour}",
        "paint the {ref} {colour}",
        "turn the {ref} {colour}",
        "recolour the {ref} {colour}",
    ),
    "remove": (
        "remove the {ref}",
        "delete the {ref}",
        "erase the {ref}",
        "get rid of the {ref}",
        "take away the {ref}",
    ),
    "add": (
        "add a {size} {colour} {kind} {at_region}",
        "put a {size} {colour} {kind} {at_region}",
        "draw a {size} {colour} {kind} {at_region}",
        "place a {size} {colour} {kind} {at_region}",
    ),
    "move": (
        "move the {ref} to the {region}",
        "put the {ref} {at_region}",
        "shift the {ref} to the {region}",
        "drag the {ref} over to the {region}",
    ),
    "bigger": ("make the {ref} bigger", "enlarge the {ref}", "make the {ref} larger", "scale up the {ref}"),
    "smaller": ("make the {ref} smaller", "shrink the {ref}", "scale down the {ref}", "reduce the size of the {ref}"),
    "background": (
        "change the background to {colour}",
        "make the background {colour}",
        "paint the background {colour}",
        "set the background colour to {colour}",
    ),
    "swap": (
        "swap the {ref} and the {ref2}",
        "exchange the positions of the {ref} and the {ref2}",
        "switch the places of the {ref} and the {ref2}",
        "let the {ref} and the {ref2} trade places",
    ),
}
JOINERS = ("{a} and {b}", "{a}, then {b}", "{a}; also {b}", "first {a}, then {b}")
# Id of a shape an instruction adds; scenes number their own shapes from 0, and an instruction adds at most one.
ADDED_ID = 99
AT_REGION = {
    "centre": "in the centre",
    "top": "at the top",
    "bottom": "at the bottom",
    "left side": "on the left side",
    "right side": "on the right side",
}


@dataclass(frozen=True)
class Edit:
    """One atomic edit. Unused fields stay None."""

    family: str  # one of FAMILIES
    target: int | None = None  # id of the shape acted on (recolour, remove, move, resize, swap)
    other: int | None = None  # swap: id of the second shape
    colour: str | None = None  # recolour/add: shape colour; background: background colour
    kind: str | None = None  # add: shape kind
    size: float | None = None  # add: half-extent; resize: the new half-extent
    region: str | None = None  # add/move: key of REGIONS

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @staticmethod
    def from_dict(d: dict) -> Edit:
        return Edit(**d)


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after `edit`. Does not check that the result fits; `edit_fits` does."""
    f = edit.family
    if f == "recolour":
        return scene.replaced(replace(scene.shape(edit.target), colour=edit.colour))
    if f == "remove":
        return scene.without(edit.target)
    if f == "add":
        x, y = REGIONS[edit.region]
        shape = Shape(id=ADDED_ID, kind=edit.kind, colour=edit.colour, x=x, y=y, size=edit.size)
        return replace(scene, shapes=scene.shapes + (shape,))
    if f == "move":
        return scene.replaced(scene.shape(edit.target).moved(*REGIONS[edit.region]))
    if f == "resize":
        return scene.replaced(replace(scene.shape(edit.target), size=edit.size))
    if f == "background":
        return replace(scene, background=edit.colour)
    if f == "swap":
        a, b = scene.shape(edit.target), scene.shape(edit.other)
        return scene.replaced(a.moved(b.x, b.y)).replaced(b.moved(a.x, a.y))
    raise ValueError(f"unknown edit family {f!r}; expected one of {FAMILIES}")


def apply_edits(scene: Scene, edits: tuple[Edit, ...]) -> Scene:
    for e in edits:
        scene = apply_edit(scene, e)
    return scene


def edit_fits(scene: Scene, edit: Edit) -> bool:
    """True when the edited scene keeps every touched shape inside the image and apart from the others."""
    after = apply_edit(scene, edit)
    touched = [s for s in after.shapes if s not in scene.shapes]
    return all(fits(s, after.shapes) for s in touched)


def touched_ids(edit: Edit, scene: Scene) -> set[int]:
    """Ids of the source shapes an edit acts on (empty for add and background)."""
    return {i for i in (edit.target, edit.other) if i is not None}


# --- which (family, attributes) compositions are held out --------------------------------------------


def composition_keys(scene: Scene, edit: Edit) -> list[tuple[str, str, str]]:
    """(family, kind, colour) of every object the edit refers to or creates, in the source scene."""
    if edit.family == "background":
        return [("background", "background", edit.colour)]
    if edit.family == "add":
        return [("add", edit.kind, edit.colour)]
    return [
        (edit.family, scene.shape(i).kind, scene.shape(i).colour) for i in (edit.target, edit.other) if i is not None
    ]


def is_heldout(key: tuple[str, str, str]) -> bool:
    """Held-out compositions never occur in train or validation.

    The rule is explicit and stable across Python versions: about one (family, kind, colour) in six,
    spread so that every shape family and every kind loses one or two colours. Background colours are never
    held out: a background edit's composition is its colour alone, so holding one out would hold out the colour's
    word itself (an editor trained on the other splits would never have read "black"), which tests vocabulary,
    not composition.
    """
    family, kind, colour = key
    if family == "background":
        return False
    return (FAMILIES.index(family) + 3 * KINDS.index(kind) + list(SHAPE_COLOURS).index(colour)) % 6 == 0


# --- referring expressions and phrasing ----------------------------------------------------------------


def refer(scene: Scene, shape_id: int, rng: np.random.Generator) -> str | None:
    """The words that pick out one shape in `scene` ("red circle", "large red circle"), or None.

    Uses the fewest attributes that are unique; 30% of the time one attribute more.
    """
    s = scene.shape(shape_id)
    others = [o for o in scene.shapes if o.id != shape_id]
    options = [
        (s.kind, lambda o: o.kind == s.kind),
        (f"{s.colour} {s.kind}", lambda o: (o.kind, o.colour) == (s.kind, s.colour)),
        (
            f"{size_name(s.size)} {s.colour} {s.kind}",
            lambda o: (o.kind, o.colour, size_name(o.size)) == (s.kind, s.colour, size_name(s.size)),
        ),
    ]
    unique = [words for words, clash in options if not any(clash(o) for o in others)]
    if not unique:
        twins = [o for o in others if (o.kind, o.colour) == (s.kind, s.colour)]
        if len(twins) != 1:
            return None
        dx, dy = s.x - twins[0].x, s.y - twins[0].y
        if abs(dx) > 0.15:
            return f"{s.colour} {s.kind} on the {'right' if dx > 0 else 'left'}"
        if abs(dy) > 0.15:
            return f"{s.colour} {s.kind} at the {'bottom' if dy > 0 else 'top'}"
        return None
    i = 0 if len(unique) == 1 or rng.random() >= 0.3 else 1
    return unique[i]


def phrase(scene: Scene, edit: Edit, rng: np.random.Generator) -> str | None:
    """English for one atomic edit on `scene`, or None when its object cannot be named uniquely."""
    f = edit.family
    words: dict[str, str] = {}
    if edit.target is not None:
        ref = refer(scene, edit.target, rng)
        if ref is None:
            return None
        words["ref"] = ref
    if edit.other is not None:
        ref2 = refer(scene, edit.other, rng)
        if ref2 is None:
            return None
        words["ref2"] = ref2
    if edit.region is not None:
        words["at_region"] = AT_REGION.get(edit.region, f"in the {edit.region}")
    if f == "add":
        words.update(size=size_name(edit.size), kind=edit.kind)
    if edit.colour is not None:
        words["colour"] = edit.colour
    if edit.region is not None:
        words["region"] = edit.region
    key = f
    if f == "resize":
        key = "bigger" if edit.size > scene.shape(edit.target).size else "smaller"
    options = TEMPLATES[key]
    return options[int(rng.integers(len(options)))].format(**words)


def instruction_text(scene: Scene, edits: tuple[Edit, ...], rng: np.random.Generator) -> str | None:
    """The whole instruction: one atomic phrase, or two joined; capitalised, sometimes with a full stop."""
    parts = [phrase(scene, e, rng) for e in edits]
    if any(p is None for p in parts):
        return None
    text = parts[0] if len(parts) == 1 else JOINERS[int(rng.integers(len(JOINERS)))].format(a=parts[0], b=parts[1])
    text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.5 else text


# --- sampling ------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: list | tuple):
    return options[int(rng.integers(len(options)))]


def sample_edit(rng: np.random.Generator, scene: Scene, family: str, avoid: set[int]) -> Edit | None:
    """A random valid edit of `family` on `scene` that touches no shape in `avoid`, or None."""
    free = [s for s in scene.shapes if s.id not in avoid]
    if family == "background":
        return Edit("background", colour=_pick(rng, [c for c in BACKGROUND_COLOURS if c != scene.background]))
    if family == "add":
        if len(scene.shapes) >= 4:
            return None
        edit = Edit(
            "add",
            kind=_pick(rng, KINDS),
            colour=_pick(rng, list(SHAPE_COLOURS)),
            size=SIZES[_pick(rng, SIZE_ORDER)],
            region=_pick(rng, list(REGIONS)),
        )
        return edit if edit_fits(scene, edit) else None
    if not free:
        return None
    s = _pick(rng, free)
    if family == "recolour":
        edit = Edit("recolour", target=s.id, colour=_pick(rng, [c for c in SHAPE_COLOURS if c != s.colour]))
    elif family == "remove":
        edit = Edit("remove", target=s.id)
    elif family == "move":
        here = region_name(s.x, s.y)
        edit = Edit("move", target=s.id, region=_pick(rng, [r for r in REGIONS if r != here]))
    elif family == "resize":
        level = SIZE_ORDER.index(size_name(s.size))
        steps = [d for d in (-1, 1) if 0 <= level + d < len(SIZE_ORDER)]
        edit = Edit("resize", target=s.id, size=SIZES[SIZE_ORDER[level + _pick(rng, steps)]])
    elif family == "swap":
        partners = [o for o in free if o.id != s.id and (o.kind, o.colour, o.size) != (s.kind, s.colour, s.size)]
        if not partners:
            return None
        edit = Edit("swap", target=s.id, other=_pick(rng, partners).id)
    else:
        raise ValueError(f"unknown edit family {family!r}; expected one of {FAMILIES}")
    return edit if edit_fits(scene, edit) else None


def sample_instruction(
    rng: np.random.Generator, scene: Scene, p_compose: float = 0.25
) -> tuple[tuple[Edit, ...], str] | None:
    """One or two edits on different objects and the instruction that asks for them, or None."""
    num = 2 if rng.random() < p_compose else 1
    edits: list[Edit] = []
    current = scene
    for _ in range(num):
        family = _pick(rng, FAMILIES)
        if edits and family == edits[0].family == "background":
            return None
        avoid = set().union({ADDED_ID}, *(touched_ids(e, scene) for e in edits))
        edit = sample_edit(rng, current, family, avoid)
        # Edits of a composition must be independent: each one also fits the source scene alone.
        if edit is None or not edit_fits(scene, edit):
            return None
        edits.append(edit)
        current = apply_edit(current, edit)
    if len(edits) == 2 and edits[0].family == "add" and edits[1].family == "add":
        return None
    text = instruction_text(scene, tuple(edits), rng)
    return None if text is None else (tuple(edits), text)
