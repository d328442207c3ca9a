"""`refiner.mode: regenerate` (RvR, seed 000): regenerate from the target prompt plus semantic
tokens of the current image, never its VAE latents.

The semantic tokens are the image tokens a vision-language model's language model reads
(its vision tower + merger, e.g. Qwen2.5-VL's), projected into the refiner's text space and
appended to the prompt's sequence embeddings. To the rollout and FlowGRPO this is an ordinary
FlowModel whose "reference" is those projected tokens: no reference latents enter the
transformer, so nothing pins the pixels.

A refiner whose text encoder is itself a VLM reading the image (Qwen-Image-Edit: its Qwen2.5-VL
is the model's semantic path, the VAE latents its appearance path) needs no second encoder:
the target prompt is read together with the image, and only the VAE latents are left out.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from PIL import Image
from transformers import AutoModelForImageTextToText

from r3rl.errors import UserError
from r3rl.models.base import FlowModel, TextCond
from r3rl.models.placement import execution_device, place_frozen
from r3rl.models.reflector import load_processor

ENCODER_DIR, PROJECTION_DIR = "semantic_encoder", "semantic_projection"


class SemanticProjection(torch.nn.Module, PyTorchModelHubMixin):
    """Vision-language tokens -> the refiner's text-embedding space (saved as config +
    safetensors)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(in_dim)
        self.proj = torch.nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens))


class VLMSemanticEncoder:
    """Image tokens of any transformers VLM with `get_image_features` (frozen): (B, N, D)."""

    def __init__(self, model: torch.nn.Module, processor) -> None:
        self.model, self.processor = model.eval().requires_grad_(False), processor
        self.dim = model.config.get_text_config().hidden_size

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, trust_remote_code: bool = False
    ) -> VLMSemanticEncoder:
        model = AutoModelForImageTextToText.from_pretrained(
            path, trust_remote_code=trust_remote_code
        )
        return cls(model, load_processor(path, trust_remote_code=trust_remote_code))

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor.image_processor(
            images=[im.convert("RGB") for im in images], return_tensors="pt"
        )
        dev = execution_device(self.model)
        inputs = {k: v.to(dev) for k, v in inputs.items() if torch.is_tensor(v)}
        tokens = self.model.get_image_features(**inputs).pooler_output
        if len({t.shape[0] for t in tokens}) != 1:
            raise ValueError(
                "semantic encoder: images gave different token counts; resize them to one size"
            )
        return torch.stack(list(tokens))


class RegenerateRefiner:
    """Target prompt (+ optionally the reflector's critique) and semantic tokens -> a new image.

    `encoder` and `projection` are None for a refiner that reads the image with its own text
    encoder (one with `encode_edit`, Qwen-Image-Edit); this wrapper then has `encode_edit` too.
    """

    def __init__(
        self,
        inner: FlowModel,
        encoder: VLMSemanticEncoder | None,
        projection: SemanticProjection | None,
        *,
        append_critique: bool = False,
    ) -> None:
        self.inner, self.encoder, self.projection = inner, encoder, projection
        self.append_critique = append_critique
        if encoder is None:  # `encode_condition` must pass the images to the text encoder
            self.encode_edit = self._encode_prompt_with_images

    # ------------------------------------------------------------------ loading
    @classmethod
    def around(
        cls,
        inner: FlowModel,
        path: str | Path,
        *,
        encoder: str | Path | None = None,
        append_critique: bool = False,
    ) -> RegenerateRefiner:
        """Wrap a loaded FLUX(-Kontext) refiner with the `semantic_projection/` saved in its folder
        and the VLM at `encoder` (default: the folder's own `semantic_encoder/`); a Qwen-Image-Edit
        refiner is its own semantic encoder."""
        if hasattr(inner, "encode_edit"):
            if encoder is not None:
                raise UserError(
                    f"refiner.regenerate.semantic_encoder={str(encoder)!r}: a Qwen-Image-Edit "
                    "refiner "
                    "reads the image with its own text encoder; leave it unset (null)"
                )
            return cls(inner, None, None, append_critique=append_critique)
        p = Path(path)
        enc_path = Path(encoder) if encoder is not None else p / ENCODER_DIR
        if not (p / PROJECTION_DIR).exists() or not enc_path.exists():
            raise UserError(
                f"refiner.mode=regenerate needs {p / PROJECTION_DIR} and a semantic encoder at "
                f"{enc_path}; "
                "train them with `r3rl sft` (refiner.mode=regenerate) first"
            )
        projection = (
            SemanticProjection.from_pretrained(p / PROJECTION_DIR).requires_grad_(False).eval()
        )
        return cls(
            inner,
            VLMSemanticEncoder.from_pretrained(enc_path),
            projection,
            append_critique=append_critique,
        )

    def place_semantic(self, *, offload_encoder: bool) -> None:
        """Put the semantic encoder and projection where the refiner runs; with `offload_encoder`
        the VLM stays in host memory like the refiner's other frozen encoders."""
        if self.encoder is not None:
            place_frozen(self.encoder.model, self.inner.device, offload_it=offload_encoder)
            self.projection.to(self.inner.device)

    def save_pretrained(self, path: str | Path) -> None:
        p = Path(path)
        self.inner.save_pretrained(p)
        if self.encoder is not None:
            self.encoder.save_pretrained(p / ENCODER_DIR)
            self.projection.save_pretrained(p / PROJECTION_DIR)

    # ------------------------------------------------------------------ FlowModel
    @property
    def transformer(self) -> torch.nn.Module:
        return self.inner.transformer

    @transformer.setter
    def transformer(self, module: torch.nn.Module) -> None:  # the trainer swaps in its KL reference
        self.inner.transformer = module

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    def compose(self, meta: dict, instruction: str) -> str:
        """Conditioning text: the full target prompt, with the critique appended when configured."""
        return f"{meta['prompt']} , {instruction}" if self.append_critique else meta["prompt"]

    def encode_text(self, texts: list[str], **kwargs) -> TextCond:
        return self.inner.encode_text(texts, **kwargs)

    def encode_images(self, images: list[Image.Image], **kwargs) -> torch.Tensor:
        """Projected semantic tokens (B, N, D_text) of the current images; no VAE involved."""
        return self.projection(self.encoder(images).to(self.inner.device))

    def _encode_prompt_with_images(
        self, texts: list[str], images: list[Image.Image]
    ) -> tuple[TextCond, None]:
        """The refiner's own VLM text encoder reads each prompt with its image; no reference
        latents."""
        return self.inner.encode_text_with_images(texts, images), None

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, ref: torch.Tensor | None
    ) -> torch.Tensor:
        if ref is not None:  # the image conditions both CFG branches: guidance is on the text only
            cat = lambda e: None if e is None else torch.cat([e, ref.to(e.dtype)], dim=1)
            ones = lambda m: (
                None if m is None else torch.cat([m, m.new_ones(m.shape[0], ref.shape[1])], dim=1)
            )
            cond = replace(
                cond,
                embeds=cat(cond.embeds),
                neg_embeds=cat(cond.neg_embeds),
                mask=ones(cond.mask),
                neg_mask=ones(cond.neg_mask),
            )
        return self.inner.velocity(x, sigma, cond, None)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return self.inner.decode(latents)

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.noise(batch, generator)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return self.inner.sigmas(num_steps)
