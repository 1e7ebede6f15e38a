"""The ShapeEdit oracle: exact scores for any edited image, given the source scene and the instruction.

It works on arbitrary images (a policy's outputs, not only renders) by comparing pixels with the exact
target render, region by region:

- following (instruction following): for each atomic edit, the squared intersection over union of what it
  asked and what was done near it: the pixels it must change that now have the target colour (a pixel counts
  fully within CLOSE of it, not at all from FAR), over those pixels plus the pixels changed from the source in
  the edit's neighbourhood (within a typical shape's side of them) where nothing was asked. So a right edit in
  the wrong shape, size or place loses following, not only consistency: a circle painted where a square of the
  same size was asked keeps IoU 0.79, squared 0.62. Averaged over the edits, so each part of a composition
  weighs the same whatever its area.
- consistency (what should stay did stay): outside the edited pixels, each untouched object keeps its
  colour (fraction of its pixels) and the background stays clean (changed background pixels, measured
  against the area of a typical shape, so one spurious blob costs as much as one ruined object);
  averaged over those parts.
- quality: palette fidelity of the whole image times palette fidelity on its edges (a clean render is
  exactly palette colours with hard edges: noise and colour casts leave the palette everywhere, blur
  on every edge). It reads the image alone.
- overall = (2 following + consistency + quality) / 4: what was asked weighs most. A correct edit
  scores exactly 1 on every axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from reward.shapeedit.edits import Edit, apply_edit, apply_edits
from reward.shapeedit.world import Scene, palette, render, shape_mask

# Max-channel colour distance (0-1 scale) up to which a pixel still counts as the reference colour,
# and from which it counts as a different colour. Palette colours differ by at least 0.31.
CLOSE = 0.1
FAR = 0.3
# From this distance a pixel counts (partly) as changed from the source, in the neighbourhood of an edit.
CHANGED = 0.2
# Distance from the nearest palette colour that a clean pixel may have, and the width of the ramp to 0.
PALETTE_TOLERANCE = 0.04
PALETTE_RAMP = 0.12
PALETTE = palette()


@dataclass(frozen=True)
class Judgement:
    following: float  # in [0, 1]
    consistency: float  # in [0, 1]
    quality: float  # in [0, 1]
    overall: float  # (2 following + consistency + quality) / 4
    following_per_edit: tuple[float, ...]  # one per atomic edit of the instruction

    def to_dict(self) -> dict:
        return {
            "following": self.following,
            "consistency": self.consistency,
            "quality": self.quality,
            "overall": self.overall,
        }


@dataclass(frozen=True)
class Reference:
    """Everything the oracle compares an image with, rendered once per (scene, edits, size)."""

    source: np.ndarray  # (H, W, 3) float32 in [0, 1]
    target: np.ndarray  # (H, W, 3) float32 in [0, 1]
    edit_masks: tuple[np.ndarray, ...]  # per atomic edit, (H, W) bool: the pixels it must change
    near_masks: tuple[np.ndarray, ...]  # per atomic edit, (H, W) bool: its neighbourhood, outside every edit mask
    object_masks: tuple[np.ndarray, ...]  # per untouched object, (H, W) bool, outside every edit mask
    background_mask: np.ndarray  # (H, W) bool: background that must stay, outside every edit mask
    blob_area: float  # pixels of a typical shape: the unit of background damage


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as float32 (H, W, 3) in [0, 1].

    Accepts a PIL image of any mode (converted explicitly to RGB), a uint8 array, or a float array in
    [0, 1], each (H, W, 3).
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.float32) / 255.0
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an image array of shape (H, W, 3), got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if array.min() < -1e-3 or array.max() > 1 + 1e-3:
        raise ValueError(f"float images must lie in [0, 1]; got values in [{array.min():.3f}, {array.max():.3f}]")
    return np.clip(array, 0.0, 1.0)


def _chebyshev(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Max-channel absolute difference of broadcastable (..., 3) arrays; per-plane maxima are much faster
    in numpy than a reduction over a last axis of length 3."""
    d = np.abs(a[..., 0] - b[..., 0])
    np.maximum(d, np.abs(a[..., 1] - b[..., 1]), out=d)
    np.maximum(d, np.abs(a[..., 2] - b[..., 2]), out=d)
    return d


def _quality(x: np.ndarray) -> float:
    """Palette fidelity over the whole image times palette fidelity on its edges.

    A clean render is exactly palette colours with one-pixel-sharp edges. Noise and colour casts move
    pixels off the palette everywhere; blur blends the pixels on both sides of every edge, which the
    second factor sees however few edges the image has. Depends on the image alone, not the target.
    """
    to_palette = _chebyshev(x[:, :, None, :], PALETTE[None, None])  # (H, W, K)
    fidelity = np.clip(1.0 - (to_palette.min(-1) - PALETTE_TOLERANCE) / PALETTE_RAMP, 0.0, 1.0)
    nearest = to_palette.argmin(-1)
    edges = np.zeros(nearest.shape, dtype=bool)
    step_x = nearest[:, 1:] != nearest[:, :-1]
    step_y = nearest[1:, :] != nearest[:-1, :]
    edges[:, 1:] |= step_x
    edges[:, :-1] |= step_x
    edges[1:, :] |= step_y
    edges[:-1, :] |= step_y
    on_edges = float(fidelity[edges].mean()) if edges.any() else 1.0
    return float(fidelity.mean()) * on_edges


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` (Chebyshev distance) of the mask: a box max filter, rows then columns."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
        out = windows.any(-1)
    return out


def build_reference(source: Scene, edits: tuple[Edit, ...], height: int, width: int) -> Reference:
    """Render the target and the regions to check, at the size of the images to be judged."""
    source_image = render(source, height, width)
    target_scene = apply_edits(source, edits)
    target_image = render(target_scene, height, width)
    edit_masks = []
    for edit in edits:
        mask = (render(apply_edit(source, edit), height, width) != source_image).any(-1)
        if not mask.any():
            raise ValueError(f"edit {edit.to_dict()} changes no pixel of the source at {height}x{width}")
        edit_masks.append(mask)
    changed = np.logical_or.reduce(edit_masks) | (target_image != source_image).any(-1)
    untouched = [s for s in target_scene.shapes if s in source.shapes]
    object_masks = [shape_mask(s, height, width) & ~changed for s in untouched]
    object_masks = [m for m in object_masks if m.any()]
    covered = np.logical_or.reduce(object_masks) if object_masks else np.zeros_like(changed)
    areas = [shape_mask(s, height, width).sum() for s in source.shapes + target_scene.shapes]
    blob_area = float(np.mean(areas)) if areas else 0.02 * height * width
    target = target_image.astype(np.float32) / 255.0
    radius = max(1, round(np.sqrt(max(blob_area, 1.0))))  # a typical shape's side
    near_masks = tuple(_dilate(m, radius) & ~changed for m in edit_masks)
    return Reference(
        source=source_image.astype(np.float32) / 255.0,
        target=target,
        edit_masks=tuple(edit_masks),
        near_masks=near_masks,
        object_masks=tuple(object_masks),
        background_mask=~changed & ~covered,
        blob_area=max(blob_area, 1.0),
    )


def closeness(reference: Reference, image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1]: how close each pixel is to the target's colour (1 within CLOSE, 0 from FAR)."""
    x = to_array(image)
    if x.shape != reference.target.shape:
        raise ValueError(f"image is {x.shape[:2]} but the reference was built for {reference.target.shape[:2]}")
    return np.clip(1.0 - (_chebyshev(x, reference.target) - CLOSE) / (FAR - CLOSE), 0.0, 1.0)


def judge(reference: Reference, image: Image.Image | np.ndarray) -> Judgement:
    """Score one edited image against a prepared reference."""
    x = to_array(image)
    close = closeness(reference, x)

    # changed from the source where nothing was asked: 0 up to CHANGED of its colour, 1 from FAR (another palette
    # colour), so the small jitter of noise or blur is left to quality and consistency
    changed = np.clip((_chebyshev(x, reference.source) - CHANGED) / (FAR - CHANGED), 0.0, 1.0)
    per_edit = tuple(
        (float(close[m].sum()) / (float(m.sum()) + float(changed[near].sum()))) ** 2
        for m, near in zip(reference.edit_masks, reference.near_masks)
    )
    following = float(np.mean(per_edit))

    parts = [float(close[m].mean()) for m in reference.object_masks]
    if reference.background_mask.any():
        damage = float((1.0 - close[reference.background_mask]).sum())
        parts.append(1.0 - min(1.0, damage / reference.blob_area))
    consistency = float(np.mean(parts)) if parts else 1.0

    quality = _quality(x)

    overall = (2 * following + consistency + quality) / 4
    return Judgement(following, consistency, quality, overall, per_edit)


def judge_image(source: Scene, edits: tuple[Edit, ...], image: Image.Image | np.ndarray) -> Judgement:
    """Score one edited image; builds the reference at the image's own size."""
    h, w = to_array(image).shape[:2]
    return judge(build_reference(source, edits, h, w), image)
