"""Region refinement (RefineAnything's focus-and-refine) as pure functions on pixels.

A region is a box in canvas fractions `(x0, y0, x1, y1)`. It is cropped with a margin into a
square window, upsampled to the refiner's working resolution, refined, resized back and
pasted through a soft mask (dilate + Gaussian blur, zero outside the window). Where the soft
mask is 0 the input pixel is copied, so the background is bit-identical by construction.
"""

from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image
from scipy import ndimage

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width / height
Window = tuple[int, int, int, int]  # left, top, right, bottom in pixels (right/bottom exclusive)

_BOX = re.compile(r"<box>([^<]*)</box>")


def format_box(box: Box) -> str:
    """The reflector's region syntax: `<box>x0 y0 x1 y1</box>` in canvas fractions."""
    return "<box>" + " ".join(f"{v:.3f}" for v in box) + "</box>"


def split_box(text: str) -> tuple[str, Box | None]:
    """(text without its `<box>` tags, the first box or None). A malformed box counts as none:
    it must be four numbers in [0, 1] with x0 < x1 and y0 < y1."""
    found = _BOX.search(text)
    clean = " ".join(_BOX.sub(" ", text).split())
    if found is None:
        return clean, None
    try:
        values = tuple(float(v) for v in found.group(1).replace(",", " ").split())
    except ValueError:
        return clean, None
    if len(values) != 4:
        return clean, None
    x0, y0, x1, y1 = values
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        return clean, None
    return clean, (x0, y0, x1, y1)


def box_mask(box: Box, width: int, height: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixels a box touches (at least one pixel)."""
    x0, y0, x1, y1 = box
    left, top = min(math.floor(x0 * width), width - 1), min(math.floor(y0 * height), height - 1)
    right, bottom = max(math.ceil(x1 * width), left + 1), max(math.ceil(y1 * height), top + 1)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def crop_window(mask: np.ndarray, margin: float) -> Window:
    """The square window around a mask's bounding box, grown by `margin` x its longer side on
    every side, shifted to stay inside the canvas (square, so upsampling keeps aspect)."""
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty region mask")
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    side = min(math.ceil(side * (1 + 2 * margin)), width, height)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    t = int(np.clip(round(cy - side / 2), 0, height - side))
    l_ = int(np.clip(round(cx - side / 2), 0, width - side))
    return l_, t, l_ + side, t + side


def soft_mask(mask: np.ndarray, window: Window, *, dilate_px: int, blur_sigma: float) -> np.ndarray:
    """Paste weights in [0, 1]: the mask dilated by `dilate_px` (eroded when negative), blurred
    (kernel cut at 2 sigma), and forced to 0 outside the window, the only pixels the refiner
    produced.

    RefineAnything dilates, so the feather spills past the region; eroding by the blur radius
    instead keeps the feather inside it, and every pixel outside the region stays the input's."""
    if dilate_px > 0:
        mask = ndimage.binary_dilation(mask, iterations=dilate_px)
    elif dilate_px < 0:  # the canvas edge does not erode a region that touches it
        mask = ndimage.binary_erosion(mask, iterations=-dilate_px, border_value=1)
    soft = mask.astype(np.float64)
    if blur_sigma > 0:
        soft = ndimage.gaussian_filter(soft, blur_sigma, mode="nearest", truncate=2.0)
    left, top, right, bottom = window
    inside = np.zeros_like(soft, dtype=bool)
    inside[top:bottom, left:right] = True
    return np.where(inside, np.clip(soft, 0.0, 1.0), 0.0)


def crop(image: Image.Image, window: Window, size: int) -> Image.Image:
    """The window, upsampled to the refiner's working resolution (focus: all its pixels on the
    region)."""
    return image.convert("RGB").crop(window).resize((size, size), Image.BICUBIC)


def paste(
    original: Image.Image, refined: Image.Image, window: Window, alpha: np.ndarray
) -> Image.Image:
    """Blend the refined window back: out = alpha*refined + (1-alpha)*original, and exactly the
    original wherever alpha == 0."""
    base = np.asarray(original.convert("RGB"))
    left, top, right, bottom = window
    patch = np.zeros_like(base)
    patch[top:bottom, left:right] = np.asarray(
        refined.convert("RGB").resize((right - left, bottom - top), Image.BICUBIC)
    )
    a = alpha[..., None]
    blended = np.rint(a * patch + (1.0 - a) * base).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.where(a > 0, blended, base))
