"""Multi-round evaluation: generate, then reflect/refine with early stop, scoring every round.

Used inside training (step 0 and every `trainer.eval_every` steps) and by `r3rl eval`.
Sampling is deterministic (ODE, fixed seeds, low temperature) so rounds and checkpoints compare.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from r3rl.config import Config
from r3rl.models.flux import FluxModel
from r3rl.models.reflector import HFReflector, Reflection
from r3rl.modes import regions
from r3rl.modes.metrics import background_scores
from r3rl.rewards import CombinedReward
from r3rl.rollout import (
    SamplerSettings,
    TextSettings,
    nanmean,
    reflect_and_refine,
    run_diffusion,
    score,
)
from r3rl.sampling import SDEConfig


@dataclass
class EvalResult:
    metrics: dict[str, float]
    images: list[list[Image.Image]]  # [round][sample]
    captions: list[list[str]]  # [round][sample]: prompt + reflection that led to it
    scores: torch.Tensor | None = None  # [round, sample] weighted reward; NaN = could not score
    # [round][sample]: the reflection written in that round (None in round 0 and after a stop);
    # a reflection whose `instruction` is None is the stop ("no further edit needed")
    reflections: list[list[Reflection | None]] | None = None


def evaluate_rounds(
    reflector: HFReflector | None,
    generator: FluxModel,
    refiner: FluxModel | None,
    reward: CombinedReward,
    metas: list[dict],
    *,
    rounds: int,
    num_steps: int,
    text: TextSettings,
    batch_size: int,
    seed: int,
) -> EvalResult:
    """Round 0 = the generator's image; round k = after k reflect/refine rounds (stopped samples
    keep their image). `final` is the score after the last round each sample reached. With
    `rounds=0` (a generator-only run) the reflector and refiner may be None."""
    settings = SamplerSettings(num_steps=num_steps, sde=SDEConfig())
    n = len(metas)
    scores = torch.full((rounds + 1, n), math.nan)
    images: list[list[Image.Image]] = [[] for _ in range(rounds + 1)]
    captions: list[list[str]] = [[m["prompt"] for m in metas] for _ in range(rounds + 1)]
    stopped_at = torch.full((n,), rounds)
    reflections: list[list[Reflection | None]] = [[None] * n for _ in range(rounds + 1)]
    background: list[list[tuple[float, float]]] = [[] for _ in range(rounds + 1)]
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        batch = metas[sl]
        g = torch.Generator().manual_seed(seed + start)
        gen = run_diffusion(generator, [m["prompt"] for m in batch], None, settings, train=False, generator=g)
        cur = gen.images
        cur_scores = score(reward, batch, cur).total
        images[0] += cur
        scores[0, sl] = cur_scores
        active = list(range(len(batch)))
        for k in range(1, rounds + 1):
            new_scores = cur_scores.clone()
            if active:
                inputs = [cur[i] for i in active]
                refl, edited, ro, out, s = reflect_and_refine(
                    reflector, refiner, reward, [batch[i] for i in active], inputs,
                    cur_scores[active], text, settings, train_refiner=False, generator=g, seed=seed + 7919 * k + start,
                )
                if ro is not None:  # region preservation (RefineEval's MSE_bg / SSIM_bg) of refined samples
                    metas_e = [batch[active[j]] for j in edited]
                    background[k] += background_scores([inputs[j] for j in edited], [out[j] for j in edited],
                                                       regions(ro.texts, metas_e))
                for j, i in enumerate(active):
                    captions[k][start + i] = f"{batch[i]['prompt']} | {refl[j].text}"
                    reflections[k][start + i] = refl[j]
                    new_scores[i] = s.total[j]
                    cur[i] = out[j]
                done = [active[j] for j in range(len(active)) if j not in set(edited)]
                for i in done:
                    stopped_at[start + i] = min(int(stopped_at[start + i]), k - 1)
                active = [active[j] for j in edited]
            images[k] += list(cur)
            scores[k, sl] = new_scores
            cur_scores = new_scores
    metrics: dict[str, float] = {}
    for k in range(rounds + 1):
        metrics[f"eval/round{k}_mean"] = nanmean(scores[k])
        if k:
            d = scores[k] - scores[k - 1]
            d = d[~d.isnan()]  # shares of the samples scored in both rounds: unscorable is not "unchanged"
            metrics[f"eval/round{k}_improved"] = float((d > 0).float().mean())
            metrics[f"eval/round{k}_worse"] = float((d < 0).float().mean())
            metrics[f"eval/round{k}_unchanged"] = float((d == 0).float().mean())
    metrics["eval/final_mean"] = nanmean(scores[rounds])
    for k, pairs in enumerate(background):
        if pairs:
            metrics[f"eval/round{k}_mse_bg"], metrics[f"eval/round{k}_ssim_bg"] = map(float, np.mean(pairs, axis=0))
    if any(background):
        metrics["eval/mse_bg"], metrics["eval/ssim_bg"] = map(float, np.mean([p for pairs in background for p in pairs], axis=0))
    metrics["eval/mean_rounds_used"] = float(stopped_at.float().mean())
    by_tag: dict[str, list[float]] = defaultdict(list)
    for i, m in enumerate(metas):
        by_tag[m.get("tag", "untagged")].append(float(scores[rounds, i]))
    for tag, vals in sorted(by_tag.items()):
        metrics[f"eval/tag/{tag}"] = nanmean(torch.tensor(vals))
    return EvalResult(metrics, images, captions, scores, reflections)


def evaluate(cfg: Config, prompts_path: str | None = None) -> dict[str, float]:
    """`r3rl eval`: score rounds 0..eval.rounds of the recipe's models on held-out prompts.

    Also writes `output_dir/eval/round{k}.png` (image grids captioned with prompt, reflection
    and reward) and `output_dir/eval/metrics.json` (see `r3rl.inference.write_eval_outputs`).
    """
    from r3rl.inference import write_eval_outputs
    from r3rl.trainer import build_run

    run = build_run(cfg, eval_prompts=prompts_path, for_training=False)
    result = run.evaluate(step=None)
    write_eval_outputs(result, Path(cfg.output_dir) / "eval")
    return result.metrics
