"""Diagnostic (issue 19): does the shapes generator follow plans? Continue a world's flow matching on
plan-conditioned pairs only ("{prompt}. {plan of the rendered scene}") for STEPS steps, then gold
(96 held-out samples, ODE 20 steps, true CFG 3) of images drawn from the prompt alone,
from the prompt + an oracle plan (of a valid sampled scene) and from the prompt + the world
reflector's plan (temperature 0.3).

    OMP_NUM_THREADS=1 python bench/reason_plan_following.py STEPS [WORLD_DIR]

WORLD_DIR defaults to the cached world of recipes/shapes_cpu.yaml at world.seed 0.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from worlds import world_or_shipped

from r3rl.reason import Reasoner, write_plans
from r3rl.rollout import TextSettings
from r3rl.shapes.gold import gold_scores
from r3rl.shapes.plan import SHAPES_PLAN_PROMPT, plan_of, plan_satisfies
from r3rl.shapes.prompts import split_prompts
from r3rl.shapes.scene import render, sample_scene
from r3rl.shapes.tiny_diffusion import encode_pairs, generate, pretrain_flow
from r3rl.shapes.world import load_world_models


def main() -> None:
    torch.set_num_threads(1)
    steps = int(sys.argv[1])
    world = world_or_shipped(Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    refl, flux = load_world_models(world, 32)
    train, ev = split_prompts()
    rng = random.Random(1)
    metas = [rng.choice(train) for _ in range(3000)]
    scenes = [sample_scene(m, rng) for m in metas]
    texts = [f"{m['prompt']}. {plan_of(s)}" for m, s in zip(metas, scenes)]
    pairs = encode_pairs(flux, texts, [render(s, 32) for s in scenes])
    t0 = time.time()
    pretrain_flow(flux, [pairs], steps=steps, batch_size=32, lr=5e-4, seed=1)
    print(f"continued {steps} steps in {time.time() - t0:.0f} s", flush=True)
    flux.true_cfg_scale = 3.0
    em = ev * 2
    orng = random.Random(0)
    oracle = [f"{m['prompt']}. {plan_of(sample_scene(m, orng))}" for m in em]
    reason = Reasoner(SHAPES_PLAN_PROMPT, "{prompt}. {plan}", 32, plan_satisfies)
    plans = write_plans(refl, reason, em, TextSettings(0.3, 50, 1.0, 32), seed=1)
    arms = [
        ("prompt", [m["prompt"] for m in em]),
        ("oracle plan", oracle),
        ("reflector plan", plans.texts),
    ]
    for name, conds in arms:
        ims = []
        for i in range(0, len(conds), 48):
            ims += generate(flux, conds[i : i + 48], None, steps=20, seed=7 + i)
        ok, clutter = gold_scores(em, ims)
        print(
            f"{name}: gold {sum(ok) / len(ok):.3f} clutter {sum(clutter) / len(clutter):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
