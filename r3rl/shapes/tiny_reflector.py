"""The shapes world's reflector: a tiny Qwen2.5-VL built from a config, and its SFT.

It is the real `Qwen2_5_VLForConditionalGeneration` and `Qwen2_5_VLProcessor` (random
weights, locally trained tokenizer), wrapped by the same `HFReflector` a 7B checkpoint uses,
so everything the shapes demo exercises is the production path.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from r3rl.models.reflector import REFLECTION_PROMPT, HFReflector, image_only_processor, sft_loss
from r3rl.models.tokenizer import train_chat_tokenizer

HIDDEN, LAYERS, HEADS, KV_HEADS = 128, 2, 4, 2
VISION_HIDDEN, VISION_DEPTH, VISION_HEADS = 64, 2, 4
# head_dim 32 -> 16 rotary frequencies, split over (time, height, width) as Qwen splits 64
MROPE_SECTION = [4, 6, 6]
# patches per image side; the 2x2 merge then leaves (8/2)^2 = 16 visual tokens per image
PATCHES_PER_SIDE = 8


def _processor(tokenizer, image_size: int) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL processor whose resize keeps every image at image_size^2 pixels (16 tokens)."""
    images = Qwen2VLImageProcessorPil(
        patch_size=image_size // PATCHES_PER_SIDE,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=image_size * image_size,
        max_pixels=image_size * image_size,
    )
    cls = image_only_processor(Qwen2_5_VLProcessor)
    return cls(image_processor=images, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _config(tokenizer, image_size: int) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": MROPE_SECTION,
        },
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "depth": VISION_DEPTH,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_heads": VISION_HEADS,
        "patch_size": image_size // PATCHES_PER_SIDE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        # one attention window covering the whole (small) image
        "window_size": image_size,
        "fullatt_block_indexes": [VISION_DEPTH - 1],
        "out_hidden_size": HIDDEN,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def build_tiny_reflector(corpus: Sequence[str], image_size: int, *, seed: int = 0) -> HFReflector:
    """A random-weight tiny Qwen2.5-VL reflector whose tokenizer is trained on `corpus` (+ the
    prompt).

    `image_size` must be a multiple of 8 (patch size image_size/8).
    """
    if image_size % PATCHES_PER_SIDE:
        raise ValueError(f"image_size must be a multiple of {PATCHES_PER_SIDE}, got {image_size}")
    tokenizer = train_chat_tokenizer([*corpus, REFLECTION_PROMPT.format(prompt="")])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(_config(tokenizer, image_size))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return HFReflector(model, _processor(tokenizer, image_size))


def sft_reflector(
    reflector: HFReflector,
    examples: Sequence[tuple[str, Image.Image, str]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    plan_examples: Sequence[tuple[str, str]] = (),
    plan_every: int = 3,
) -> list[float]:
    """Supervised fine-tuning on (prompt, image, target reflection) triples; returns per-step
    losses.

    AdamW on all trainable parameters; batches are drawn without replacement per epoch.
    `plan_examples`, (planning turn, target plan) pairs of text-only turns (`rollout.reason`),
    make every `plan_every`-th of the `steps` a planning batch (images and text-only turns never
    share a batch). `progress(step, loss)` is called after every step.
    """
    rng = random.Random(seed)
    params = reflector.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr)
    orders: dict[bool, list[int]] = {False: [], True: []}
    losses = []
    reflector.model.train()
    for step in range(steps):
        plans = bool(plan_examples) and step % plan_every == plan_every - 1
        pool = plan_examples if plans else examples
        order = orders[plans]
        if len(order) < batch_size:
            order += rng.sample(range(len(pool)), len(pool))
        batch, orders[plans] = [pool[i] for i in order[:batch_size]], order[batch_size:]
        if plans:
            turns, targets = zip(*batch)
            loss = sft_loss(reflector, turns, None, targets)
        else:
            prompts, images, targets = zip(*batch)
            loss = sft_loss(reflector, prompts, images, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    reflector.model.eval()
    return losses
