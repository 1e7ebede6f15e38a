"""Images in and out of a policy: explicit RGB conversion, batch checks, uint8 tensors <-> PIL."""

from __future__ import annotations

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor


# Copied from reward.data.to_rgb
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


def check_batch(source_images: list, instructions: list, height: int, width: int) -> None:
    """Refuse a batch the policy cannot edit, naming the offending row."""
    if not isinstance(source_images, (list, tuple)) or not isinstance(instructions, (list, tuple)):
        raise TypeError("source_images and instructions must be lists (one entry per edit)")
    if len(source_images) != len(instructions):
        raise ValueError(f"{len(source_images)} source images but {len(instructions)} instructions")
    if not source_images:
        raise ValueError("empty batch: at least one source image and instruction are needed")
    for i, (image, text) in enumerate(zip(source_images, instructions)):
        if not isinstance(image, Image.Image):
            raise TypeError(f"source_images[{i}] is a {type(image).__name__}, not a PIL image")
        if image.size != (width, height):
            raise ValueError(
                f"source_images[{i}] is {image.size[0]}x{image.size[1]} but this policy edits "
                f"{width}x{height} images; resize them first (e.g. image.resize(({width}, {height})))"
            )
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"instructions[{i}] is empty: {text!r}")


def images_to_tensor(images: list[Image.Image]) -> Tensor:
    """(B, 3, H, W) uint8 from PIL images of one size, any mode (converted explicitly)."""
    return torch.from_numpy(np.stack([np.asarray(to_rgb(im), dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)


def tensor_to_images(images: Tensor) -> list[Image.Image]:
    """PIL RGB images from a (B, 3, H, W) uint8 tensor."""
    return [Image.fromarray(x) for x in images.permute(0, 2, 3, 1).cpu().numpy()]


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 from images in [-1, 1], rounded the way diffusers' image processor does."""
    return ((images.float().clamp(-1, 1) / 2 + 0.5) * 255).round().to(torch.uint8)
