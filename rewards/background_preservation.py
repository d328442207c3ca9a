"""Reward `background_preservation`: how untouched the image is outside the refined region.

Scores a refinement against its input image (`input_images`, passed by the refine step) outside
its region (`regions`: the box the refiner was given, or the prompt record's `region`), as
RefineEval's SSIM_bg or 1 - MSE_bg. Where there is nothing to preserve it scores 1: a first
generation (no input image) and a refinement without a region (the whole image was its region),
so one recipe serves every `refiner.mode` and only region drift costs reward.
"""

from __future__ import annotations

from r3rl.modes.metrics import masked_mse, masked_ssim
from r3rl.modes.region import box_mask

METRICS = ("ssim", "mse")


def background_preservation(prompts, images, metadata, input_images=None, regions=None, metric: str = "ssim",
                            **kwargs) -> list[float]:
    if metric not in METRICS:
        raise ValueError(f"background_preservation: metric={metric!r}; expected one of {METRICS}")
    if input_images is None:
        return [1.0] * len(images)
    regions = regions if regions is not None else [None] * len(images)
    scores: list[float | None] = []
    for image, before, box in zip(images, input_images, regions, strict=True):
        background = ~box_mask(box, *before.size) if box is not None else None
        if background is None or not background.any():
            scores.append(1.0)
        elif metric == "ssim":
            scores.append(masked_ssim(before, image, background))
        else:
            scores.append(1.0 - masked_mse(before, image, background))
    return scores
