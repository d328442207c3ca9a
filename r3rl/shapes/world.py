"""Build, pretrain and cache the shapes world's tiny models (no downloads, a few CPU minutes).

Stages: tokenizer -> VAE reconstruction -> flow matching (text-to-image + instruction edits,
one Kontext-style transformer; half the text-to-image texts carry the plan of the rendered
scene, `"{prompt}. {plan}"`, so the generator follows plans) -> reflector SFT on
checker-written critiques of the generator's own images, with every third batch a text-only
planning turn (prompt -> plan of a valid scene, `r3rl.shapes.plan`) so `rollout.reason` starts
from a reflector that plans. The result is saved in the diffusers / transformers layouts a user's
checkpoint has, under a cache folder keyed by the world config, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r3rl.config import WorldConfig
from r3rl.models.flux import FluxModel
from r3rl.models.reflector import REFLECTION_PROMPT, HFReflector
from r3rl.shapes.critique import corpus, critique, plan_text, reflection_text
from r3rl.shapes.plan import PLAN_TEMPLATE, SHAPES_PLAN_PROMPT, plan_of
from r3rl.shapes.prompts import split_prompts
from r3rl.shapes.scene import STOP, make_edit_pair, render, sample_scene
from r3rl.shapes.tiny_diffusion import (
    FlowPairs,
    build_tiny_flux,
    encode_pairs,
    generate,
    pretrain_flow,
    pretrain_vae,
)
from r3rl.shapes.tiny_reflector import build_tiny_reflector, sft_reflector
from rewards.shapes_geneval import detect

# Bump when pretraining code changes in a way that should invalidate caches.
WORLD_VERSION = 8
SHAPES_MODEL = "shapes:tiny"
# The shapes recipe samples with true CFG at this scale; the reflector's SFT images match it.
SFT_CFG_SCALE = 3.0


@dataclass(frozen=True)
class WorldPaths:
    root: Path

    @property
    def flux(self) -> Path:
        return self.root / "flux"

    @property
    def reflector(self) -> Path:
        return self.root / "reflector"


def cache_root(cfg: WorldConfig) -> Path:
    base = (
        cfg.cache_dir
        or os.environ.get("R3RL_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "r3rl"
    )
    return Path(base).expanduser()


def world_key(cfg: WorldConfig, seed: int) -> str:
    fields = cfg.model_dump(exclude={"cache_dir", "seed"}) | {
        "seed": seed,
        "version": WORLD_VERSION,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def ensure_world(cfg: WorldConfig, seed: int = 0, *, log=print) -> WorldPaths:
    """Return the cached pretrained world for this config, pretraining it first if needed.
    `seed` is the run's; `cfg.seed`, when set, takes its place."""
    seed = seed if cfg.seed is None else cfg.seed
    root = cache_root(cfg) / f"shapes-{world_key(cfg, seed)}"
    paths = WorldPaths(root)
    if (root / "COMPLETE").exists():
        return paths
    log(f"pretraining the shapes world (cached at {root}) ...")
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    stats = _pretrain(cfg, seed, WorldPaths(tmp))
    stats["seconds"] = round(time.time() - t0, 1)
    (tmp / "pretrain.json").write_text(json.dumps(stats, indent=1))
    (tmp / "COMPLETE").touch()
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    log(f"pretraining done in {stats['seconds']:.0f}s: {json.dumps(stats['stages'])}")
    return paths


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _pretrain(cfg: WorldConfig, seed: int, out: WorldPaths) -> dict:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    train, _ = split_prompts()
    size = cfg.image_size
    reflector = build_tiny_reflector(corpus(), size, seed=seed)
    flux = build_tiny_flux(reflector.tokenizer, size, seed=seed)
    stages: dict[str, float] = {}

    def scene_image(r: random.Random):
        meta = r.choice(train)
        return meta, render(sample_scene(meta, r), size)

    metas = [rng.choice(train) for _ in range(cfg.pretrain_pairs)]
    scenes = [sample_scene(m, rng) for m in metas]
    t2i_images = [render(scene, size) for scene in scenes]
    # every other pair reads prompt + the plan of its scene, as `rollout.reason` conditions it
    t2i_texts = [
        PLAN_TEMPLATE.format(prompt=m["prompt"], plan=plan_of(scene)) if i % 2 else m["prompt"]
        for i, (m, scene) in enumerate(zip(metas, scenes))
    ]
    plan_examples = [
        (SHAPES_PLAN_PROMPT.format(prompt=m["prompt"]), plan_text(plan_of(sample_scene(m, rng))))
        for m in (rng.choice(train) for _ in range(cfg.reflector_sft_examples))
    ]
    edits = [make_edit_pair(rng.choice(train), rng) for _ in range(cfg.pretrain_pairs)]

    with _progress() as bar:

        def tracker(name: str, total: int):
            task = bar.add_task(name, total=total, loss=float("nan"))
            t = time.time()

            def on_step(step: int, loss: float) -> None:
                bar.update(task, completed=step + 1, loss=loss)
                stages[name] = round(time.time() - t, 1)

            return on_step

        pretrain_vae(
            flux.vae,
            lambda n: [scene_image(rng)[1] for _ in range(n)],
            image_size=size,
            steps=cfg.pretrain_vae_steps,
            batch_size=cfg.pretrain_vae_batch_size,
            on_step=tracker("vae", cfg.pretrain_vae_steps),
        )
        t2i_pairs = encode_pairs(flux, t2i_texts, t2i_images)
        edit_pairs = encode_pairs(
            flux,
            [ins for _, ins, _ in edits],
            [render(fixed, size) for _, _, fixed in edits],
            [render(flawed, size) for flawed, _, _ in edits],
        )
        # "no further edit needed" gives back the reference: the plainest lesson in copying it,
        # which the tiny Kontext transformer hardly learns from edits alone (oracle-instruction
        # refines pass gold 0.17 with these batches, 0.06 without: bench/RESULTS.md)
        keep_pairs = FlowPairs([STOP] * len(edits), edit_pairs.ref, edit_pairs.ref)
        data = [t2i_pairs, edit_pairs, t2i_pairs, keep_pairs]
        pretrain_flow(
            flux,
            data,
            steps=cfg.pretrain_diffusion_steps,
            batch_size=cfg.pretrain_batch_size,
            seed=seed,
            on_step=tracker("flow matching", cfg.pretrain_diffusion_steps),
        )
        examples, frac_correct = _critique_set(flux, train, cfg.reflector_sft_examples, size, rng)
        sft_steps = cfg.pretrain_reflector_steps * 3 // 2  # a third of them planning batches
        sft_reflector(
            reflector,
            examples,
            steps=sft_steps,
            batch_size=cfg.pretrain_batch_size,
            seed=seed,
            progress=tracker("reflector sft", sft_steps),
            plan_examples=plan_examples,
        )
    flux.save_pretrained(out.flux)
    reflector.save_pretrained(out.reflector)
    return {
        "stages": stages,
        "sft_examples": len(examples),
        "generator_train_accuracy": frac_correct,
    }


def _critique_set(flux: FluxModel, train: list[dict], n: int, size: int, rng: random.Random):
    """(prompt, image, checker critique) triples: half the generator's own images, half rendered
    flawed/fixed scenes, so the reflector sees real failure modes and learns when to stop."""
    metas = [rng.choice(train) for _ in range(n // 2)]
    images = []
    flux.true_cfg_scale = SFT_CFG_SCALE
    for i in range(0, len(metas), 64):
        chunk = metas[i : i + 64]
        images += generate(
            flux, [m["prompt"] for m in chunk], None, steps=10, seed=rng.randrange(2**31)
        )
    flux.true_cfg_scale = 1.0
    for _ in range(n - len(metas)):
        meta = rng.choice(train)
        flawed, _, fixed = make_edit_pair(meta, rng)
        metas.append(meta)
        images.append(render(rng.choice([flawed, fixed]), size))
    examples, correct = [], 0
    for k, (meta, image) in enumerate(zip(metas, images)):
        analysis, instruction = critique(meta, detect(image))
        correct += k < n // 2 and instruction is None
        examples.append((meta["prompt"], image, reflection_text(analysis, instruction)))
    return examples, round(correct / max(1, n // 2), 3)


def load_world_models(paths: WorldPaths, image_size: int) -> tuple[HFReflector, FluxModel]:
    return HFReflector.from_pretrained(paths.reflector), FluxModel.from_pretrained(
        paths.flux, image_size=image_size
    )


__all__ = ["REFLECTION_PROMPT", "SHAPES_MODEL", "WorldPaths", "ensure_world", "load_world_models"]
