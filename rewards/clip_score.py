"""clip_score and pickscore: image-text agreement from a CLIP-family model in a local folder.

Both are the diagonal of CLIP's `logits_per_image` (logit scale x cosine of the projected
embeddings) divided by FlowGRPO's constants: 100 for CLIP (so the score is about the cosine)
and 26 for PickScore (so typical scores sit near 0.8-0.9). PickScore is a fine-tuned CLIP-H
whose processor comes from a separate folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K).

    rewards:
      - {name: pickscore, args: {model_path: /models/PickScore_v1,
                                 processor_path: /models/CLIP-ViT-H-14-laion2B-s32B-b79K}}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from r3rl.errors import UserError


class ClipScore:
    """`logits_per_image` of each (prompt, image) pair / `divisor`; the model loads in `setup()`."""

    divisor = 100.0

    def __init__(
        self,
        model_path: str,
        processor_path: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        for path in (model_path, processor_path):
            if path is not None and not Path(path).is_dir():
                raise UserError(f"{type(self).__name__.lower()}: model folder not found: {path}")
        self.model_path = model_path
        self.processor_path = processor_path or model_path
        self.device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size

    def setup(self) -> None:
        self.model = CLIPModel.from_pretrained(self.model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.processor_path)
        self.image_processor = AutoImageProcessor.from_pretrained(self.processor_path)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def _batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[float]:
        text = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        pixels = self.image_processor(
            images=[im.convert("RGB") for im in images], return_tensors="pt"
        )
        out = self.model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=pixels["pixel_values"].to(self.device, self.dtype),
        )
        return (out.logits_per_image.diagonal().float() / self.divisor).tolist()

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[float]:
        n = self.batch_size
        return [
            s
            for i in range(0, len(prompts), n)
            for s in self._batch(prompts[i : i + n], images[i : i + n])
        ]


class PickScore(ClipScore):
    """PickScore_v1 (a CLIP-H fine-tuned on human preferences), normalised as FlowGRPO does."""

    divisor = 26.0
