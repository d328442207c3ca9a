"""FLUX / FLUX.1-Kontext family adapter: diffusers components seen as a guided velocity field.

Only the sampling loop is replaced (SDE with log-probs lives in `r3rl.sampling`); the
transformer, VAE, text encoders and conventions (2x2 latent packing, RoPE ids, Kontext's
reference tokens with id[0]=1, timestep = sigma) are exactly the pipeline's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from r3rl.models.base import (
    TextCache,
    TextCond,
    cfg_text_cond,
    saved_scheduler_config,
    scheduler_sigmas,
    vae_latents,
    vae_pixels,
)

ADAPTER_FILE = "r3rl_adapter.json"  # adapter settings saved next to the diffusers components


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2*W/2, 4C), FLUX's 2x2 patch packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent grid of h x w."""
    b, _, ch = x.shape
    x = x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def latent_ids(h: int, w: int, first: float = 0.0) -> torch.Tensor:
    """RoPE ids (h/2*w/2, 3) of packed tokens; Kontext marks reference tokens with first=1."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL RGB -> (B, 3, size, size) in [-1, 1]."""
    arr = np.stack(
        [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB."""
    arr = (
        x.detach()
        .float()
        .clamp(-1, 1)
        .add(1)
        .mul(127.5)
        .round()
        .byte()
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [Image.fromarray(a) for a in arr]


class FluxModel:
    """FLUX.1 (text-to-image) or FLUX.1-Kontext (edit: reference tokens appended) components.

    `guidance_scale` feeds the distilled guidance embedding when the transformer has one;
    `true_cfg_scale > 1` runs a negative-prompt branch, and the *guided* velocity is what
    sampling and log-probs use (FlowGRPO's requirement; R3 got this wrong).
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2,
        *,
        image_size: int,
        guidance_scale: float = 1.0,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = "",
        max_text_len: int = 32,
        scheduler_config: dict | None = None,
    ) -> None:
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.image_size = image_size
        self.guidance_scale, self.true_cfg_scale = guidance_scale, true_cfg_scale
        self.negative_prompt, self.max_text_len = negative_prompt, max_text_len
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_hw = image_size // self.vae_scale
        self.scheduler_config = scheduler_config  # the checkpoint's scheduler (None: unshifted σ)
        self._text = TextCache(
            self._encode_uncached, lambda: (self.text_encoder, self.text_encoder_2)
        )

    # ------------------------------------------------------------------ loading
    COMPONENTS = (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
    )
    # the pipeline whose LoRA format (`save_lora_weights` / `load_lora_weights`) adapters use
    PIPELINE = FluxKontextPipeline

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, image_size: int, dtype: torch.dtype | None = None, **kwargs
    ) -> FluxModel:
        """Load the diffusers-layout folder a FLUX(-Kontext) checkpoint uses; settings saved by
        `save_pretrained` (max_text_len) are defaults that `kwargs` override. A checkpoint without
        them (an official one) gets the pipelines' T5 length, 512."""
        p = Path(path)
        settings = (
            json.loads((p / ADAPTER_FILE).read_text())
            if (p / ADAPTER_FILE).exists()
            else {"max_text_len": 512}
        )
        load = {} if dtype is None else {"dtype": dtype}
        return cls(
            FluxTransformer2DModel.from_pretrained(p / "transformer", **load),
            AutoencoderKL.from_pretrained(p / "vae", **load),
            CLIPTextModel.from_pretrained(p / "text_encoder", **load),
            AutoTokenizer.from_pretrained(p / "tokenizer"),
            T5EncoderModel.from_pretrained(p / "text_encoder_2", **load),
            AutoTokenizer.from_pretrained(p / "tokenizer_2"),
            image_size=image_size,
            scheduler_config=saved_scheduler_config(p),
            **{**settings, **kwargs},
        )

    def save_pretrained(self, path: str | Path) -> None:
        p = Path(path)
        for name in self.COMPONENTS:
            getattr(self, name).save_pretrained(p / name)
        # the padded text length changes T5's output (no attention mask, as in FluxPipeline),
        # so it belongs to the weights; sampling settings (guidance) stay the caller's
        (p / ADAPTER_FILE).write_text(json.dumps({"max_text_len": self.max_text_len}))

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def encoders(self) -> list[torch.nn.Module]:
        """Everything but the transformer (kept frozen by the trainer)."""
        return [self.vae, self.text_encoder, self.text_encoder_2]

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The checkpoint scheduler's σ grid for this size's packed latent grid."""
        return scheduler_sigmas(self.scheduler_config, (self.latent_hw // 2) ** 2, num_steps)

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        # CLIP has 77 positions (FluxPipeline cuts it there); max_text_len (512) is T5's budget
        clip_len = min(self.max_text_len, self.text_encoder.config.max_position_embeddings)
        tok = self.tokenizer(
            texts, padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt"
        )
        pooled = self.text_encoder(input_ids=tok.input_ids.to(dev)).pooler_output
        tok2 = self.tokenizer_2(
            texts,
            padding="max_length",
            max_length=self.max_text_len,
            truncation=True,
            return_tensors="pt",
        )
        embeds = self.text_encoder_2(input_ids=tok2.input_ids.to(dev)).last_hidden_state
        return embeds, pooled

    def encode_text(self, texts: list[str], *, cache: bool = True) -> TextCond:
        """Sequence (T5) + pooled (CLIP) embeddings; cached per string while both encoders are
        frozen (eval mode, no grad); the cache is dropped whenever either one is trainable."""
        return cfg_text_cond(self._text, texts, cache, self.true_cfg_scale, self.negative_prompt)

    # ------------------------------------------------------------------ images
    def encode_images(self, images: list[Image.Image], *, sample: bool = False) -> torch.Tensor:
        """PIL -> normalised, packed latents (B, N, 4C)."""
        return pack_latents(
            vae_latents(self.vae, to_tensor(images, self.image_size).to(self.device), sample=sample)
        )

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return to_pil(vae_pixels(self.vae, unpack_latents(latents, self.latent_hw, self.latent_hw)))

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n = (self.latent_hw // 2) ** 2
        ch = self.transformer.config.in_channels
        return torch.randn(batch, n, ch, generator=generator).to(self.device)

    # ------------------------------------------------------------------ velocity
    def _forward(self, x, sigma, embeds, pooled, ref):
        h = w = self.latent_hw
        img_ids = latent_ids(h, w)
        inp = x
        if ref is not None:
            inp = torch.cat([x, ref], dim=1)
            img_ids = torch.cat([img_ids, latent_ids(h, w, first=1.0)], dim=0)
        txt_ids = torch.zeros(embeds.shape[1], 3)
        dt = self.transformer.dtype  # bf16 weights take bf16 inputs; sampling math stays float32
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=dt)
        out = self.transformer(
            hidden_states=inp.to(dt),
            encoder_hidden_states=embeds.to(dt),
            pooled_projections=pooled.to(dt),
            timestep=sigma.to(x.device, dt),
            img_ids=img_ids.to(x.device),
            txt_ids=txt_ids.to(x.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]].float()

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, ref: torch.Tensor | None
    ) -> torch.Tensor:
        """Guided velocity (epsilon - x0 convention, as FlowMatchEulerDiscreteScheduler)."""
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
        v = self._forward(x, sigma, cond.embeds, cond.pooled, ref)
        if self.true_cfg_scale > 1.0:
            v_neg = self._forward(x, sigma, cond.neg_embeds, cond.neg_pooled, ref)
            v = v_neg + self.true_cfg_scale * (v - v_neg)
        return v
