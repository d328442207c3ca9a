"""The shapes world's extra stage for `refiner.mode: regenerate`, cached beside the world.

It runs only for that mode and leaves the world's own pretraining untouched: starting from
the world's refiner, `r3rl.sft.fit` teaches the transformer and a fresh semantic projection to
draw the target prompt's scene given the semantic tokens (the pretrained reflector's image
tokens) of a flawed or already-correct rendering of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from functools import partial
from pathlib import Path

import torch

from r3rl.algos.flow_matching import Example, fit
from r3rl.config import RegenerateConfig
from r3rl.models.base import encode_condition
from r3rl.models.flux import FluxModel
from r3rl.modes.regenerate import RegenerateRefiner, SemanticProjection, VLMSemanticEncoder
from r3rl.shapes.prompts import split_prompts
from r3rl.shapes.scene import make_edit_pair, render

STAGE_VERSION = 1
KEEP_PROB = (
    0.25  # share of pairs whose input already satisfies the prompt (regenerate it faithfully)
)


def stage_dir(world_root: Path, rc: RegenerateConfig) -> Path:
    fields = {
        "steps": rc.pretrain_steps,
        "pairs": rc.pretrain_pairs,
        "lr": rc.pretrain_lr,
        "version": STAGE_VERSION,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    return world_root.with_name(f"{world_root.name}-regenerate-{key}")


def ensure_regenerate_stage(
    world_root: Path, rc: RegenerateConfig, image_size: int, seed: int, *, log=print
) -> Path:
    """The regenerate refiner folder for this world, trained (once, a CPU minute) if missing."""
    root = stage_dir(world_root, rc)
    if (root / "COMPLETE").exists():
        return root
    log(f"training the shapes world's regenerate refiner (cached at {root}) ...")
    t0 = time.time()
    inner = FluxModel.from_pretrained(world_root / "flux", image_size=image_size)
    for m in (inner.vae, inner.text_encoder, inner.text_encoder_2, inner.transformer):
        m.requires_grad_(False)
    encoder = VLMSemanticEncoder.from_pretrained(world_root / "reflector")
    torch.manual_seed(seed)
    projection = SemanticProjection(encoder.dim, inner.transformer.config.joint_attention_dim)
    model = RegenerateRefiner(inner, encoder, projection)
    rng = random.Random(seed)
    train, _ = split_prompts()
    examples = []
    for _ in range(rc.pretrain_pairs):
        meta = rng.choice(train)
        flawed, _, fixed = make_edit_pair(meta, rng)
        source = fixed if rng.random() < KEEP_PROB else flawed
        examples.append(
            Example(meta["prompt"], render(source, image_size), render(fixed, image_size))
        )
    params = [*inner.transformer.parameters(), *projection.parameters()]
    encode = partial(encode_condition, model, cache=False)  # as rollouts condition it
    losses = fit(
        model,
        examples,
        params,
        encode=encode,
        steps=rc.pretrain_steps,
        batch_size=32,
        lr=rc.pretrain_lr,
        seed=seed,
    )
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    stats = {
        "seconds": round(time.time() - t0, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
    }
    (tmp / "stage.json").write_text(json.dumps(stats))
    (tmp / "COMPLETE").touch()
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    log(
        f"regenerate stage done in {stats['seconds']:.0f}s (loss {stats['first_loss']:.3f} -> "
        f"{stats['last_loss']:.3f})"
    )
    return root
