"""Multi-round evaluation: generate, then reflect/refine with early stop, scoring every round.

Used inside training (`TrainingEvals`: step 0 and every `trainer.eval_every` steps, their
grids, the reward-hacking warning and the closing summary) and by `r3rl eval`.
Sampling is deterministic (ODE, fixed seeds, low temperature) so rounds and checkpoints compare.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from r3rl.config import Config
from r3rl.logger import RunLogger, image_grid
from r3rl.models.flux import FluxModel
from r3rl.models.reflector import HFReflector, Reflection
from r3rl.modes import regions
from r3rl.modes.metrics import background_scores
from r3rl.reason import Plans, Reasoner, plan_metrics, write_plans
from r3rl.rewards import CombinedReward
from r3rl.rollout import (
    SamplerSettings,
    TextSettings,
    nanmean,
    reflect_and_refine,
    run_diffusion,
    score,
)
from r3rl.run import Run, build_run
from r3rl.sampling import SDEConfig
from r3rl.shapes.gold import gold_scores
from r3rl.shapes.world import SHAPES_MODEL

# (metadata, images) -> (passed, has clutter) per image: an eval-only judge (r3rl.shapes.gold)
GoldScorer = Callable[[list[dict], list[Image.Image]], tuple[list[bool], list[bool]]]


def gold_scorer(cfg: Config) -> GoldScorer | None:
    """The recipe's gold judge (`eval.gold`), or None. It is looked up here, never among the
    rewards, so no recipe can train on it."""
    choice = cfg.eval.gold
    if choice == "auto":
        choice = "shapes" if cfg.generator.model == SHAPES_MODEL else "none"
    return gold_scores if choice == "shapes" else None


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
    gold: GoldScorer | None = None,
    reason: Reasoner | None = None,
) -> EvalResult:
    """Round 0 = the generator's image; round k = after k reflect/refine rounds (stopped samples
    keep their image). `final` is the score after the last round each sample reached. With
    `rounds=0` (a generator-only run) the reflector and refiner may be None. `gold`, when given,
    adds the `eval/gold/*` figures (see `gold_metrics`). `reason` (rollout.reason): the reflector
    plans each round-0 image (shown in its caption; `eval/reason/*` figures)."""
    settings = SamplerSettings(num_steps=num_steps, sde=SDEConfig())
    n = len(metas)
    scores = torch.full((rounds + 1, n), math.nan)
    images: list[list[Image.Image]] = [[] for _ in range(rounds + 1)]
    captions: list[list[str]] = [[m["prompt"] for m in metas] for _ in range(rounds + 1)]
    stopped_at = torch.full((n,), rounds)
    reflections: list[list[Reflection | None]] = [[None] * n for _ in range(rounds + 1)]
    background: list[list[tuple[float, float]]] = [[] for _ in range(rounds + 1)]
    plans = Plans([], [], [])
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        batch = metas[sl]
        g = torch.Generator().manual_seed(seed + start)
        texts = [m["prompt"] for m in batch]
        if reason is not None:
            p = write_plans(reflector, reason, batch, text, seed=seed + 104729 + start)
            texts = p.texts
            for field in ("turns", "reflections", "texts"):
                getattr(plans, field).extend(getattr(p, field))
            for i, r in enumerate(p.reflections):
                captions[0][start + i] = f"{batch[i]['prompt']} | plan: {r.instruction}"
        gen = run_diffusion(generator, texts, None, settings, train=False, generator=g)
        cur = gen.images
        cur_scores = score(reward, batch, cur).total
        images[0] += cur
        scores[0, sl] = cur_scores
        active = list(range(len(batch)))
        for k in range(1, rounds + 1):
            new_scores = cur_scores.clone()
            if active:
                inputs = [cur[i] for i in active]
                step = reflect_and_refine(
                    reflector,
                    refiner,
                    reward,
                    [batch[i] for i in active],
                    inputs,
                    cur_scores[active],
                    text,
                    settings,
                    train_refiner=False,
                    generator=g,
                    seed=seed + 7919 * k + start,
                )
                refl, edited, ro, out, s = (
                    step.reflections,
                    step.edited,
                    step.rollout,
                    step.images,
                    step.scores,
                )
                if (
                    ro is not None
                ):  # region preservation (RefineEval's MSE_bg / SSIM_bg) of refined samples
                    metas_e = [batch[active[j]] for j in edited]
                    background[k] += background_scores(
                        [inputs[j] for j in edited],
                        [out[j] for j in edited],
                        regions(ro.texts, metas_e),
                    )
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
            d = d[
                ~d.isnan()
            ]  # shares of the samples scored in both rounds: unscorable is not "unchanged"
            metrics[f"eval/round{k}_improved"] = float((d > 0).float().mean())
            metrics[f"eval/round{k}_worse"] = float((d < 0).float().mean())
            metrics[f"eval/round{k}_unchanged"] = float((d == 0).float().mean())
    metrics["eval/final_mean"] = nanmean(scores[rounds])
    for k, pairs in enumerate(background):
        if pairs:
            metrics[f"eval/round{k}_mse_bg"], metrics[f"eval/round{k}_ssim_bg"] = map(
                float, np.mean(pairs, axis=0)
            )
    if any(background):
        metrics["eval/mse_bg"], metrics["eval/ssim_bg"] = map(
            float, np.mean([p for pairs in background for p in pairs], axis=0)
        )
    metrics["eval/mean_rounds_used"] = float(stopped_at.float().mean())
    by_tag: dict[str, list[float]] = defaultdict(list)
    for i, m in enumerate(metas):
        by_tag[m.get("tag", "untagged")].append(float(scores[rounds, i]))
    for tag, vals in sorted(by_tag.items()):
        metrics[f"eval/tag/{tag}"] = nanmean(torch.tensor(vals))
    perfect = torch.tensor([[reward.is_perfect(float(x)) for x in row] for row in scores])
    metrics.update(verdict_metrics(reflections, perfect))
    if reason is not None:
        metrics.update(plan_metrics(reason, plans, metas, prefix="eval/"))
    if gold is not None:
        metrics.update(gold_metrics(gold, metas, images, reflections))
    return EvalResult(metrics, images, captions, scores, reflections)


def verdict_metrics(
    reflections: list[list[Reflection | None]], correct: torch.Tensor, prefix: str = "eval/"
) -> dict[str, float]:
    """How well the reflector knows when to stop (R3's image-text alignment, in miniature).

    Every reflection of round k judged the image of round k-1; its verdict is "stop" (no
    further edit needed) or an edit. `correct[k, i]` says whether that image met its prompt.
    verdict_acc: share of verdicts that agree (stop on a correct image, edit on a wrong one);
    stop_precision: share of stops made on correct images; stop_recall: share of correct
    images on which the reflector stopped. NaN where nothing qualifies."""
    stop, truth = [], []
    for k in range(1, len(reflections)):
        for i, r in enumerate(reflections[k]):
            if r is not None:
                stop.append(r.instruction is None)
                truth.append(bool(correct[k - 1, i]))
    s, t = torch.tensor(stop, dtype=torch.bool), torch.tensor(truth, dtype=torch.bool)
    return {
        f"{prefix}verdict_acc": _share(s == t),
        f"{prefix}stop_precision": _share(t[s]),
        f"{prefix}stop_recall": _share(s[t]),
    }


def _share(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else math.nan


def gold_metrics(
    gold: GoldScorer,
    metas: list[dict],
    images: list[list[Image.Image]],
    reflections: list[list[Reflection | None]],
) -> dict[str, float]:
    """`eval/gold/round{k}_acc` (share of images the gold judge passes), `_clutter` (share with
    anything unrecognisable in them), the same for `final`, and the reflector's verdicts judged
    against gold (`eval/gold/verdict_acc`, `stop_precision`, `stop_recall`)."""
    out: dict[str, float] = {}
    passed = []
    for k, round_images in enumerate(images):
        ok, clutter = gold(metas, round_images)
        passed.append(ok)
        out[f"eval/gold/round{k}_acc"] = float(np.mean(ok))
        out[f"eval/gold/round{k}_clutter"] = float(np.mean(clutter))
    last = len(images) - 1
    out["eval/gold/final_acc"] = out[f"eval/gold/round{last}_acc"]
    out["eval/gold/final_clutter"] = out[f"eval/gold/round{last}_clutter"]
    out.update(verdict_metrics(reflections, torch.tensor(passed), prefix="eval/gold/"))
    return out


def evaluate_run(run: Run) -> EvalResult:
    """Multi-round evaluation of a run on its held-out prompts. With `trainer.ema` the trained
    policies' EMA weights stand in for their live weights (flow_grpo evaluates its EMA too),
    which come back bit for bit after."""
    e = run.cfg.eval
    text = TextSettings(e.temperature, run.text.top_k, run.text.top_p, run.text.max_new_tokens)
    refiner = None if run.refiner is None else run.refiner.model
    with contextlib.ExitStack() as averaged:
        for name, ema in run.ema.items():
            averaged.enter_context(ema.applied(run.trained_params(name)))
        return evaluate_rounds(
            run.reflector,
            run.generator.model,
            refiner,
            run.reward,
            run.eval_prompts * e.samples_per_prompt,
            rounds=e.rounds if refiner is not None else 0,
            num_steps=e.num_steps,
            text=text,
            batch_size=e.batch_size,
            seed=run.cfg.seed + 1,
            gold=gold_scorer(run.cfg),
            reason=run.reason,
        )


def evaluate(cfg: Config, prompts_path: str | None = None) -> dict[str, float]:
    """`r3rl eval`: score rounds 0..eval.rounds of the recipe's models on held-out prompts.

    Also writes `output_dir/eval/round{k}.png` (image grids captioned with prompt, reflection
    and reward) and `output_dir/eval/metrics.json` (see `write_eval_outputs`).
    """
    run = build_run(cfg, eval_prompts=prompts_path, for_training=False)
    result = evaluate_run(run)
    write_eval_outputs(result, Path(cfg.output_dir) / "eval")
    return result.metrics


# ---------------------------------------------------------------- reports of a training run
HACKING_DELTA = 0.02  # a rise of the trained reward and a fall of gold both larger than this


def hacking_warning(first: dict[str, float], now: dict[str, float], step: int) -> str | None:
    """The reward-hacking signal: the trained reward rose since step 0 while gold fell."""
    key, gold = "eval/final_mean", "eval/gold/final_acc"
    if gold not in first or gold not in now:
        return None
    d_reward, d_gold = now[key] - first[key], now[gold] - first[gold]
    if d_reward > HACKING_DELTA and d_gold < -HACKING_DELTA:
        return (
            f"warning: possible reward hacking at step {step}: the trained reward ({key}) rose "
            f"{first[key]:.3f} -> {now[key]:.3f} while gold ({gold}) fell {first[gold]:.3f} -> "
            f"{now[gold]:.3f} (clutter {first.get('eval/gold/final_clutter', math.nan):.2f} -> "
            f"{now.get('eval/gold/final_clutter', math.nan):.2f}); look at the image grids before "
            "trusting the reward"
        )
    return None


def write_step_grids(result: EvalResult, out: Path, step: int) -> Path:
    """`out/grids/step-N/round{k}.png` + metrics.json: the evaluation images of one step."""
    path = out / "grids" / f"step-{step}"
    write_eval_outputs(result, path)
    return path


def comparison_grid(first: EvalResult, last: EvalResult, step: int, n: int = 8) -> Image.Image:
    """One row per held-out sample: its rounds at step 0, then its rounds at `step`, each
    captioned with the prompt, the reflection that led to it and its reward."""
    rounds = len(first.images)
    images, captions = [], []
    for i in range(min(n, len(first.images[0]))):
        for tag, res in (("step 0", first), (f"step {step}", last)):
            for k in range(rounds):
                images.append(res.images[k][i])
                score = "n/a" if res.scores is None else f"{float(res.scores[k, i]):.2f}"
                captions.append(f"{tag} r{k} [{score}] {res.captions[k][i]}")
    return image_grid(images, captions, ncols=2 * rounds, max_caption_lines=7)


def summary_lines(first: dict[str, float], last: dict[str, float], step: int) -> list[str]:
    """The end-of-training table: trained reward and gold per round at step 0 and at the end."""
    rows = [("trained reward, final round", "eval/final_mean")]
    rows += [(f"gold acc, round {k}", f"eval/gold/round{k}_acc") for k in range(16)]
    rows += [
        ("gold acc, final round", "eval/gold/final_acc"),
        ("gold clutter rate, final", "eval/gold/final_clutter"),
        ("verdict acc vs gold", "eval/gold/verdict_acc"),
    ]
    lines = [f"{'':32s}{'step 0':>10s}{f'step {step}':>12s}"]
    for label, key in rows:
        if key in first or key in last:
            a, b = first.get(key, math.nan), last.get(key, math.nan)
            lines.append(f"{label:32s}{a:10.3f}{b:12.3f}")
    return lines


class TrainingEvals:
    """The evaluations of a training run: step 0's (kept to compare the end with) and the latest,
    their TensorBoard images and grids, the reward-hacking warning, and the closing report."""

    def __init__(self, run: Run, logger: RunLogger, out: Path) -> None:
        self.run = run
        self.logger = logger
        self.out = out
        self.first: EvalResult | None = None  # None when the run resumed
        self.latest: EvalResult | None = None

    def step0(self) -> None:
        """Evaluate the initial weights: logged as step 0, with its images and grids."""
        self.first = self.latest = evaluate_run(self.run)
        self.logger.log(0, {"step": 0, **self.first.metrics})
        self._log_images(0, self.first)
        if self.run.dist.is_main:
            write_step_grids(self.first, self.out, 0)

    def at(self, step: int) -> dict[str, float]:
        """Evaluate after `step`: its metrics for the step's row; its images every time
        (`trainer.log_images_every`), and a warning when the reward looks hacked."""
        self.latest = evaluate_run(self.run)
        if self.run.cfg.trainer.log_images_every:
            self._log_images(step, self.latest)
        if self.first is not None and (
            warning := hacking_warning(self.first.metrics, self.latest.metrics, step)
        ):
            self.logger.info(warning)
        return self.latest.metrics

    def _log_images(self, step: int, result: EvalResult, n: int = 8) -> None:
        """TensorBoard image grids of the first `n` samples of every round."""
        for k, (ims, caps) in enumerate(zip(result.images, result.captions)):
            self.logger.log_images(step, f"eval/round{k}", ims[:n], caps[:n])

    def report(self, step: int) -> None:
        """The end of a run (on the main rank): grids of step 0 vs the end, the summary table,
        where everything is."""
        if not self.run.dist.is_main:
            return
        first, last, out = self.first, self.latest, self.out
        self.logger.info(f"finished {step} steps; checkpoints in {out / 'checkpoints'}")
        if last is not None and last is not first:  # evaluated since step 0
            grids = write_step_grids(last, out, step)
            self.logger.info(f"evaluation grids per round: {grids}")
            if first is not None:
                path = out / "grids" / "step0_vs_final.png"
                comparison_grid(first, last, step).save(path)
                self.logger.info(
                    f"step 0 vs step {step}, every round: {path} (look at it before trusting a "
                    "number)"
                )
            # a resumed run reads step 0's figures from its log
            step0 = first.metrics if first is not None else _logged_row(out / "metrics.jsonl", 0)
            for line in summary_lines(step0, last.metrics, step) if step0 else []:
                self.logger.info(line)
        self.logger.info(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")


def _logged_row(path: Path, step: int) -> dict | None:
    """The row of `step` in a run's metrics.jsonl, if it is there."""
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("step") == step:
                return row
    return None


# ---------------------------------------------------------------- output files


def _plain(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_eval_outputs(
    result: EvalResult, out: str | Path, *, max_samples: int = 64, ncols: int = 8
) -> None:
    """`round{k}.png`: the first `max_samples` samples at round k, captioned with prompt, reflection
    and reward; `metrics.json`: the eval figures (NaN as null)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for k, (images, captions) in enumerate(zip(result.images, result.captions)):
        n = min(len(images), max_samples)
        if n == 0:
            continue
        if result.scores is not None:
            captions = [
                f"{c} | reward {_reward_text(float(result.scores[k, i]))}"
                for i, c in enumerate(captions[:n])
            ]
        image_grid(images[:n], captions[:n], ncols=min(n, ncols)).save(out / f"round{k}.png")
    tmp = out / "metrics.json.tmp"
    tmp.write_text(
        json.dumps({k: _plain(v) for k, v in result.metrics.items()}, indent=2) + "\n",
        encoding="utf-8",
    )
    tmp.replace(out / "metrics.json")


def _reward_text(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"
