"""Qwen-Image family adapters: `QwenImagePipeline` (text-to-image) and `QwenImageEditPipeline` /
`QwenImageEditPlusPipeline` (edit) components as velocity fields.

The pipeline object supplies `encode_prompt` (its Qwen2.5-VL text encoder, chat template and
dropped system-prompt tokens, unpadded embeddings + mask); only the denoising loop is ours.
Latents use FLUX's 2x2 packing; the VAE is Qwen-Image's video VAE (one frame) normalised by
its per-channel latents_mean/std; timestep = sigma. True CFG follows the pipeline, including
its rescale of the guided velocity to the conditional one's norm per token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from PIL import Image

from r3rl.models.base import PipelineModel, TextCache, TextCond, pad_stack
from r3rl.models.flux import pack_latents, to_pil, to_tensor, unpack_latents
from r3rl.models.reflector import load_processor


def guided(v: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: `v_neg + s (v - v_neg)`, rescaled per token to the norm of `v`."""
    comb = v_neg + scale * (v - v_neg)
    return comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


class QwenImageModel(PipelineModel):
    """Qwen-Image components; `true_cfg_scale > 1` runs the negative-prompt branch (pipeline
    default " ")."""

    PIPELINE = QwenImagePipeline
    EDITS = False  # whether the transformer reads reference (edited-image) tokens

    def __init__(
        self,
        pipe: QwenImagePipeline,
        *,
        image_size: int,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = " ",
        guidance_scale: float = 1.0,
        max_text_len: int = 512,
    ) -> None:
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae
        self.image_size, self.true_cfg_scale, self.guidance_scale = (
            image_size,
            true_cfg_scale,
            guidance_scale,
        )
        self.negative_prompt, self.max_text_len = negative_prompt, max_text_len
        self.latent_hw = image_size // pipe.vae_scale_factor
        self._text = TextCache(self._encode_uncached, lambda: [pipe.text_encoder])

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            texts, device=self.device, max_sequence_length=self.max_text_len
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def encode_text(self, texts: list[str], *, cache: bool = True) -> TextCond:
        """Unpadded per-prompt embeddings, zero-padded to the batch's longest with a 0/1 mask."""
        neg = (
            self._text([self.negative_prompt] * len(texts), cache)
            if self.true_cfg_scale > 1.0
            else None
        )
        return _text_cond(self._text(texts, cache), neg)

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
    def _forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        ref: torch.Tensor | None,
    ) -> torch.Tensor:
        """The transformer's velocity on the noisy tokens; reference tokens (same grid) follow them
        in the sequence, with a second `img_shapes` entry, and their outputs are dropped."""
        dt, b = self.transformer.dtype, x.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        grid = (1, self.latent_hw // 2, self.latent_hw // 2)
        out = self.transformer(
            hidden_states=(x if ref is None else torch.cat([x, ref], dim=1)).to(dt),
            timestep=sigma.to(x.device, dt),
            guidance=guidance,
            encoder_hidden_states=embeds.to(dt),
            encoder_hidden_states_mask=None if mask.all() else mask,
            img_shapes=[[grid] * (1 if ref is None else 2)] * b,
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]].float()

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, ref: torch.Tensor | None
    ) -> torch.Tensor:
        """Guided velocity; Qwen-Image-Edit without `ref` draws from its (image-aware) text
        conditioning alone, no VAE latents of the image (`refiner.mode: regenerate`)."""
        if ref is not None and not self.EDITS:
            raise ValueError(
                "Qwen-Image (text-to-image) cannot refine a reference image; "
                "load a Qwen-Image-Edit checkpoint as the refiner"
            )
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
        v = self._forward(x, sigma, cond.embeds, cond.mask, ref)
        if self.true_cfg_scale > 1.0:
            v = guided(
                v, self._forward(x, sigma, cond.neg_embeds, cond.neg_mask, ref), self.true_cfg_scale
            )
        return v


def _text_cond(
    pos: tuple[torch.Tensor, torch.Tensor], neg: tuple[torch.Tensor, torch.Tensor] | None
) -> TextCond:
    """(embeds, mask) of the prompts and, with true CFG, of the negative prompt; Qwen-Image has
    no pooled text."""
    embeds, mask = pos
    cond = TextCond(embeds, mask.new_zeros(len(embeds), 0), mask=mask)
    if neg is not None:
        cond.neg_embeds, cond.neg_mask = neg
        cond.neg_pooled = cond.pooled
    return cond


class QwenImageEditModel(QwenImageModel):
    """Qwen-Image-Edit (or -Edit-Plus) components: the Qwen2.5-VL text encoder reads each
    instruction together with its image (the pipeline's own prompt template and image tokens), and
    the image's VAE latents join the noisy tokens as reference tokens.

    The canvas is square, `image_size`: the reference is encoded at that size and, for Edit, the
    encoder sees the image at that size too (the pipeline: both at a 1024^2 area, so identical at
    image_size 1024); Edit-Plus shows the encoder a 384 x 384 image, as its pipeline does. Each
    sample's text is encoded in its own call, as Edit-Plus reads a list of images as one prompt's.
    """

    PIPELINE = QwenImageEditPipeline  # its LoRA format (`load_lora_weights`) is also Edit-Plus's
    EDITS = True
    PLUS_CONDITION_SIZE = 384  # QwenImageEditPlusPipeline's CONDITION_IMAGE_SIZE = 384 * 384

    @classmethod
    def load_pipeline(cls, path: str | Path, **load):
        """Edit or Edit-Plus, as `model_index.json` says; the processor is loaded by r3rl's
        `load_processor`, which also works where the Qwen-VL video processor cannot load."""
        index = json.loads((Path(path) / "model_index.json").read_text())
        pipeline = EDIT_PIPELINES[index["_class_name"]]
        return pipeline.from_pretrained(
            path, processor=load_processor(Path(path) / "processor"), **load
        )

    def encode_text(self, texts: list[str], *, cache: bool = True) -> TextCond:
        raise ValueError(
            "Qwen-Image-Edit's text encoder reads the image with the instruction: use encode_edit"
        )

    def _encode_with_image(
        self, texts: list[str], images: list[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for text, image in zip(texts, images, strict=True):
            embeds, mask = self.pipe.encode_prompt([text], image=image, device=self.device)
            rows.append(embeds[0] if mask is None else embeds[0][mask[0].bool()])
        embeds = pad_stack(rows)
        lengths = torch.tensor([len(r) for r in rows], device=embeds.device)
        return embeds, (
            torch.arange(embeds.shape[1], device=embeds.device)[None] < lengths[:, None]
        ).long()

    def encode_text_with_images(self, texts: list[str], images: list[Image.Image]) -> TextCond:
        """Each text read together with its image (the negative prompt too, under true CFG): the
        semantic conditioning, without the VAE latents."""
        side = (
            self.PLUS_CONDITION_SIZE
            if isinstance(self.pipe, QwenImageEditPlusPipeline)
            else self.image_size
        )
        seen = [self.pipe.image_processor.resize(im.convert("RGB"), side, side) for im in images]
        neg = None
        if self.true_cfg_scale > 1.0:
            neg = self._encode_with_image([self.negative_prompt] * len(texts), seen)
        return _text_cond(self._encode_with_image(texts, seen), neg)

    def encode_edit(
        self, texts: list[str], images: list[Image.Image]
    ) -> tuple[TextCond, torch.Tensor]:
        """(instruction + image conditioning; reference latents of the images)."""
        return self.encode_text_with_images(texts, images), self.encode_images(images)


EDIT_PIPELINES = {p.__name__: p for p in (QwenImageEditPipeline, QwenImageEditPlusPipeline)}
