"""Supervised rectified-flow matching (x_t = (1-s) x0 + s eps, target v = eps - x0): the pure
loss with RefineAnything's boundary-consistency weights, one supervised pair, and `fit`, the
training loop `r3rl sft` and the shapes world's regenerate stage both run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from r3rl.errors import UserError

# --------------------------------------------------------------------------- the loss (pure)


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the mask edge, on either side: dilate(mask) minus erode(mask)."""
    if width <= 0 or not mask.any():
        return np.zeros_like(mask, dtype=bool)
    grown = ndimage.binary_dilation(mask, iterations=width)
    shrunk = ndimage.binary_erosion(mask, iterations=width, border_value=1)
    return grown & ~shrunk


def boundary_weights(mask: np.ndarray, width: int, weight: float) -> np.ndarray:
    """Per-pixel loss weight: 1 everywhere plus `weight` in the boundary band."""
    return 1.0 + weight * boundary_band(mask, width).astype(np.float64)


def token_weights(pixel_weights: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, W) pixel weights -> (B, grid*grid) weights of the packed latent tokens (area mean)."""
    pooled = F.adaptive_avg_pool2d(pixel_weights[:, None].float(), grid)
    return pooled.flatten(1)


def weighted_flow_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Weighted mean over tokens of the per-token squared error (mean over channels):
    sum_bt w_bt * mse_bt / sum_bt w_bt; plain mean when `weights` is None."""
    per_token = (pred - target).pow(2).mean(-1)
    if weights is None:
        return per_token.mean()
    return (weights * per_token).sum() / weights.sum()


@dataclass
class Example:
    """One supervised pair: conditioning text, input image (None: text-to-image), target, mask."""

    text: str
    input: Image.Image | None
    target: Image.Image
    mask: np.ndarray | None = None  # bool (H, W) in target pixels: the refined region


# --------------------------------------------------------------------------- training


def fit(
    model,
    examples: list[Example],
    params: list[torch.nn.Parameter],
    *,
    encode: Callable[[list[str], list[Image.Image] | None], tuple],
    steps: int,
    batch_size: int,
    lr: float,
    boundary_weight: float = 0.0,
    band_px: int = 2,
    cond_dropout: float = 0.1,
    seed: int = 0,
) -> list[float]:
    """Flow-matching steps on `examples` (all with inputs, or all without) training `params`;
    returns the loss of every step. `model` is any FlowModel wrapper (edit/regenerate) whose `inner`
    (or itself) owns the VAE the targets are encoded with; `encode(texts, inputs)` gives the
    conditioning and reference latents as rollouts make them (`models.base.encode_condition`)."""
    if len({e.input is None for e in examples}) > 1:
        raise UserError("sft pairs must all have an 'input' (refiner) or none (generator)")
    base = getattr(model, "inner", model)
    with torch.no_grad():
        x0_all = torch.cat(
            [
                base.encode_images([e.target for e in examples[i : i + 64]])
                for i in range(0, len(examples), 64)
            ]
        )
    grid = math.isqrt(x0_all.shape[1])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    losses = []
    for p in params:
        p.requires_grad_(True)
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        batch = [examples[i] for i in idx]
        x0 = x0_all[idx]
        eps = torch.randn(x0.shape, generator=g).to(
            x0.device
        )  # CPU draws: the same noise on any device
        s = torch.rand(batch_size, generator=g).to(x0.device)
        xt = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps
        texts = [e.text if rng.random() >= cond_dropout else "" for e in batch]
        inputs = [e.input for e in batch] if batch[0].input is not None else None
        cond, ref = encode(texts, inputs)
        weights = None
        if boundary_weight > 0 and any(e.mask is not None for e in batch):
            pix = [
                boundary_weights(e.mask, band_px, boundary_weight)
                if e.mask is not None
                else np.ones((1, 1))
                for e in batch
            ]  # each example's pixels pooled onto the token grid on its own
            weights = torch.cat([token_weights(torch.from_numpy(w)[None], grid) for w in pix]).to(
                x0.device
            )
        loss = weighted_flow_loss(model.velocity(xt, s, cond, ref), eps - x0, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    for p in params:
        p.requires_grad_(False)
    return losses
