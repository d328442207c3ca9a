"""Small interfaces the rollout and trainer code against; model families live behind them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image


@dataclass
class TextCond:
    """Encoded text conditioning for a batch (already repeated per sample)."""

    embeds: torch.Tensor  # (B, L, D) sequence embeddings
    pooled: torch.Tensor  # (B, Dp) pooled embedding
    neg_embeds: torch.Tensor | None = None  # true-CFG negative branch, when used
    neg_pooled: torch.Tensor | None = None

    def index(self, idx: torch.Tensor | slice) -> TextCond:
        pick = lambda t: None if t is None else t[idx]
        return TextCond(self.embeds[idx], self.pooled[idx], pick(self.neg_embeds), pick(self.neg_pooled))


class FlowModel(Protocol):
    """A rectified-flow image model (generator or refiner) seen as a velocity field.

    Sampling and FlowGRPO only need: text/image encoding, a guided velocity and decoding.
    `ref` carries the image being edited (token-concatenated, Kontext style) or None.
    """

    transformer: torch.nn.Module

    def encode_text(self, texts: list[str]) -> TextCond: ...

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> list[Image.Image]: ...

    def noise(self, batch: int, generator: torch.Generator | None) -> torch.Tensor: ...

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, ref: torch.Tensor | None
    ) -> torch.Tensor: ...
