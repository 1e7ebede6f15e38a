"""Preference data in the EditReward-Data format (ShapeEdit's export and the real dataset) and safe image loading.

One loader serves both: a json list (or jsonl) of objects with `prompt`, `path_src`, `path1`, `path2`
(`path1` preferred), optional `tie_case` (true/false), `model{1,2}_dim{1,2}_score`, and optional critiques
`rationale1` / `rationale2`. Image paths are relative to the json file's folder (or `image_root`).
Every row is checked completely before it is used: fields and types, every image decoded, its geometry.
A bad row is reported with its file, row number and key, or, with skip_bad, skipped and counted by kind.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

T = TypeVar("T")

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Images declaring more pixels are refused before decoding (decompression bombs): far beyond any editing
benchmark image. Checked here, per image, so PIL's process-wide Image.MAX_IMAGE_PIXELS is left alone."""
MAX_ASPECT_RATIO = 200
"""Qwen-VL image processors (every JRM backbone) refuse an image whose longer side exceeds 200 times its shorter."""


class DataError(ValueError):
    """A data file, row or image that cannot be used; the message names where, `kind` says what went wrong
    (for counting skipped rows)."""

    def __init__(self, message: str, kind: str = "bad row"):
        super().__init__(message)
        self.kind = kind


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
    """Open an image as RGB (`to_rgb`), refusing missing files, bombs, truncation and non-images with a
    DataError that starts with `where`."""
    path = Path(path)
    label = f"{where}: " if where else ""
    if not path.is_file():
        raise DataError(f"{label}image file {path} does not exist", "missing image")
    return decode_image(path, f"{label}cannot read image {path}")


def decode_image(source: Path | io.BytesIO, error: str) -> Image.Image:
    """Decode a file or in-memory image to RGB (`to_rgb`); bombs, truncation and non-images raise DataError
    starting with `error`. The size is read from the header and checked before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its own limit refuses) by a process-wide setting; ours is stricter and local.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{error}: it declares {width}x{height} pixels, more than {MAX_IMAGE_PIXELS}: could be a "
                        f"decompression bomb",
                        "unreadable image",
                    )
                image.load()
                return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{error}: {e}", "unreadable image") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Explicit RGB conversion for every PIL mode (1, L, P, RGBA, LA, CMYK, I;16, I, F, ...), EXIF rotation applied.

    A fixed scale, never the image's own range, so that one picture stored at two bit depths gives the
    same pixels: I;16 (16-bit) is divided by 257 (65535 -> 255); I (32-bit integers) is read as 16-bit,
    clipped to 0-65535, then divided by 257; F (float) is read as 0-1 when every value lies in [0, 1] and
    multiplied by 255, otherwise as 0-255 and clipped (NaN becomes 0). Alpha is composited onto white.
    Orientation comes first, so an image opened with Image.open gives the pixels `load_image` gives.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        if image.mode == "F":
            array = array * 255.0 if array.size and array.min() >= 0.0 and array.max() <= 1.0 else array
            levels = np.clip(array, 0.0, 255.0)
        else:
            levels = np.clip(array, 0.0, 65535.0) / 257.0
        return Image.fromarray(levels.round().astype("uint8"), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_geometry(image: Image.Image, where: str) -> None:
    """Refuse an image the reward model's image processor would refuse mid-run (aspect ratio over MAX_ASPECT_RATIO)."""
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(
            f"{where} is {width}x{height} pixels: an aspect ratio over {MAX_ASPECT_RATIO}, which Qwen-VL image "
            f"processors refuse",
            "image geometry",
        )


def check_once(checked: dict[str, DataError | None], key: str, check: Callable[[], object]) -> DataError | None:
    """Run `check` once per key (an image shared by many rows is read once); returns the DataError it
    raised, or None, and remembers it in `checked`."""
    if key not in checked:
        try:
            check()
            checked[key] = None
        except DataError as e:
            checked[key] = e
    return checked[key]


def check_image_file(path: Path, where: str, checked: dict[str, DataError | None]) -> None:
    """Decode the image at `path` and check its geometry, once per path; a fault raises DataError starting
    with `where`."""
    fault = check_once(checked, str(path), lambda: check_geometry(load_image(path), f"image {path}"))
    if fault is not None:
        raise DataError(f"{where}: {fault}", fault.kind)


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
    """row[key] checked to be a `kind` (an int is a float); missing or None raises unless `optional`."""
    if key not in row or row[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})", "missing field")
    value = row[key]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(
            f"{where}: field {key!r} should be {kind.__name__}, got {type(value).__name__} {value!r}"[:300],
            "wrong type",
        )
    return value


def text_field(row: dict, key: str, where: str) -> str:
    """A required non-empty string field (instructions, prompts)."""
    value = field(row, key, str, where)
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty", "empty instruction")
    return value


def parse_pair(row: dict, where: str, root: Path) -> PreferencePair:
    """The fields of one EditReward-Data row, checked (not its images: `check_pair_images`). The one rule for
    this format: reward/benchmarks.py reads ShapeEdit benchmark rows through it too."""
    instruction = text_field(row, "prompt", where)
    paths = [str(root / field(row, k, str, where)) for k in ("path_src", "path1", "path2")]
    dims = []
    for slot in ("1", "2"):
        values = [field(row, f"model{slot}_dim{d}_score", float, where, optional=True) for d in (1, 2)]
        dims.append(None if any(v is None for v in values) else tuple(values))
    return PreferencePair(
        source=paths[0],
        instruction=instruction,
        chosen=paths[1],
        rejected=paths[2],
        tie=bool(
            field(row, "tie_case", bool, where, optional=True)
        ),  # "false" or "maybe" is refused, not read as a tie
        chosen_critique=field(row, "rationale1", str, where, optional=True),
        rejected_critique=field(row, "rationale2", str, where, optional=True),
        chosen_dims=dims[0],
        rejected_dims=dims[1],
        where=where,
    )


def load_pairs(
    path: str | Path, image_root: str | Path | None = None, skip_bad: bool = False, progress: bool = True
) -> tuple[list[PreferencePair], Counter]:
    """Read an EditReward-Data json/jsonl file, checking every row completely (fields, types, every image
    decoded, image geometry) before returning.

    Args:
        path: the json (list of objects) or jsonl file.
        image_root: folder the image paths are relative to; default: the file's folder.
        skip_bad: skip (and count) bad rows instead of raising `DataError`.
        progress: show a progress bar while checking (decoding every image takes a while on big files).

    Returns:
        (pairs, skipped rows counted by kind of fault: {"missing image": 2, ...})
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    checked: dict[str, DataError | None] = {}

    def parse(row: dict, where: str) -> list[PreferencePair]:
        pair = parse_pair(row, where, root)
        check_pair_images(pair, checked)
        return [pair]

    return parse_rows(path, read_rows(path), parse, skip_bad, progress=progress)


def check_pair_images(pair: PreferencePair, checked: dict[str, DataError | None]) -> None:
    """Decode and check the three images of a pair, naming the row and key of a bad one."""
    for key, image in (("path_src", pair.source), ("path1", pair.chosen), ("path2", pair.rejected)):
        check_image_file(Path(image), f"{pair.where}: {key}", checked)


def parse_rows(
    path: Path, rows: list, parse: Callable[[dict, str], list[T]], skip_bad: bool, limit: int = 0, progress: bool = True
) -> tuple[list[T], Counter]:
    """Apply `parse(row, "file:row i")` to every row; a DataError stops, or with `skip_bad` is counted by kind.

    Args:
        limit: stop after this many good rows (0: all).
        progress: a progress bar over the rows.

    Returns:
        (everything parse returned, concatenated; skipped rows by kind)
    """
    out: list[T] = []
    skipped: Counter = Counter()
    good = 0
    for i, row in enumerate(tqdm(rows, desc=f"checking {path.name}", unit="row", disable=not progress, leave=False)):
        if limit and good >= limit:
            break
        where = f"{path}:row {i}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object, got {type(row).__name__}", "not an object")
            out.extend(parse(row, where))
            good += 1
        except DataError as e:
            if not skip_bad:
                raise
            skipped[e.kind] += 1
    return out, skipped


class PairCollator:
    """Loads a batch of pairs' images and encodes chosen then rejected candidates into one batch of 2B, with a JRM
    `model`'s `encode` (reward/train.py's data collator; RL's online refresh batches the same way)."""

    def __init__(self, model, with_critiques: bool):
        self.model = model
        self.with_critiques = with_critiques

    def __call__(self, pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
        sources = [load_image(p.source, p.where) for p in pairs]
        edited = [load_image(p.chosen, p.where) for p in pairs] + [load_image(p.rejected, p.where) for p in pairs]
        critiques = None
        if self.with_critiques:
            critiques = [p.chosen_critique for p in pairs] + [p.rejected_critique for p in pairs]
        batch = self.model.encode(sources + sources, [p.instruction for p in pairs] * 2, edited, critiques)
        batch["ties"] = torch.tensor([p.tie for p in pairs])
        if self.model.config.dimension_heads:
            dims = [(p.chosen_dims, p.rejected_dims) for p in pairs]
            batch["dims_known"] = torch.tensor([c is not None and r is not None for c, r in dims])
            width = self.model.config.dimension_heads
            batch["chosen_dims"] = torch.tensor(
                [c if c is not None else (0.0,) * width for c, _ in dims], dtype=torch.float32
            )
            batch["rejected_dims"] = torch.tensor(
                [r if r is not None else (0.0,) * width for _, r in dims], dtype=torch.float32
            )
        return batch
