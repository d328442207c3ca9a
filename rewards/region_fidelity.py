"""Reward `region_fidelity`: how close the refined region is to a reference image.

The reference is the prompt record's `reference` (an image path, relative to the working
directory) in canvas coordinates; the region is the refiner's box (`regions`) or the record's
`region` (none: the whole image). Scores SSIM or 1 - MSE inside the region; a sample without
a reference cannot be scored (None).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from r3rl.modes.metrics import masked_mse, masked_ssim
from r3rl.modes.region import box_mask

METRICS = ("ssim", "mse")


def region_fidelity(prompts, images, metadata, regions=None, metric: str = "ssim", **kwargs) -> list[float | None]:
    if metric not in METRICS:
        raise ValueError(f"region_fidelity: metric={metric!r}; expected one of {METRICS}")
    regions = regions if regions is not None else [None] * len(images)
    scores: list[float | None] = []
    for image, meta, box in zip(images, metadata, regions, strict=True):
        ref_path = (meta or {}).get("reference")
        if not ref_path or not Path(ref_path).exists():
            scores.append(None)
            continue
        box = box or (tuple(meta["region"]) if meta.get("region") else (0.0, 0.0, 1.0, 1.0))
        reference = Image.open(ref_path).convert("RGB").resize(image.size, Image.BICUBIC)
        area = box_mask(box, *image.size)
        fn = masked_ssim if metric == "ssim" else (lambda a, b, m: 1.0 - masked_mse(a, b, m))
        scores.append(fn(reference, image, area))
    return scores
