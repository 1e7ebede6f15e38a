"""ShapeEdit scenes: flat shapes on a coloured background, described exactly and rendered at any size.

A `Scene` is resolution-free (positions and sizes are fractions of the image side), so the oracle can
render the reference at whatever size a policy produced. Rendering has hard edges and no anti-aliasing:
every pixel of a clean render is exactly one palette colour, which is what the oracle's quality check uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

# Shape colours and background colours are disjoint so that every shape is visible on every background.
# Every pair of palette colours differs by at least 0.3 in some channel (tests check it): the oracle's
# closeness threshold sits below that, so a wrong colour is never mistaken for the right one.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "pink": (250, 140, 200),
    "cyan": (40, 200, 220),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (130, 130, 130),
    "brown": (110, 70, 40),
    "navy": (20, 40, 110),
}
KINDS = ("circle", "square", "triangle")
# Half-extent of a shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.12, "large": 0.17}
# Canonical positions that instructions name ("move the circle to the top-left corner").
REGIONS: dict[str, tuple[float, float]] = {
    "top-left corner": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top-right corner": (0.8, 0.2),
    "left side": (0.2, 0.5),
    "centre": (0.5, 0.5),
    "right side": (0.8, 0.5),
    "bottom-left corner": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom-right corner": (0.8, 0.8),
}
# Gap kept between shape bounding boxes, so that shapes never overlap and removal reveals background.
GAP = 0.02


@dataclass(frozen=True)
class Shape:
    """One flat shape. `id` survives edits, so a candidate can be compared object by object."""

    id: int
    kind: str  # one of KINDS
    colour: str  # key of SHAPE_COLOURS
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height (0 = top)
    size: float  # half-extent, fraction of the side

    def moved(self, x: float, y: float) -> Shape:
        return replace(self, x=x, y=y)


@dataclass(frozen=True)
class Scene:
    background: str  # key of BACKGROUND_COLOURS
    shapes: tuple[Shape, ...]

    def shape(self, shape_id: int) -> Shape:
        for s in self.shapes:
            if s.id == shape_id:
                return s
        raise KeyError(f"scene has no shape with id {shape_id}; ids are {[s.id for s in self.shapes]}")

    def without(self, shape_id: int) -> Scene:
        return replace(self, shapes=tuple(s for s in self.shapes if s.id != shape_id))

    def replaced(self, shape: Shape) -> Scene:
        return replace(self, shapes=tuple(shape if s.id == shape.id else s for s in self.shapes))

    def to_dict(self) -> dict:
        return {"background": self.background, "shapes": [asdict(s) for s in self.shapes]}

    @staticmethod
    def from_dict(d: dict) -> Scene:
        return Scene(background=d["background"], shapes=tuple(Shape(**s) for s in d["shapes"]))


def size_name(size: float) -> str:
    """The size word closest to a half-extent."""
    return min(SIZES, key=lambda k: abs(SIZES[k] - size))


def region_name(x: float, y: float) -> str:
    """The named region closest to a position."""
    return min(REGIONS, key=lambda k: (REGIONS[k][0] - x) ** 2 + (REGIONS[k][1] - y) ** 2)


def fits(shape: Shape, others: tuple[Shape, ...] | list[Shape]) -> bool:
    """True when `shape` lies inside the image and its box keeps GAP from every other shape's box."""
    if not (GAP <= shape.x - shape.size and shape.x + shape.size <= 1 - GAP):
        return False
    if not (GAP <= shape.y - shape.size and shape.y + shape.size <= 1 - GAP):
        return False
    for o in others:
        if o.id == shape.id:
            continue
        reach = shape.size + o.size + GAP
        if abs(shape.x - o.x) < reach and abs(shape.y - o.y) < reach:
            return False
    return True


def shape_mask(shape: Shape, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centres fall inside `shape`."""
    xs = (np.arange(width) + 0.5) / width
    ys = (np.arange(height) + 0.5) / height
    dx = np.abs(xs[None, :] - shape.x)
    dy = ys[:, None] - shape.y
    r = shape.size
    if shape.kind == "circle":
        return dx**2 + dy**2 <= r * r
    if shape.kind == "square":
        return (dx <= r) & (np.abs(dy) <= r)
    if shape.kind == "triangle":
        # Apex at the top centre, base of width 2r at the bottom.
        return (np.abs(dy) <= r) & (dx <= (dy + r) / 2)
    raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {KINDS}")


def render(scene: Scene, height: int = 64, width: int | None = None) -> np.ndarray:
    """Render a scene.

    Returns:
        uint8 array (H, W, 3); every pixel is exactly one palette colour.
    """
    width = height if width is None else width
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUND_COLOURS[scene.background]
    for s in scene.shapes:
        image[shape_mask(s, height, width)] = SHAPE_COLOURS[s.colour]
    return image


def palette() -> np.ndarray:
    """All colours a clean render can contain, float (K, 3) in [0, 1]."""
    colours = list(SHAPE_COLOURS.values()) + list(BACKGROUND_COLOURS.values())
    return np.asarray(colours, dtype=np.float32) / 255.0


def sample_scene(rng: np.random.Generator, num_shapes: int | None = None) -> Scene:
    """A random scene of 1-4 non-overlapping shapes.

    Half the time a second shape shares the first one's kind or colour, so that instructions must name
    the right attributes to pick out their object.
    """
    n = int(rng.integers(1, 5)) if num_shapes is None else num_shapes
    colours = list(SHAPE_COLOURS)
    shapes: list[Shape] = []
    attempts = 0
    while len(shapes) < n:
        attempts += 1
        if attempts > 200:  # crowded: start again with fresh sizes
            shapes, attempts = [], 0
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = colours[int(rng.integers(len(colours)))]
        if shapes and rng.random() < 0.5:
            first = shapes[0]
            if rng.random() < 0.5:
                kind = first.kind
            else:
                colour = first.colour
        size = list(SIZES.values())[int(rng.integers(len(SIZES)))]
        lo, hi = size + GAP, 1 - size - GAP
        x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        shape = Shape(id=len(shapes), kind=kind, colour=colour, x=round(x, 4), y=round(y, 4), size=size)
        if fits(shape, shapes):
            shapes.append(shape)
    background = list(BACKGROUND_COLOURS)[int(rng.integers(len(BACKGROUND_COLOURS)))]
    return Scene(background=background, shapes=tuple(shapes))
