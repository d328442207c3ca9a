"""Small interfaces the rollout and trainer code against; model families live behind them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from r3rl.algos.flow_grpo import sigma_schedule


@dataclass
class TextCond:
    """Encoded text conditioning for a batch (already repeated per sample)."""

    embeds: torch.Tensor  # (B, L, D) sequence embeddings
    pooled: torch.Tensor  # (B, Dp) pooled embedding
    neg_embeds: torch.Tensor | None = None  # true-CFG negative branch, when used
    neg_pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = (
        None  # (B, L) valid tokens, for families with unpadded text (Qwen-Image)
    )
    neg_mask: torch.Tensor | None = None

    def index(self, idx: torch.Tensor | slice) -> TextCond:
        pick = lambda t: None if t is None else t[idx]
        return TextCond(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


class TextCache:
    """Per-string text embeddings, valid only while the encoders are frozen.

    `encode(texts)` returns a tuple of (B, ...) tensors per text batch; rows are cached and
    re-stacked, so a prompt is encoded once per run instead of once per rollout step. Rows
    of different lengths (unpadded encoders) are right-padded with zeros when stacked.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], tuple[torch.Tensor, ...]],
        encoders: Callable[[], Iterable[torch.nn.Module]],
    ) -> None:
        self._encode, self._encoders = encode, encoders
        self._rows: dict[str, tuple[torch.Tensor, ...]] = {}

    def _trainable(self) -> bool:
        return any(
            m.training or any(p.requires_grad for p in m.parameters()) for m in self._encoders()
        )

    def __call__(self, texts: list[str], cache: bool = True) -> tuple[torch.Tensor, ...]:
        if self._trainable():
            # weights that can change make cached embeddings stale (and would cut the gradient)
            self._rows.clear()
            return self._encode(texts)
        if not cache:
            return self._encode(texts)
        missing = sorted({t for t in texts if t not in self._rows})
        if missing:
            with torch.no_grad():
                out = self._encode(missing)
            self._rows.update({t: tuple(o[i] for o in out) for i, t in enumerate(missing)})
        return tuple(
            pad_stack([self._rows[t][k] for t in texts]) for k in range(len(self._rows[texts[0]]))
        )


def cfg_text_cond(
    text: TextCache, texts: list[str], cache: bool, true_cfg_scale: float, negative_prompt: str
) -> TextCond:
    """(sequence, pooled) conditioning from `text`, plus the negative prompt's branch when true
    CFG is on."""
    cond = TextCond(*text(texts, cache))
    if true_cfg_scale > 1.0:
        cond.neg_embeds, cond.neg_pooled = text([negative_prompt] * len(texts), cache)
    return cond


def vae_latents(vae: torch.nn.Module, pixels: torch.Tensor, *, sample: bool) -> torch.Tensor:
    """Pixels -> (B, C, h, w) float latents normalised as the pipelines do: (z - shift) * scale."""
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    z = (dist.sample() if sample else dist.mean).float()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def vae_pixels(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `vae_latents`, decoded without grad to pixels in [-1, 1]."""
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        return vae.decode(z.to(vae.dtype)).sample


def pad_stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack rows, zero-padding their first dim to the longest (unpadded text encoders)."""
    n = max(r.shape[0] for r in rows) if rows[0].dim() else 0
    if not rows[0].dim() or all(r.shape[0] == n for r in rows):
        return torch.stack(rows)
    return torch.stack([torch.cat([r, r.new_zeros(n - r.shape[0], *r.shape[1:])]) for r in rows])


class FlowModel(Protocol):
    """A rectified-flow image model (generator or refiner) seen as a velocity field.

    Sampling and FlowGRPO only need: text/image encoding, a guided velocity and decoding.
    `ref` carries the image being edited (token-concatenated, Kontext style) or None.
    """

    transformer: torch.nn.Module
    encoders: list[torch.nn.Module]  # VAE and text encoders: frozen during RL

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The σ grid (num_steps + 1, ending at 0) of the checkpoint's scheduler at the adapter's
        size."""
        ...

    def encode_text(self, texts: list[str], *, cache: bool = True) -> TextCond: ...

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> list[Image.Image]: ...

    def noise(self, batch: int, generator: torch.Generator | None) -> torch.Tensor: ...

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, ref: torch.Tensor | None
    ) -> torch.Tensor: ...


def encode_condition(
    model: FlowModel, texts: list[str], images: list[Image.Image] | None, *, cache: bool = True
) -> tuple[TextCond, torch.Tensor | None]:
    """A batch's text conditioning and the reference latents of the images it edits (None:
    text-to-image).

    By default the text and the images are encoded apart (FLUX.1-Kontext). A family whose text
    encoder reads each image with its instruction (Qwen-Image-Edit) has `encode_edit(texts, images)`
    returning both, which is then used instead. `cache=False` skips the per-string text cache
    (one-off texts, e.g. SFT's, would only fill it).
    """
    if images is None:
        return model.encode_text(texts, cache=cache), None
    encode_edit = getattr(model, "encode_edit", None)
    if encode_edit is not None:
        return encode_edit(texts, images)
    return model.encode_text(texts, cache=cache), model.encode_images(images)


def _pipeline_mu(config: Mapping, image_seq_len: int) -> float:
    """The pipelines' `calculate_shift`: mu linear in the image sequence length (dynamic
    shifting)."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    b_lo, b_hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return b_lo + (image_seq_len - lo) * (b_hi - b_lo) / (hi - lo)


def scheduler_shift(config: Mapping | None, image_seq_len: int) -> float:
    """The time shift of a FlowMatchEulerDiscreteScheduler config at this image size.

    Static (`shift`, SD3) or resolution-dependent (`use_dynamic_shifting`, FLUX/Qwen-Image:
    mu interpolated in the sequence length, shift = e^mu, which is the pipelines' exponential
    time shift). 1.0 (no shift) without a scheduler.
    """
    if config is None:
        return 1.0
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    return math.exp(_pipeline_mu(config, image_seq_len))


# How each family's diffusers pipeline calls its scheduler's `set_timesteps` by default:
# "sd3" (StableDiffusion3Pipeline): no sigmas, so the scheduler spaces its timesteps linearly from
# its trained sigma_max to sigma_min and shifts them (SD3.5 at 10 steps: 1, .960, .913, ..., .278,
# .0089, 0); "flux" (FLUX, FLUX-Kontext, Qwen-Image, Qwen-Image-Edit): sigmas = linspace(1, 1/n, n)
# and the resolution's mu (FLUX-style: 1, .964, ..., .25, 0).
SIGMA_GRIDS = ("sd3", "flux")


def scheduler_sigmas(
    config: Mapping | None, image_seq_len: int, num_steps: int, grid: str = "flux"
) -> torch.Tensor:
    """The σ grid (num_steps + 1, ending at 0) the family's pipeline samples on at this size: the
    checkpoint's FlowMatchEulerDiscreteScheduler after `set_timesteps` called as the pipeline calls
    it (`grid`, see SIGMA_GRIDS), so its shift, `shift_terminal`, time-shift type and sigma
    conversions all apply. Without a scheduler config (the shapes world's tiny models): uniform and
    unshifted."""
    if grid not in SIGMA_GRIDS:
        raise ValueError(f"grid must be one of {SIGMA_GRIDS}, got {grid!r}")
    if config is None:
        return sigma_schedule(num_steps)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
    mu = (
        _pipeline_mu(scheduler.config, image_seq_len)
        if scheduler.config.use_dynamic_shifting
        else None
    )
    if grid == "sd3":
        scheduler.set_timesteps(num_steps, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.detach().float().cpu()


def saved_scheduler_config(path: str | Path) -> dict | None:
    """`scheduler/scheduler_config.json` of a diffusers folder, or None when it has no scheduler."""
    folder = Path(path) / "scheduler"
    if not (folder / "scheduler_config.json").exists():
        return None
    return dict(FlowMatchEulerDiscreteScheduler.load_config(folder))


class PipelineModel:
    """Plumbing shared by adapters that wrap a whole diffusers pipeline (SD3, Qwen-Image): load
    and save in the pipeline's own layout, and tell the transformer from the frozen rest."""

    PIPELINE: type  # the family's diffusers pipeline class
    SIGMA_GRID = "flux"  # how the pipeline sets its scheduler's timesteps (SIGMA_GRIDS)
    pipe: object
    transformer: torch.nn.Module

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, image_size: int, dtype: torch.dtype | None = None, **kwargs
    ):
        return cls(
            cls.load_pipeline(path, **({} if dtype is None else {"dtype": dtype})),
            image_size=image_size,
            **kwargs,
        )

    @classmethod
    def load_pipeline(cls, path: str | Path, **load):
        """The family's pipeline with every component from `path` (`load`: from_pretrained
        options)."""
        return cls.PIPELINE.from_pretrained(path, **load)

    def save_pretrained(self, path: str | Path) -> None:
        self.pipe.transformer = self.transformer
        self.pipe.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def encoders(self) -> list[torch.nn.Module]:
        """Everything but the transformer (kept frozen by the trainer)."""
        return [
            m
            for n, m in self.pipe.components.items()
            if n != "transformer" and isinstance(m, torch.nn.Module)
        ]

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The σ grid the family's pipeline samples on, for the adapter's (2x2-patched) latent
        grid."""
        return scheduler_sigmas(
            self.pipe.scheduler.config, (self.latent_hw // 2) ** 2, num_steps, self.SIGMA_GRID
        )
