"""`refiner.mode: region`: a FlowModel wrapper that refines a box and pastes it back.

The rollout, FlowGRPO and the trainer see an ordinary refiner: `encode_edit` conditions the
wrapped refiner on the focused crop as if it were the whole image (FLUX.1-Kontext: the crop's
latents are the reference; Qwen-Image-Edit: its text encoder reads the crop too), `velocity` is
the wrapped model's, and `decode` pastes the refined crop into the input through the soft mask.
The box travels in the conditioning text as `<box>x0 y0 x1 y1</box>` (so a recorded rollout
keeps the region it was refined in); `encode_edit` strips it before the text encoders see it.

`run_diffusion` calls encode_edit -> sample -> decode for one batch, and this wrapper relies on
that order: encode_edit remembers the crop windows and input images that decode pastes into.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from r3rl.models.base import FlowModel, TextCond, encode_condition
from r3rl.modes.region import (
    Box,
    Window,
    box_mask,
    crop,
    crop_window,
    format_box,
    paste,
    soft_mask,
    split_box,
)


@dataclass(frozen=True)
class RegionSettings:
    box: Box | None = None  # used when neither the reflection nor the prompt record names a region
    margin: float = 0.25
    dilate_px: int = -1
    blur_sigma: float = 0.5


def record_box(meta: dict) -> Box | None:
    """A prompt record's own region (`"region": [x0, y0, x1, y1]` in canvas fractions), if any."""
    region = meta.get("region")
    return tuple(float(v) for v in region) if region else None


class RegionRefiner:
    """Focus-and-refine around a wrapped refiner (RefineAnything, seed 001)."""

    def __init__(self, inner: FlowModel, settings: RegionSettings) -> None:
        self.inner, self.settings = inner, settings
        self._pending: tuple[list[Image.Image], list[tuple[Window, np.ndarray]]] | None = None

    @property
    def transformer(self) -> torch.nn.Module:
        return self.inner.transformer

    @transformer.setter
    def transformer(self, module: torch.nn.Module) -> None:  # the trainer swaps in its KL reference
        self.inner.transformer = module

    def compose(self, meta: dict, instruction: str) -> str:
        """Conditioning text: the instruction with the region it applies to (the reflector's box,
        else the prompt record's, else the recipe's; none = the whole image)."""
        text, box = split_box(instruction)
        box = box or record_box(meta) or self.settings.box
        return f"{format_box(box)} {text}" if box else text

    def plan(self, image: Image.Image, box: Box | None) -> tuple[Window, np.ndarray]:
        """Crop window and paste weights for one image; no box = refine the whole canvas."""
        w, h = image.size
        if box is None:
            return (0, 0, w, h), np.ones((h, w))
        mask = box_mask(box, w, h)
        window = crop_window(mask, self.settings.margin)
        return window, soft_mask(
            mask, window, dilate_px=self.settings.dilate_px, blur_sigma=self.settings.blur_sigma
        )

    def encode_edit(
        self, texts: list[str], images: list[Image.Image]
    ) -> tuple[TextCond, torch.Tensor]:
        """The wrapped refiner's conditioning on (instruction without its box, focused crop)."""
        split = [split_box(t) for t in texts]
        plans = [self.plan(im, box) for im, (_, box) in zip(images, split, strict=True)]
        self._pending = (list(images), plans)
        crops = [crop(im, window, self.inner.image_size) for im, (window, _) in zip(images, plans)]
        return encode_condition(self.inner, [t for t, _ in split], crops)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        crops = self.inner.decode(latents)
        if self._pending is None or len(self._pending[0]) != len(crops):
            raise ValueError(
                "RegionRefiner: decode needs the input images of the same batch (encode_edit first)"
            )
        images, plans = self._pending
        self._pending = None
        return [paste(im, c, window, alpha) for im, c, (window, alpha) in zip(images, crops, plans)]

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.noise(batch, generator)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return self.inner.sigmas(num_steps)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, ref: torch.Tensor | None
    ) -> torch.Tensor:
        return self.inner.velocity(x, sigma, cond, ref)
