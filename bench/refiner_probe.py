"""Diagnostic (issue 16, item 4): can the shapes world's refiner copy and edit, before any RL?

On rendered scenes of the held-out prompts (ODE sampling, 10 steps, gold of
`r3rl.shapes.gold`):

- VAE round trip of correct scenes: the ceiling every other probe sits under;
- copy: "no further edit needed" on a correct scene (should give it back): pixel MSE and gold;
- oracle edit: a flawed scene and the instruction that fixes it (`make_edit_pair`), at true CFG 1
  and 2, gold overall and per instruction verb;
- memorisation: continue flow matching on N training edit pairs alone for STEPS steps, then edit
  those same pairs: how far the output is from the fixed scene and from the flawed one, and the
  checker's all-constraints-met rate. A model that cannot fit N pairs it trains on cannot learn
  edits at any data size in this budget.

    OMP_NUM_THREADS=1 python bench/refiner_probe.py [--world DIR] [--pairs 64] [--steps 400]
        [--append]

--world defaults to the cached world of recipes/shapes_cpu.yaml at world.seed 0 (pretrained
first if missing). --append adds the printed section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from results import publish
from worlds import world_or_shipped

from r3rl.models.flux import FluxModel
from r3rl.shapes.gold import gold_scores, gold_verdict
from r3rl.shapes.prompts import split_prompts
from r3rl.shapes.scene import STOP, make_edit_pair, render, sample_scene
from r3rl.shapes.tiny_diffusion import encode_pairs, generate, pretrain_flow
from r3rl.shapes.world import load_world_models
from rewards.shapes_geneval import detect, evaluate

SIZE = 32


def pixel_mse(a: list[Image.Image], b: list[Image.Image]) -> float:
    return float(
        np.mean(
            [
                np.mean((np.asarray(x, float) - np.asarray(y, float)) ** 2)
                for x, y in zip(a, b, strict=True)
            ]
        )
    )


def gold_rate(metas: list[dict], images: list[Image.Image]) -> float:
    return float(np.mean(gold_scores(metas, images)[0]))


def checker_rate(metas: list[dict], images: list[Image.Image]) -> float:
    return float(
        np.mean(
            [
                all(o.ok for o in evaluate(m, detect(im)))
                for m, im in zip(metas, images, strict=True)
            ]
        )
    )


def edit_pairs(metas: list[dict], n: int, rng: random.Random) -> tuple[list[dict], list[tuple]]:
    chosen = [rng.choice(metas) for _ in range(n)]
    return chosen, [make_edit_pair(m, rng) for m in chosen]


def draw(
    flux: FluxModel, texts: list[str], refs: list[Image.Image], cfg: float, seed: int
) -> list[Image.Image]:
    flux.true_cfg_scale = cfg
    return generate(flux, texts, refs, steps=10, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path)
    ap.add_argument("--pairs", type=int, default=64, help="edit pairs the memorisation probe fits")
    ap.add_argument("--steps", type=int, default=400, help="flow-matching steps of that probe")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    world = world_or_shipped(args.world)
    _, flux = load_world_models(world, SIZE)
    train, held_out = split_prompts()
    rng = random.Random(0)
    metas = held_out * 2
    correct = [render(sample_scene(m, rng), SIZE) for m in metas]
    metas_e, pairs = edit_pairs(held_out, len(metas), rng)
    flawed = [render(f, SIZE) for f, _, _ in pairs]
    texts = [ins for _, ins, _ in pairs]

    rows = [
        (
            "VAE round trip of correct scenes",
            f"gold {gold_rate(metas, flux.decode(flux.encode_images(correct))):.3f}",
        )
    ]
    copies = draw(flux, [STOP] * len(correct), correct, 1.0, seed=2)
    rows.append(
        (
            'copy ("no further edit needed")',
            f"gold {gold_rate(metas, copies):.3f}, pixel MSE {pixel_mse(copies, correct):.0f}",
        )
    )
    for cfg in (1.0, 2.0):
        edited = draw(flux, texts, flawed, cfg, seed=3)
        verbs, passed = Counter(), Counter()
        for (_, ins, _), m, im in zip(pairs, metas_e, edited):
            verbs[ins.split()[0]] += 1
            passed[ins.split()[0]] += gold_verdict(m, im).passed
        by_verb = ", ".join(f"{v} {passed[v]}/{verbs[v]}" for v in sorted(verbs))
        rows.append(
            (f"oracle edit, true CFG {cfg:g}", f"gold {gold_rate(metas_e, edited):.3f} ({by_verb})")
        )

    metas_m, fit = edit_pairs(train, args.pairs, random.Random(1))
    fit_flawed = [render(f, SIZE) for f, _, _ in fit]
    fit_fixed = [render(x, SIZE) for _, _, x in fit]
    fit_texts = [ins for _, ins, _ in fit]

    def fit_row(label: str) -> tuple[str, str]:
        out = draw(flux, fit_texts, fit_flawed, 1.0, seed=4)
        met = checker_rate(metas_m, out)
        return (
            label,
            f"pixel MSE to the fixed scene {pixel_mse(out, fit_fixed):.0f}, to the flawed one"
            + f" {pixel_mse(out, fit_flawed):.0f}; checker all-met {met:.3f}",
        )

    rows.append(fit_row(f"{args.pairs} training edit pairs, before fitting them"))
    t0 = time.time()
    pretrain_flow(
        flux,
        [encode_pairs(flux, fit_texts, fit_fixed, fit_flawed)],
        steps=args.steps,
        batch_size=32,
        lr=args.lr,
        seed=1,
    )
    rows.append(
        fit_row(
            f"the same pairs after {args.steps} steps on them alone"
            f" (lr {args.lr:g}, {time.time() - t0:.0f} s)"
        )
    )

    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    publish(
        "### Refiner probe: "
        f"`python bench/refiner_probe.py --pairs {args.pairs} --steps {args.steps}`\n\n"
        f"World `{world.root.name}`; {len(metas)} held-out scenes; ODE, 10 steps; gold = "
        "`r3rl.shapes.gold`; pixel MSE on 0-255.\n\n| probe | result |\n|---|---|\n" + table,
        append=args.append,
    )


if __name__ == "__main__":
    main()
