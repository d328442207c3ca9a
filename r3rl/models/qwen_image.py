"""Qwen-Image (text-to-image) family adapter: a `QwenImagePipeline`'s components as a velocity field.

The pipeline object supplies `encode_prompt` (its Qwen2.5-VL text encoder, chat template and
dropped system-prompt tokens, unpadded embeddings + mask); only the denoising loop is ours.
Latents use FLUX's 2x2 packing; the VAE is Qwen-Image's video VAE (one frame) normalised by
its per-channel latents_mean/std; timestep = sigma. True CFG follows the pipeline, including
its rescale of the guided velocity to the conditional one's norm per token.
"""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline
from PIL import Image

from r3rl.models.base import PipelineModel, TextCache, TextCond, scheduler_shift
from r3rl.models.flux import pack_latents, to_pil, to_tensor, unpack_latents


def guided(v: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: `v_neg + s (v - v_neg)`, rescaled per token to the norm of `v`."""
    comb = v_neg + scale * (v - v_neg)
    return comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


class QwenImageModel(PipelineModel):
    """Qwen-Image components; `true_cfg_scale > 1` runs the negative-prompt branch (pipeline default " ")."""

    PIPELINE = QwenImagePipeline

    def __init__(self, pipe: QwenImagePipeline, *, image_size: int, true_cfg_scale: float = 1.0,
                 negative_prompt: str = " ", guidance_scale: float = 1.0, max_text_len: int = 512) -> None:
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae
        self.image_size, self.true_cfg_scale, self.guidance_scale = image_size, true_cfg_scale, guidance_scale
        self.negative_prompt, self.max_text_len = negative_prompt, max_text_len
        self.latent_hw = image_size // pipe.vae_scale_factor
        self.sigma_shift = scheduler_shift(pipe.scheduler.config, (self.latent_hw // 2) ** 2)
        self._text = TextCache(self._encode_uncached, lambda: [pipe.text_encoder])

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(texts, device=self.device, max_sequence_length=self.max_text_len)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def encode_text(self, texts: list[str], *, cache: bool = True) -> TextCond:
        """Unpadded per-prompt embeddings, zero-padded to the batch's longest with a 0/1 mask."""
        embeds, mask = self._text(texts, cache)
        cond = TextCond(embeds, mask.new_zeros(len(texts), 0), mask=mask)
        if self.true_cfg_scale > 1.0:
            cond.neg_embeds, cond.neg_mask = self._text([self.negative_prompt] * len(texts), cache)
            cond.neg_pooled = cond.pooled
        return cond

    # ------------------------------------------------------------------ images
    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        view = lambda v: torch.tensor(v).view(1, c.z_dim, 1, 1, 1).to(self.device)
        return view(c.latents_mean), view(c.latents_std)

    def encode_images(self, images: list[Image.Image], *, sample: bool = False) -> torch.Tensor:
        x = to_tensor(images, self.image_size).to(self.device, self.vae.dtype)[:, :, None]
        dist = self.vae.encode(x).latent_dist
        mean, std = self._stats()
        z = ((dist.sample() if sample else dist.mean).float() - mean) / std
        return pack_latents(z[:, :, 0])

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        mean, std = self._stats()
        z = unpack_latents(latents, self.latent_hw, self.latent_hw)[:, :, None] * std + mean
        with torch.no_grad():
            return to_pil(self.vae.decode(z.to(self.vae.dtype)).sample[:, :, 0])

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n, ch = (self.latent_hw // 2) ** 2, self.transformer.config.in_channels
        return torch.randn(batch, n, ch, generator=generator).to(self.device)

    # ------------------------------------------------------------------ velocity
    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor):
        dt, b = self.transformer.dtype, x.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=x.to(dt), timestep=sigma.to(x.device, dt), guidance=guidance,
            encoder_hidden_states=embeds.to(dt), encoder_hidden_states_mask=None if mask.all() else mask,
            img_shapes=[[(1, self.latent_hw // 2, self.latent_hw // 2)]] * b, return_dict=False,
        )[0]
        return out.float()

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, ref: torch.Tensor | None) -> torch.Tensor:
        if ref is not None:
            raise ValueError("Qwen-Image (text-to-image) cannot refine a reference image; "
                             "Qwen-Image-Edit is not supported yet")
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
        v = self._forward(x, sigma, cond.embeds, cond.mask)
        if self.true_cfg_scale > 1.0:
            v = guided(v, self._forward(x, sigma, cond.neg_embeds, cond.neg_mask), self.true_cfg_scale)
        return v
