"""Masked image similarity (RefineEval's MSE_bg / SSIM_bg and their region twins), pure numpy.

Pixels are compared in [0, 1]. For SSIM the pixels *outside* the compared area are set equal
(to the first image's) before the SSIM map is taken, so a change on one side of a mask edge
does not leak through the 7x7 windows into the other side's score.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity


def _arrays(a: Image.Image, b: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    a = a.convert("RGB")
    b = b.convert("RGB")
    if b.size != a.size:
        b = b.resize(a.size, Image.BICUBIC)
    return np.asarray(a, dtype=np.float64) / 255.0, np.asarray(b, dtype=np.float64) / 255.0


def masked_mse(a: Image.Image, b: Image.Image, area: np.ndarray) -> float:
    """Mean squared error over the pixels where `area` (H, W) is True; NaN for an empty area."""
    x, y = _arrays(a, b)
    return float(((x - y) ** 2)[area].mean()) if area.any() else math.nan


def masked_ssim(a: Image.Image, b: Image.Image, area: np.ndarray) -> float:
    """Mean SSIM (7x7 windows, per channel) over the pixels where `area` is True; NaN if empty."""
    if not area.any():
        return math.nan
    x, y = _arrays(a, b)
    y = np.where(area[..., None], y, x)
    _, smap = structural_similarity(x, y, channel_axis=2, data_range=1.0, full=True)
    return float(smap[area].mean())


def background_scores(
    before: list[Image.Image], after: list[Image.Image], boxes: list
) -> list[tuple[float, float]]:
    """(MSE_bg, SSIM_bg) of each refinement that had a region (box); samples without one are
    skipped."""
    from r3rl.modes.region import box_mask

    out = []
    for a, b, box in zip(before, after, boxes, strict=True):
        if box is not None:
            background = ~box_mask(box, *a.size)
            out.append((masked_mse(a, b, background), masked_ssim(a, b, background)))
    return out
