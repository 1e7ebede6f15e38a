"""Preference data in the EditReward-Data format (ShapeEdit's export and the real dataset) and safe image loading.

One loader serves both: a json list (or jsonl) of objects with `prompt`, `path_src`, `path1`, `path2`
(`path1` preferred), optional `tie_case`, `model{1,2}_dim{1,2}_score`, and optional critiques
`rationale1` / `rationale2`. Image paths are relative to the json file's folder (or `image_root`).
Every bad row is reported with its file, row number and key.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

T = TypeVar("T")

# Refuse decompression bombs early: 64 megapixels is far beyond any editing benchmark image.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class DataError(ValueError):
    """A data file, row or image that cannot be used; the message names where."""


@dataclass(frozen=True)
class PreferencePair:
    """One comparison of two edits of the same source; `chosen` is preferred unless `tie`."""

    source: str  # path of the source image
    instruction: str
    chosen: str  # path of the preferred edited image
    rejected: str  # path of the other edited image
    tie: bool  # annotators (or the oracle) could not separate the two
    chosen_critique: str | None  # evaluation text of the chosen edit (JRM's LM target)
    rejected_critique: str | None
    chosen_dims: tuple[float, ...] | None  # per-dimension scores (e.g. following, quality) when present
    rejected_dims: tuple[float, ...] | None
    where: str  # "file:row" for error messages


def load_image(path: str | Path, where: str = "") -> Image.Image:
    """Open an image as RGB, honouring EXIF rotation and refusing bombs, truncation and non-images.

    Any PIL mode is converted explicitly: alpha is composited onto white, 16-bit and float greyscale
    are rescaled to 8 bits from their own range.
    """
    path = Path(path)
    label = f"{where}: " if where else ""
    if not path.is_file():
        raise DataError(f"{label}image file {path} does not exist")
    return decode_image(path, f"{label}cannot read image {path}")


def decode_image(source: Path | io.BytesIO, error: str) -> Image.Image:
    """Decode a file or in-memory image to RGB (EXIF rotation applied; bombs, truncation and non-images
    raise DataError starting with `error`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{error}: {e}") from e
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Explicit RGB conversion for every PIL mode (1, L, P, RGBA, LA, CMYK, I;16, I, F, ...)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype("uint8"), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_rows(path: Path) -> list:
    """Rows of a json list, a jsonl file, or a json object holding them under "pairs" (MMRB2)."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:line {n}: not valid json ({e})") from e
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid json ({e})") from e
    if isinstance(rows, dict) and "pairs" in rows:
        rows = rows["pairs"]
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a json list of rows (or {{'pairs': [...]}}), got {type(rows).__name__}")
    return rows


def field(row: dict, key: str, kind: type, where: str, optional: bool = False):
    if key not in row or row[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    value = row[key]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} should be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_pairs(path: str | Path, image_root: str | Path | None = None, skip_bad: bool = False) -> tuple[list[PreferencePair], int]:
    """Read an EditReward-Data json/jsonl file.

    Args:
        path: the json (list of objects) or jsonl file.
        image_root: folder the image paths are relative to; default: the file's folder.
        skip_bad: skip (and count) rows with missing fields, wrong types or missing images instead of
            raising `DataError`.

    Returns:
        (pairs, number of skipped rows)
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent

    def parse(row: dict, where: str) -> list[PreferencePair]:
        instruction = field(row, "prompt", str, where)
        if not instruction.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        paths = [root / field(row, k, str, where) for k in ("path_src", "path1", "path2")]
        for key, p in zip(("path_src", "path1", "path2"), paths):
            if not p.is_file():
                raise DataError(f"{where}: {key} image {p} does not exist")
        dims = []
        for slot in ("1", "2"):
            values = [field(row, f"model{slot}_dim{d}_score", float, where, optional=True) for d in (1, 2)]
            dims.append(None if any(v is None for v in values) else tuple(values))
        return [
            PreferencePair(
                source=str(paths[0]),
                instruction=instruction,
                chosen=str(paths[1]),
                rejected=str(paths[2]),
                tie=bool(field(row, "tie_case", bool, where, optional=True) or False),
                chosen_critique=field(row, "rationale1", str, where, optional=True),
                rejected_critique=field(row, "rationale2", str, where, optional=True),
                chosen_dims=dims[0],
                rejected_dims=dims[1],
                where=where,
            )
        ]

    return parse_rows(path, read_rows(path), parse, skip_bad)


def parse_rows(path: Path, rows: list, parse: Callable[[dict, str], list[T]], skip_bad: bool) -> tuple[list[T], int]:
    """Apply `parse(row, "file:row i")` to every row; a DataError stops, or with `skip_bad` is counted.

    Returns:
        (everything parse returned, concatenated; number of skipped rows)
    """
    out: list[T] = []
    skipped = 0
    for i, row in enumerate(rows):
        where = f"{path}:row {i}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object, got {type(row).__name__}")
            out.extend(parse(row, where))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    return out, skipped
