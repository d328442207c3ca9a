"""Tiny random-weight checkpoints of each supported family, built from the real classes.

Nothing can be downloaded here, so every family is proven by building its real diffusers /
transformers classes from tiny configs, saving them in the layout a user's checkpoint has and
loading them back through `r3rl.models.registry`. Also handy to smoke-test a recipe on CPU.
"""

from __future__ import annotations

import copy

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from r3rl.models.qwen_image import QwenImageEditModel, QwenImageModel
from r3rl.models.sd3 import SD3Model

LATENT_CHANNELS = 16


def tiny_vae(
    blocks: tuple[int, ...] = (16, 32), scaling_factor: float = 1.5, shift_factor: float = 0.1
) -> AutoencoderKL:
    """A random-weight AutoencoderKL that downsamples by 2 ** (len(blocks) - 1)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _clip(tokenizer, hidden: int) -> CLIPTextModelWithProjection:
    pad = tokenizer.pad_token_id
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=hidden,
            pad_token_id=pad,
            eos_token_id=pad,
            bos_token_id=pad,
        )
    )


def build_tiny_sd3(tokenizer, image_size: int, *, seed: int = 0, text_len: int = 16) -> SD3Model:
    """SD3 with two CLIPs (32 + 32 wide, pooled 64) and a T5 (64 wide); 16x16 latents at 32 px."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = text_len  # the pipeline's CLIP length
    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    latent = image_size // 2
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=latent // 2,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(),
        text_encoder=_clip(tokenizer, 32),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, 32),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=tokenizer,
    )
    return SD3Model(pipe, image_size=image_size, max_text_len=text_len)


def _qwen_image_components(tokenizer, image_size: int, seed: int) -> dict:
    """The components Qwen-Image and Qwen-Image-Edit share: a tiny Qwen2.5-VL text encoder (128
    wide, the shapes reflector's config), a /2 Qwen-Image VAE, the transformer and a dynamic-shift
    scheduler."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from r3rl.shapes.tiny_reflector import _config as qwen_vl_config

    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(tokenizer, image_size))
    vae = AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1] * LATENT_CHANNELS,
        latents_std=[1.5] * LATENT_CHANNELS,
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(8, 12, 12),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=16,
        max_image_seq_len=256,
        shift_terminal=0.02,
    )  # as Qwen-Image's own scheduler
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_tiny_qwen_image(tokenizer, image_size: int, *, seed: int = 0) -> QwenImageModel:
    """Qwen-Image (text-to-image) from the shared tiny components."""
    return QwenImageModel(
        QwenImagePipeline(**_qwen_image_components(tokenizer, image_size, seed)),
        image_size=image_size,
    )


def build_tiny_qwen_image_edit(
    tokenizer, image_size: int, *, seed: int = 0, plus: bool = False
) -> QwenImageEditModel:
    """Qwen-Image-Edit (or -Edit-Plus) from the shared tiny components plus the Qwen2.5-VL processor
    that shows the text encoder the image (16 image tokens at any input size)."""
    from r3rl.shapes.tiny_reflector import _processor

    pipeline = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = pipeline(
        **_qwen_image_components(tokenizer, image_size, seed),
        processor=_processor(tokenizer, image_size),
    )
    return QwenImageEditModel(pipe, image_size=image_size)
