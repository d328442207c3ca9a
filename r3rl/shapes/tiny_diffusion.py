"""Tiny FLUX.1-Kontext-style generator/refiner for the shapes world, and its flow-matching pretraining.

Built from the real diffusers/transformers classes (FluxTransformer2DModel, AutoencoderKL,
CLIPTextModel, T5EncoderModel) with tiny configs, so the default recipe runs the same
adapter (`r3rl.models.flux.FluxModel`) a FLUX.1-Kontext checkpoint goes through. One
transformer learns both text-to-image (no reference tokens) and instruction edits
(reference tokens appended), as Kontext does; generator and refiner start from it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from r3rl.models.flux import FluxModel, to_tensor

LATENT_CHANNELS = 16
TEXT_DIM = 64


def build_tiny_flux(tokenizer, image_size: int, seed: int = 0) -> FluxModel:
    """Random-weight tiny FLUX components: VAE /4, 16 image tokens at 32 px."""
    torch.manual_seed(seed)
    blocks = (16, 32, 32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks, layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
        scaling_factor=1.0, shift_factor=0.0,
    )
    vocab = len(tokenizer)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_DIM,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=(8, 12, 12),
    )
    return FluxModel(transformer, vae, clip, tokenizer, t5, tokenizer, image_size=image_size, max_text_len=16)


def pretrain_vae(
    vae: AutoencoderKL,
    make_images: Callable[[int], list[Image.Image]],
    *,
    image_size: int,
    steps: int,
    batch_size: int,
    lr: float = 2e-3,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """Reconstruction + tiny KL; then set scaling_factor so latents have unit std (as SD/FLUX do)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    for step in range(steps):
        x = to_tensor(make_images(batch_size), image_size)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step(step, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(to_tensor(make_images(256), image_size)).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


def pretrain_flow(
    model: FluxModel,
    sample_batch: Callable[[int], tuple[list[str], list[Image.Image], list[Image.Image] | None]],
    *,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """Rectified-flow matching: x_t = (1-s) x0 + s eps, target v = eps - x0 (FlowMatchEuler convention).

    `sample_batch(n)` returns (texts, target images, reference images or None); the
    transformer and both text encoders train, the VAE is frozen.
    """
    params = [p for m in (model.transformer, model.text_encoder, model.text_encoder_2) for p in m.parameters()]
    for m in (model.transformer, model.text_encoder, model.text_encoder_2):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        texts, targets, refs = sample_batch(batch_size)
        with torch.no_grad():
            x0 = model.encode_images(targets)
            ref = model.encode_images(refs) if refs is not None else None
        eps = torch.randn_like(x0)
        # logit-normal timesteps, as SD3/FLUX training uses
        s = torch.sigmoid(torch.randn(x0.shape[0])).to(x0)
        xt = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps
        cond = model.encode_text(texts, cache=False)
        v = model.velocity(xt, s, cond, ref)
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if on_step:
            on_step(step, loss.item())
    for m in (model.transformer, model.text_encoder, model.text_encoder_2):
        m.eval().requires_grad_(False)


def mixed_batches(
    t2i: Callable[[random.Random], tuple[str, Image.Image]],
    edit: Callable[[random.Random], tuple[str, Image.Image, Image.Image]],
    rng: random.Random,
) -> Callable[[int], tuple[list[str], list[Image.Image], list[Image.Image] | None]]:
    """Alternate text-to-image and edit batches (the two sequence lengths can't share a batch)."""
    counter = iter(range(10**9))

    def sample_batch(n: int):
        if next(counter) % 2 == 0:
            pairs = [t2i(rng) for _ in range(n)]
            return [p for p, _ in pairs], [im for _, im in pairs], None
        triples = [edit(rng) for _ in range(n)]
        return [t for t, _, _ in triples], [tgt for _, _, tgt in triples], [src for _, src, _ in triples]

    return sample_batch


def generate(
    model: FluxModel, texts: Sequence[str], refs: Sequence[Image.Image] | None, *, steps: int, seed: int
) -> list[Image.Image]:
    """Deterministic ODE sampling (used to build the reflector's SFT set and in tests)."""
    from r3rl.algos.flow_grpo import sigma_schedule
    from r3rl.sampling import SDEConfig, sample

    g = torch.Generator().manual_seed(seed)
    cond = model.encode_text(list(texts))
    ref = model.encode_images(list(refs)) if refs is not None else None
    mask = torch.zeros(len(texts), steps, dtype=torch.bool)
    traj = sample(model, cond, ref, sigma_schedule(steps), mask, SDEConfig(), generator=g)
    return model.decode(traj.latents)
