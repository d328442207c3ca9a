"""Tiny random-weight chat VLMs of several families, built from the real transformers classes.

Reflector checkpoints cannot be downloaded here, so each supported family is proven on a
model built from a tiny config (random weights, a locally trained tokenizer in the family's
chat style, the family's own processor) and saved in the layout a real checkpoint has. They
load through `HFReflector.from_pretrained`, exactly as a user's 7B checkpoint would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from r3rl.models.reflector import REFLECTION_PROMPT, HFReflector, image_only_processor
from r3rl.models.tokenizer import GEMMA, SMOLVLM, train_chat_tokenizer

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 4, 2, 16
VISION_HIDDEN, VISION_HEADS = 32, 2
PATCHES_PER_SIDE = 8  # patch size = image_size / 8
GEMMA_IMAGE_TOKENS = 4  # soft tokens per image (2x2 after pooling 8x8 patches)
IDEFICS3_SCALE = 4  # pixel shuffle: 8x8 patches -> (8/4)^2 = 4 image tokens


def _text(tokenizer) -> dict:
    """The language model's size, shared by every family (head_dim 16 = 8 rotary frequencies)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _qwen3_vl(corpus: Sequence[str], image_size: int) -> HFReflector:
    tokenizer = train_chat_tokenizer(corpus)
    ids = tokenizer.convert_tokens_to_ids
    patch = image_size // PATCHES_PER_SIDE
    text = _text(tokenizer) | {
        # 8 rotary frequencies interleaved over (time, height, width) as Qwen3 splits 64
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    }  # fmt: skip
    vision = {
        "depth": 2,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_heads": VISION_HEADS,
        "patch_size": patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": HIDDEN,
        "num_position_embeddings": PATCHES_PER_SIDE**2,  # a learned 8x8 grid, interpolated
        "deepstack_visual_indexes": [0],  # layer 0's features also join the LM (Qwen3's DeepStack)
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    images = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        min_pixels=image_size * image_size, max_pixels=image_size * image_size,
    )  # fmt: skip
    processor = image_only_processor(Qwen3VLProcessor)(
        image_processor=images, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return HFReflector(Qwen3VLForConditionalGeneration(config), processor)


def _gemma3(corpus: Sequence[str], image_size: int) -> HFReflector:
    tokenizer = train_chat_tokenizer(corpus, style=GEMMA)
    text = _text(tokenizer) | {
        "query_pre_attn_scalar": HEAD_DIM,
        "sliding_window": 512,
        "layer_types": ["sliding_attention", "full_attention"],
        "bos_token_id": tokenizer.bos_token_id,
    }
    vision = {"model_type": "siglip_vision_model", **_siglip(image_size)}
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=GEMMA_IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=GEMMA_IMAGE_TOKENS,
    )
    return HFReflector(Gemma3ForConditionalGeneration(config), processor)


def _siglip(image_size: int) -> dict:
    """A two-layer SigLIP-style vision tower seeing PATCHES_PER_SIDE² patches (Gemma 3,
    Idefics3)."""
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": VISION_HEADS,
        "image_size": image_size,
        "patch_size": image_size // PATCHES_PER_SIDE,
    }


def _idefics3(corpus: Sequence[str], image_size: int) -> HFReflector:
    """SmolVLM's class: a SigLIP-style vision tower, pixel shuffle, a Llama `text_model`. The
    processor shows the whole image once (no tiling into 4x4 sub-images at this size)."""
    tokenizer = train_chat_tokenizer(corpus, style=SMOLVLM)
    text = _text(tokenizer) | {"model_type": "llama", "bos_token_id": tokenizer.bos_token_id}
    vision = _siglip(image_size)
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=IDEFICS3_SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return HFReflector(
        Idefics3ForConditionalGeneration(config), _idefics3_processor(tokenizer, image_size)
    )


def _idefics3_processor(tokenizer, image_size: int) -> Idefics3Processor:
    """Idefics3's processor showing the whole image once: no tiling into 4x4 sub-images at this
    size, PATCHES_PER_SIDE² patches pixel-shuffled by IDEFICS3_SCALE."""
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
    )
    return Idefics3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_len=(PATCHES_PER_SIDE // IDEFICS3_SCALE) ** 2,
    )


BUILDERS: dict[str, Callable[[Sequence[str], int], HFReflector]] = {
    "qwen3_vl": _qwen3_vl,
    "gemma3": _gemma3,
    "idefics3": _idefics3,
}
FAMILIES = ("qwen2_5_vl", *BUILDERS)


def build_tiny_vlm(
    family: str, corpus: Sequence[str], image_size: int = 32, *, seed: int = 0
) -> HFReflector:
    """A random-weight reflector of `family` (one of `FAMILIES`) whose tokenizer is trained on
    `corpus` plus the reflection prompt. `image_size` must be a multiple of 8."""
    if family == "qwen2_5_vl":  # the shapes world's own reflector
        from r3rl.shapes.tiny_reflector import build_tiny_reflector

        return build_tiny_reflector(corpus, image_size, seed=seed)
    if image_size % PATCHES_PER_SIDE:
        raise ValueError(f"image_size must be a multiple of {PATCHES_PER_SIDE}, got {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reflector = BUILDERS[family]([*corpus, REFLECTION_PROMPT.format(prompt="")], image_size)
    # as real checkpoints ship it: generation stops at the end of the turn as well as at eos
    reflector.model.generation_config.eos_token_id = reflector.stop_ids
    reflector.model.generation_config.pad_token_id = reflector.tokenizer.pad_token_id
    return reflector


def save_servable_idefics3(
    path: str | Path,
    corpus: Sequence[str],
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> int:
    """Save a random-weight Idefics3 (SmolVLM's class) that vLLM's CPU build serves, with its
    processor and a tokenizer trained on `corpus`; returns its parameter count.

    Unlike `build_tiny_vlm`'s families: head_dim `hidden / heads` must be >= 32 (vLLM's CPU
    attention refuses 16) and the vision head is 32 wide; Idefics3 needs no torchvision in vLLM
    (its Qwen-VL model files do). The defaults are the tests' tiny model (hidden 128, 2 layers);
    bench/vllm_rollout_bench.py also builds a ~30M one."""
    tokenizer = train_chat_tokenizer(corpus, style=SMOLVLM)
    patches, scale = PATCHES_PER_SIDE, IDEFICS3_SCALE  # 8x8 patches, pixel shuffle by 4: 4 tokens
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate or 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": image_size // patches,
    }
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    _idefics3_processor(tokenizer, image_size).save_pretrained(path)
    return sum(p.numel() for p in model.parameters())
