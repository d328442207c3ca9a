"""Stable Diffusion 3 / 3.5 family adapter: a `StableDiffusion3Pipeline`'s components as a velocity
field.

The pipeline object is kept for what it does best, `encode_prompt` (two CLIPs + T5, exactly as
the pipeline combines them); only the denoising loop is ours. Latents are (B, C, H, W) for the
transformer and (B, H*W, C) tokens for the sampler, whose log-probs average over all of them.
SD3 is text-to-image only; its guidance is plain CFG, `v_neg + s (v - v_neg)`.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from r3rl.models.base import (
    PipelineModel,
    TextCache,
    TextCond,
    cfg_text_cond,
    vae_latents,
    vae_pixels,
)
from r3rl.models.flux import to_pil, to_tensor


class SD3Model(PipelineModel):
    """SD3 components; `true_cfg_scale` is the pipeline's `guidance_scale` (1 = no CFG)."""

    PIPELINE = StableDiffusion3Pipeline
    SIGMA_GRID = (
        "sd3"  # the pipeline passes no sigmas: 1, .960, .913, ..., .0089, 0 at 10 steps (shift 3)
    )

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        *,
        image_size: int,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = "",
        max_text_len: int = 256,
        guidance_scale: float = 1.0,
    ) -> None:
        if guidance_scale != 1.0:
            raise ValueError(
                "SD3 has no distilled guidance embedding: use cfg_scale, not guidance_scale"
            )
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae
        self.image_size, self.true_cfg_scale = image_size, true_cfg_scale
        self.negative_prompt, self.max_text_len = negative_prompt, max_text_len
        self.latent_hw = image_size // pipe.vae_scale_factor
        encoders = lambda: [
            m
            for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
            if m is not None
        ]
        self._text = TextCache(self._encode_uncached, encoders)

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_text_len,
        )
        return embeds, pooled

    def encode_text(self, texts: list[str], *, cache: bool = True) -> TextCond:
        return cfg_text_cond(self._text, texts, cache, self.true_cfg_scale, self.negative_prompt)

    # ------------------------------------------------------------------ images
    def encode_images(self, images: list[Image.Image], *, sample: bool = False) -> torch.Tensor:
        z = vae_latents(self.vae, to_tensor(images, self.image_size).to(self.device), sample=sample)
        return z.flatten(2).transpose(1, 2)

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.latent_hw, self.latent_hw)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return to_pil(vae_pixels(self.vae, self._grid(latents)))

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        ch = self.transformer.config.in_channels
        return torch.randn(batch, self.latent_hw**2, ch, generator=generator).to(self.device)

    # ------------------------------------------------------------------ velocity
    def _forward(
        self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor
    ):
        dt = self.transformer.dtype
        out = self.transformer(
            hidden_states=self._grid(x).to(dt),
            timestep=(sigma * 1000).to(x.device, dt),
            encoder_hidden_states=embeds.to(dt),
            pooled_projections=pooled.to(dt),
            return_dict=False,
        )[0]
        return out.float().flatten(2).transpose(1, 2)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, ref: torch.Tensor | None
    ) -> torch.Tensor:
        """CFG-guided velocity; the pipeline's timestep is sigma x 1000."""
        if ref is not None:
            raise ValueError("SD3 is a text-to-image family: it cannot refine a reference image")
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
        v = self._forward(x, sigma, cond.embeds, cond.pooled)
        if self.true_cfg_scale > 1.0:
            v_neg = self._forward(x, sigma, cond.neg_embeds, cond.neg_pooled)
            v = v_neg + self.true_cfg_scale * (v - v_neg)
        return v
