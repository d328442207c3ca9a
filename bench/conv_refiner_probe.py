"""Diagnostic (issue 16, item 4): does a convolutional refiner learn the shapes world's copies and
edits where the tiny FLUX transformer does not?

A diffusers `UNet2DConditionModel` (InstructPix2Pix-style: the reference latent concatenated on
channels, cross-attention to the world's T5 text encoder, which trains with it) is trained from
scratch by rectified-flow matching on the world's own latents: 3000 training edit pairs plus as
many "no further edit needed" copies, as the world's pretraining mixes them. Then, like
`bench/refiner_probe.py` (ODE, 10 steps; gold of `r3rl.shapes.gold`): copies of 96 correct
held-out scenes, and oracle edits of 96 flawed held-out scenes at true CFG 1 and 2 (gold and the
lenient checker's all-constraints-met rate), at half the steps and at the end.

This is a probe, not a model the trainer can load: no adapter runs a UNet flow model yet.

    OMP_NUM_THREADS=1 python bench/conv_refiner_probe.py [--world DIR] [--steps 1200] [--width 64]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from itertools import pairwise
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from refiner_probe import checker_rate, gold_rate, pixel_mse
from worlds import world_or_shipped

from r3rl.models.flux import pack_latents, unpack_latents
from r3rl.shapes.prompts import split_prompts
from r3rl.shapes.scene import STOP, make_edit_pair, render, sample_scene
from r3rl.shapes.tiny_diffusion import noise_levels
from r3rl.shapes.world import load_world_models

SIZE, BATCH = 32, 32


def build_unet(width: int, text_dim: int) -> UNet2DConditionModel:
    """Two resolutions over the 8x8 latent: 8x8 with cross-attention, 4x4 without."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=32,  # 16 noisy latent channels + 16 of the reference
        out_channels=16,
        layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--grid", type=Path, help="write flawed / edited / fixed for 16 scenes here")
    ap.add_argument(
        "--t2i",
        action="store_true",
        help="also text-to-image (a zero reference), half the batches as the world mixes them; "
        "reports the held-out prompts' generator gold at true CFG 3",
    )
    args = ap.parse_args()
    world = world_or_shipped(args.world)
    torch.manual_seed(0)
    _, flux = load_world_models(world, SIZE)
    t5, tok = flux.text_encoder_2, flux.tokenizer_2
    unet = build_unet(args.width, t5.config.d_model)
    print(f"UNet parameters: {sum(p.numel() for p in unet.parameters()):,}", flush=True)

    def text(texts: list[str]) -> torch.Tensor:
        ids = tok(
            texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt"
        ).input_ids
        return t5(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def latents(images: list[Image.Image]) -> torch.Tensor:
        chunks = [flux.encode_images(images[i : i + 256]) for i in range(0, len(images), 256)]
        return unpack_latents(torch.cat(chunks), 8, 8)

    train, held_out = split_prompts()
    rng = random.Random(1)
    pairs = [make_edit_pair(rng.choice(train), rng) for _ in range(3000)]
    ref = latents([render(f, SIZE) for f, _, _ in pairs])
    x0 = torch.cat([latents([render(x, SIZE) for _, _, x in pairs]), ref])
    ref = torch.cat([ref, ref])
    texts = [ins for _, ins, _ in pairs] + [STOP] * len(pairs)
    if args.t2i:
        metas = [rng.choice(train) for _ in range(3000)]
        scene_lat = latents([render(sample_scene(m, rng), SIZE) for m in metas])
        x0 = torch.cat([x0, scene_lat, scene_lat])
        ref = torch.cat([ref, torch.zeros_like(scene_lat), torch.zeros_like(scene_lat)])
        texts += [m["prompt"] for m in metas] * 2

    rng = random.Random(0)
    metas_e, tests = [], []
    for _ in range(96):
        metas_e.append(rng.choice(held_out))
        tests.append(make_edit_pair(metas_e[-1], rng))
    flawed = [render(f, SIZE) for f, _, _ in tests]
    flawed_lat = latents(flawed)
    metas_c = held_out * 2
    correct = [render(sample_scene(m, rng), SIZE) for m in metas_c]
    correct_lat = latents(correct)

    def velocity(x, s, emb, r):
        return unet(torch.cat([x, r], 1), s * 1000, encoder_hidden_states=emb).sample

    @torch.no_grad()
    def sample(conds: list[str], r: torch.Tensor, cfg: float) -> list[Image.Image]:
        emb, empty = text(conds), text([""] * len(conds))
        x = torch.randn(r.shape, generator=torch.Generator().manual_seed(3))
        sigmas = torch.linspace(1, 0, 11)
        for a, b in pairwise(sigmas.tolist()):
            s = torch.full((len(conds),), float(a))
            v = velocity(x, s, emb, r)
            if cfg > 1:
                v0 = velocity(x, s, empty, r)
                v = v0 + cfg * (v - v0)
            x = x + (b - a) * v
        return flux.decode(pack_latents(x))

    def report(step: int) -> list[Image.Image]:
        unet.eval(), t5.eval()
        copies = sample([STOP] * len(correct), correct_lat, 1.0)
        out = {
            "step": step,
            "copy_gold": gold_rate(metas_c, copies),
            "copy_mse": pixel_mse(copies, correct),
        }
        for cfg in (1.0, 2.0):
            edited = sample([ins for _, ins, _ in tests], flawed_lat, cfg)
            out[f"edit_gold_cfg{cfg:g}"] = gold_rate(metas_e, edited)
            out[f"edit_checker_cfg{cfg:g}"] = checker_rate(metas_e, edited)
        if args.t2i:
            drawn = sample([m["prompt"] for m in metas_c], torch.zeros_like(correct_lat), 3.0)
            out["generator_gold_cfg3"] = gold_rate(metas_c, drawn)
        print(json.dumps({k: round(float(v), 3) for k, v in out.items()}), flush=True)
        unet.train(), t5.train()
        return edited

    t5.train().requires_grad_(True)
    params = [*unet.parameters(), *t5.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-3, total_steps=args.steps, pct_start=0.05
    )
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(texts), (BATCH,), generator=g)
        eps = torch.randn(x0[idx].shape, generator=g)
        s = noise_levels(BATCH, g)  # and 10% text dropout below: as the world trains
        xt = (1 - s[:, None, None, None]) * x0[idx] + s[:, None, None, None] * eps
        conds = [
            texts[i] if float(u) >= 0.1 else ""
            for i, u in zip(idx.tolist(), torch.rand(BATCH, generator=g))
        ]
        loss = (velocity(xt, s, text(conds), ref[idx]) - (eps - x0[idx])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step in (args.steps // 2, args.steps):
            print(f"step {step}: loss {loss.item():.4f}, {time.time() - t0:.0f} s", flush=True)
            edited = report(step)
    if args.grid:
        grid = Image.new("RGB", (3 * SIZE, 16 * SIZE), "white")
        for k in range(16):
            for j, im in enumerate([flawed[k], edited[k], render(tests[k][2], SIZE)]):
                grid.paste(im, (j * SIZE, k * SIZE))
        grid.resize((9 * SIZE, 48 * SIZE), Image.NEAREST).save(args.grid)
        print("instructions:", [ins for _, ins, _ in tests[:16]])


if __name__ == "__main__":
    main()
