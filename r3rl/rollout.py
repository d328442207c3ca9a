"""Rollouts: generate -> reflect -> refine, recording what the losses need.

One file holds the episode logic for training (R3's two step kinds and tree credit) and for
evaluation (multi-round, early stop). Images are PIL at the boundary; rewards come from the
recipe's `CombinedReward`, with `None` turned into NaN so it is masked, never counted as 0.

A slow judge need not stall the trainer: given an executor, `score_later` and
`reflect_and_refine` score in its thread and hand back the scores as a future, so the caller can
do the work that does not read them (the loss's forwards) before it waits.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import torch
from PIL import Image

from r3rl.algos.flow_grpo import select_train_timesteps
from r3rl.distributed import Shard, Topology
from r3rl.models.base import TextCond, encode_condition
from r3rl.models.flux import FluxModel
from r3rl.models.reflector import HFReflector, Reflection
from r3rl.modes import refiner_texts, regions
from r3rl.rewards import CombinedReward, chat_completions, chat_prompts
from r3rl.sampling import SDEConfig, Trajectory, sample


@dataclass(frozen=True)
class SamplerSettings:
    """How one diffusion policy samples during training rollouts."""

    num_steps: int
    sde: SDEConfig
    strategy: str = "one"  # which steps run SDE and are trained (see select_train_timesteps)
    num_train_timesteps: int = 1
    window_size: int = 2
    max_index: int | None = None


@dataclass(frozen=True)
class TextSettings:
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int


def reflection_text_scores(
    reward: CombinedReward, metas: list[dict], reflections: list[Reflection]
) -> torch.Tensor | None:
    """The recipe's text rewards (TRL-style) on each reflection, called as TRL's GRPOTrainer calls
    them for a chat model (prompt = the target description); NaN where unscored. None when the
    recipe has no text reward. They shape the reflector's reward only, never an image's."""
    if not reward.has_text:
        return None
    res = reward.score_text(
        chat_prompts([m["prompt"] for m in metas]),
        chat_completions([r.text for r in reflections]),
        metas,
        completion_ids=[r.token_ids for r in reflections],
    )
    return torch.tensor([math.nan if x is None else float(x) for x in res.total])


def nanmean(x: torch.Tensor) -> float:
    """Mean over the scored entries (NaN = could not score); NaN when none was scored."""
    v = x[~torch.isnan(x)]
    return float(v.mean()) if v.numel() else math.nan


@dataclass
class Scored:
    """Reward of a batch: the weighted total (NaN = could not score) and each component."""

    total: torch.Tensor
    components: dict[str, list[float | None]]
    failures: dict[str, int]
    latency_s: dict[str, float]


def gather_scores(s: Scored, shard: Shard) -> Scored:
    """Every rank's scores of its block of `shard`, in row order (rewards are computed sharded);
    components are concatenated, failures summed, latencies the slowest rank's."""
    if not shard.topo.distributed:
        return s
    parts = shard.gather(
        [(s.total.tolist(), s.components, s.failures, s.latency_s)]
    )  # one collective
    total = torch.tensor([x for p in parts for x in p[0]])
    comps = {k: [x for p in parts for x in p[1].get(k, [])] for p in parts for k in p[1]}
    fails = {k: sum(p[2].get(k, 0) for p in parts) for p in parts for k in p[2]}
    lat = {k: max(p[3].get(k, 0.0) for p in parts) for p in parts for k in p[3]}
    return Scored(total, comps, fails, lat)


def reward_metrics(s: Scored, total: torch.Tensor | None = None) -> dict[str, float]:
    """Mean and std of `total` (default: the scored total), judge failures, each component's mean
    and each reward's latency."""
    total = s.total if total is None else total
    scored = total[~torch.isnan(total)]
    out = {
        "reward/mean": nanmean(total),
        "reward/std": float(scored.std()) if len(scored) > 1 else 0.0,
        "judge/failures": int(torch.isnan(total).sum()),
    }
    for name, vals in s.components.items():
        v = torch.tensor([math.nan if x is None else x for x in vals], dtype=torch.float32)
        out[f"reward/{name}"] = nanmean(v)
    for name, sec in s.latency_s.items():
        out[f"time/reward_{name}_s"] = sec
    return out


def score(
    reward: CombinedReward,
    metas: list[dict],
    images: list[Image.Image],
    texts: list[str] | None = None,
    **extra,
) -> Scored:
    """`extra` keyword arguments reach the rewards that accept them (e.g. input_images, regions)."""
    kwargs = {"completions": texts, **extra} if texts is not None else extra
    res = reward([m["prompt"] for m in metas], images, metas, **kwargs)
    total = torch.tensor([math.nan if r is None else float(r) for r in res.total])
    return Scored(total, res.components, res.failures, res.latency_s)


def score_later(
    pool: Executor | None,
    reward: CombinedReward,
    metas: list[dict],
    images: list[Image.Image],
    texts: list[str] | None = None,
    **extra,
) -> Future[Scored]:
    """`score` in `pool`'s thread (an HTTP judge waits on the network, not on the GIL), or now
    when `pool` is None; `.result()` gives the scores or raises what scoring raised. Judge
    failures are the reward's business either way (`None` -> NaN)."""
    if pool is not None:
        return pool.submit(score, reward, metas, images, texts, **extra)
    return _done(score(reward, metas, images, texts, **extra))


def no_scores() -> Future[Scored]:
    """The scores of no image (a rank without a row of its own to score), already in."""
    return _done(Scored(torch.zeros(0), {}, {}, {}))


def _done(scores: Scored) -> Future[Scored]:
    done: Future[Scored] = Future()
    done.set_result(scores)
    return done


@dataclass
class DiffusionRollout:
    """Images from one diffusion policy with the trained transitions and their conditioning."""

    images: list[Image.Image]
    traj: Trajectory
    texts: list[str]  # conditioning text per sample (prompt or instruction)
    ref: torch.Tensor | None  # reference latents (edit) or None (text-to-image)
    # the encoded conditioning the samples were drawn with (frozen encoders): the loss reuses it,
    # so an encoder that reads the edited image too (Qwen-Image-Edit) runs once per rollout
    cond: TextCond | None = None


def run_diffusion(
    model: FluxModel,
    texts: list[str],
    refs: list[Image.Image] | None,
    settings: SamplerSettings,
    *,
    train: bool,
    generator: torch.Generator,
    keep: torch.Tensor | None = None,
) -> DiffusionRollout:
    """Sample images; SDE (with log-probs) on the chosen steps when `train`, ODE everywhere
    otherwise.

    `keep` selects the rows this process simulates (the rest live on other ranks); random
    draws are made for all `len(texts)` rows either way (see `r3rl.sampling.sample`).
    """
    b = len(texts)
    if train:
        mask = select_train_timesteps(
            settings.num_steps,
            b,
            settings.strategy,
            k=settings.num_train_timesteps,
            window=settings.window_size,
            max_index=settings.max_index,
            generator=generator,
        )
    else:
        mask = torch.zeros(b, settings.num_steps, dtype=torch.bool)
    if keep is not None:
        texts = [texts[i] for i in keep.tolist()]
        refs = None if refs is None else [refs[i] for i in keep.tolist()]
    with torch.no_grad():
        cond, ref = encode_condition(model, texts, refs)
        traj = sample(
            model,
            cond,
            ref,
            model.sigmas(settings.num_steps),
            mask,
            settings.sde,
            generator=generator,
            keep=keep,
        )
    return DiffusionRollout(model.decode(traj.latents), traj, texts, ref, cond)


@dataclass
class BufferItem:
    meta: dict
    image: Image.Image
    reward: float
    round: int


@dataclass
class ImageBuffer:
    """Generated (and refined) images waiting to be reflected on; R3 draws a perfect one with
    probability p."""

    capacity: int
    items: list[BufferItem] = field(default_factory=list)

    def add(self, item: BufferItem) -> None:
        if math.isnan(item.reward):
            return  # an unscored input cannot anchor an improvement reward
        self.items.append(item)
        if len(self.items) > self.capacity:
            self.items.pop(0)

    def draw(
        self, rng: random.Random, perfect_prob: float, is_perfect: Callable[[float], bool]
    ) -> BufferItem:
        """Pop one input: with `perfect_prob` a perfect one (by the combined reward's top score)."""
        perfect = [i for i, it in enumerate(self.items) if is_perfect(it.reward)]
        flawed = [i for i, it in enumerate(self.items) if not is_perfect(it.reward)]
        pool = perfect if (perfect and (not flawed or rng.random() < perfect_prob)) else flawed
        return self.items.pop(rng.choice(pool))

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class RefineRound:
    """One reflect-refine round of a group of G rows, whole on every rank but for `rollout`."""

    reflections: list[Reflection]  # (G,) the reflection of every row
    edited: list[int]  # (E,) the rows whose reflection gave an instruction, in row order
    edits: Shard  # the split of the E edits between the ranks
    # this rank's block of the E edits (a stand-in row when its block is empty); None: no edit
    rollout: DiffusionRollout | None
    images: list[Image.Image]  # (G,) every row's image after the round (its input when it stopped)
    input_rewards: torch.Tensor  # (G,) the reward of each row's input image
    pending: Future[Scored]  # this rank's edits' scores, maybe still being computed
    _scores: Scored | None = field(default=None, repr=False)

    @property
    def scores(self) -> Scored:
        """total (G,): every row's reward (its input's when it stopped); components (E,): the
        edits'. The first read waits for this rank's scores and gathers every rank's: a
        collective, so every rank reads it at the same point."""
        if self._scores is None:
            total = self.input_rewards.clone()
            if not self.edited:
                self._scores = Scored(total, {}, {}, {})
                return self._scores
            s = gather_scores(self.pending.result(), self.edits)
            for j, i in enumerate(self.edited):
                total[i] = s.total[j]
            self._scores = Scored(total, s.components, s.failures, s.latency_s)
        return self._scores


def reflect_and_refine(
    reflector: HFReflector,
    refiner: FluxModel,
    reward: CombinedReward,
    metas: list[dict],
    images: list[Image.Image],
    input_rewards: torch.Tensor,
    text: TextSettings,
    diffusion: SamplerSettings,
    *,
    train_refiner: bool,
    generator: torch.Generator,
    seed: int,
    topo: Topology | None = None,
    pool: Executor | None = None,
) -> RefineRound:
    """One reflect-refine round for a group; stopped rows keep their image and reward.

    Every rank passes the whole group and samples the whole group's reflections with the same
    seed, so text samples do not depend on how the group is split. The edits are split between
    the ranks by `Shard`, the refiner's random draws made for all of them on every rank; each
    rank refines and scores its block and the blocks are gathered back, so every rank returns
    the whole round. A rank with no edit of its own refines a stand-in (see `Shard.keep`).
    With `pool` the edits are scored in its thread: `RefineRound.scores` waits for them.
    """
    topo = topo or Topology()
    refl = reflector.reflect(
        [m["prompt"] for m in metas],
        images,
        temperature=text.temperature,
        top_k=text.top_k,
        top_p=text.top_p,
        max_new_tokens=text.max_new_tokens,
        seed=seed,
    )
    edited = [i for i, r in enumerate(refl) if r.instruction is not None]
    edits = Shard(len(edited), topo)
    out = list(images)
    if not edited:
        return RefineRound(refl, edited, edits, None, out, input_rewards, no_scores())
    instructions = [refl[i].instruction for i in edited]
    texts = refiner_texts(refiner, [metas[i] for i in edited], instructions)  # per refiner.mode
    rollout = run_diffusion(
        refiner,
        texts,
        [images[i] for i in edited],
        diffusion,
        train=train_refiner,
        generator=generator,
        keep=edits.keep,
    )
    mine = [edited[j] for j in edits.rows]
    refined = rollout.images[: len(mine)]  # without the stand-in row
    pending = no_scores()
    if mine:
        metas_e, inputs = [metas[i] for i in mine], [images[i] for i in mine]
        pending = score_later(
            pool,
            reward,
            metas_e,
            refined,
            [refl[i].text for i in mine],
            input_images=inputs,
            regions=regions(rollout.texts[: len(mine)], metas_e),
        )
    for i, image in zip(edited, edits.gather(refined), strict=True):
        out[i] = image
    return RefineRound(refl, edited, edits, rollout, out, input_rewards, pending)
