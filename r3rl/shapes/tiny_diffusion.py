"""Tiny FLUX.1-Kontext-style generator/refiner for the shapes world, and its flow-matching
pretraining.

Built from the real diffusers/transformers classes (FluxTransformer2DModel, AutoencoderKL,
CLIPTextModel, T5EncoderModel) with tiny configs, so the default recipe runs the same
adapter (`r3rl.models.flux.FluxModel`) a FLUX.1-Kontext checkpoint goes through. One
transformer learns both text-to-image (no reference tokens) and instruction edits
(reference tokens appended), as Kontext does; generator and refiner start from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from r3rl.models.flux import FluxModel, to_tensor
from r3rl.models.tiny import LATENT_CHANNELS, tiny_vae

TEXT_DIM = 64


def build_tiny_flux(tokenizer, image_size: int, seed: int = 0) -> FluxModel:
    """Random-weight tiny FLUX components: VAE /4, 16 image tokens at 32 px; 32 text tokens (a
    prompt of up to 10 words and a plan of up to 4 items, `r3rl.shapes.plan`, fit)."""
    torch.manual_seed(seed)
    vae = tiny_vae((16, 32, 32), scaling_factor=1.0, shift_factor=0.0)  # /4
    vocab = len(tokenizer)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=TEXT_DIM,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.pad_token_id,
            projection_dim=TEXT_DIM,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=TEXT_DIM,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=(8, 12, 12),
    )
    return FluxModel(
        transformer, vae, clip, tokenizer, t5, tokenizer, image_size=image_size, max_text_len=32
    )


def _object_weight(x: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    """Per-pixel loss weight: `weight` on object pixels (those unlike the image's corner pixel,
    the background), 1 elsewhere. Objects cover ~10% of a shapes image; unweighted, the VAE
    spends its capacity on the background and mixes up colours (purple came back blue)."""
    fg = (x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + (weight - 1.0) * fg.float()


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
    """Reconstruction + tiny KL; then set scaling_factor so latents have unit std (as SD/FLUX
    do)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    for step in range(steps):
        x = to_tensor(make_images(batch_size), image_size)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        err = (rec - x).abs() + (rec - x).pow(2)
        loss = (err * _object_weight(x)).mean() + 1e-6 * dist.kl().mean()
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


@dataclass
class FlowPairs:
    """Pre-encoded flow-matching data: conditioning texts, target latents, reference latents
    (edits)."""

    texts: list[str]
    x0: torch.Tensor
    ref: torch.Tensor | None = None


@torch.no_grad()
def encode_pairs(
    model: FluxModel,
    texts: list[str],
    targets: list[Image.Image],
    refs: list[Image.Image] | None = None,
    chunk: int = 256,
) -> FlowPairs:
    """Encode once with the frozen VAE, so training steps never render or encode images."""
    enc = lambda ims: torch.cat(
        [model.encode_images(ims[i : i + chunk]) for i in range(0, len(ims), chunk)]
    )
    return FlowPairs(texts, enc(targets), enc(refs) if refs is not None else None)


def noise_levels(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Flow-matching noise levels s in (0, 1): half logit-normal (SD3/FLUX), half uniform. The
    uniform share trains the high-noise steps where layout and colour are decided, which
    logit-normal rarely visits."""
    return torch.where(
        torch.rand(batch_size, generator=generator) < 0.5,
        torch.sigmoid(torch.randn(batch_size, generator=generator)),
        torch.rand(batch_size, generator=generator),
    )


def pretrain_flow(
    model: FluxModel,
    datasets: Sequence[FlowPairs],
    *,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    seed: int = 0,
    cond_dropout: float = 0.1,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """Rectified-flow matching: x_t = (1-s) x0 + s eps, target v = eps - x0 (FlowMatchEuler
    convention).

    Batches cycle through `datasets` (text-to-image and edit pairs have different sequence
    lengths, so they never share a batch); the transformer and both text encoders train,
    the VAE is frozen.
    """
    encoders = (model.transformer, model.text_encoder, model.text_encoder_2)
    params = [p for m in encoders for p in m.parameters()]
    for m in encoders:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    # 5% warm-up; OneCycleLR divides by pct_start * total_steps - 1, which is 0 at exactly 20 steps
    warmup = 0.05 if steps != 20 else 0.1
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, steps), pct_start=warmup
    )
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        data = datasets[step % len(datasets)]
        idx = torch.randint(len(data.texts), (batch_size,), generator=g)
        x0 = data.x0[idx]
        ref = data.ref[idx] if data.ref is not None else None
        eps = torch.randn(x0.shape, generator=g)
        s = noise_levels(batch_size, g)
        xt = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps
        # drop the text 10% of the time so the model also learns the unconditional velocity (CFG)
        texts = [
            data.texts[i] if float(u) >= cond_dropout else ""
            for i, u in zip(idx.tolist(), torch.rand(batch_size, generator=g))
        ]
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
    for m in encoders:
        m.eval().requires_grad_(False)


def generate(
    model: FluxModel,
    texts: Sequence[str],
    refs: Sequence[Image.Image] | None,
    *,
    steps: int,
    seed: int,
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
