"""Rollouts: generate -> reflect -> refine, recording what the losses need.

One file holds the episode logic for training (R3's two step kinds and tree credit) and for
evaluation (multi-round, early stop). Images are PIL at the boundary; rewards come from the
recipe's `CombinedReward`, with `None` turned into NaN so it is masked, never counted as 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from r3rl.algos.flow_grpo import select_train_timesteps
from r3rl.distributed import Topology, gather
from r3rl.models.base import TextCond, encode_condition
from r3rl.models.flux import FluxModel
from r3rl.models.reflector import HFReflector, Reflection
from r3rl.modes import refiner_texts, regions
from r3rl.rewards import CombinedReward
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


def score(reward: CombinedReward, metas: list[dict], images: list[Image.Image], texts: list[str] | None = None,
          **extra) -> Scored:
    """`extra` keyword arguments reach the rewards that accept them (e.g. input_images, regions)."""
    kwargs = {"completions": texts, **extra} if texts is not None else extra
    res = reward([m["prompt"] for m in metas], images, metas, **kwargs)
    total = torch.tensor([math.nan if r is None else float(r) for r in res.total])
    return Scored(total, res.components, res.failures, res.latency_s)


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
    """Sample images; SDE (with log-probs) on the chosen steps when `train`, ODE everywhere otherwise.

    `keep` selects the rows this process simulates (the rest live on other ranks); random
    draws are made for all `len(texts)` rows either way (see `r3rl.sampling.sample`).
    """
    b = len(texts)
    if train:
        mask = select_train_timesteps(
            settings.num_steps, b, settings.strategy, k=settings.num_train_timesteps,
            window=settings.window_size, max_index=settings.max_index, generator=generator,
        )
    else:
        mask = torch.zeros(b, settings.num_steps, dtype=torch.bool)
    if keep is not None:
        texts = [texts[i] for i in keep.tolist()]
        refs = None if refs is None else [refs[i] for i in keep.tolist()]
    with torch.no_grad():
        cond, ref = encode_condition(model, texts, refs)
        traj = sample(model, cond, ref, model.sigmas(settings.num_steps), mask, settings.sde,
                      generator=generator, keep=keep)
    return DiffusionRollout(model.decode(traj.latents), traj, texts, ref, cond)


@dataclass
class BufferItem:
    meta: dict
    image: Image.Image
    reward: float
    round: int


@dataclass
class ImageBuffer:
    """Generated (and refined) images waiting to be reflected on; R3 draws perfect ones with prob p."""

    capacity: int
    items: list[BufferItem] = field(default_factory=list)

    def add(self, item: BufferItem) -> None:
        if math.isnan(item.reward):
            return  # an unscored input cannot anchor an improvement reward
        self.items.append(item)
        if len(self.items) > self.capacity:
            self.items.pop(0)

    def draw(self, rng: random.Random, perfect_prob: float, is_perfect: Callable[[float], bool]) -> BufferItem:
        """Pop one input: a perfect one (by the combined reward's own top score) with `perfect_prob`."""
        perfect = [i for i, it in enumerate(self.items) if is_perfect(it.reward)]
        flawed = [i for i, it in enumerate(self.items) if not is_perfect(it.reward)]
        pool = perfect if (perfect and (not flawed or rng.random() < perfect_prob)) else flawed
        return self.items.pop(rng.choice(pool))

    def __len__(self) -> int:
        return len(self.items)


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
) -> tuple[list[Reflection], list[int], DiffusionRollout | None, list[Image.Image], Scored]:
    """One reflect-refine round for a batch; stopped samples keep their image and reward.

    With several ranks, each passes its equal shard of the group. The refiner's random draws
    are made for the edits of the whole group (gathered), so they do not depend on the split;
    a rank with no edit of its own refines a stand-in (returned as the rollout while `edited`
    is empty) so every rank runs the same forward passes, as ZeRO-3 needs.
    """
    topo = topo or Topology()
    # every rank samples the whole group's reflections with the same seed and keeps its own, so
    # text samples, like the diffusion draws, do not depend on how the group is split
    prompts, group_images = gather([m["prompt"] for m in metas], topo), gather(images, topo)
    refl = reflector.reflect(prompts, group_images, temperature=text.temperature, top_k=text.top_k,
                             top_p=text.top_p, max_new_tokens=text.max_new_tokens, seed=seed)
    refl = refl[topo.rank * len(images):(topo.rank + 1) * len(images)]
    edited = [i for i, r in enumerate(refl) if r.instruction is not None]
    instructions = gather([r.instruction for r in refl], topo)
    edits = [j for j, ins in enumerate(instructions) if ins is not None]  # the whole group's edits
    mine = [edits.index(topo.rank * len(refl) + i) for i in edited]  # my edits' places among them
    out = list(images)
    total = input_rewards.clone()
    components: dict[str, list[float | None]] = {}
    failures: dict[str, int] = {}
    latency: dict[str, float] = {}
    rollout = None
    if edits:
        group_metas = gather(metas, topo)
        texts = refiner_texts(refiner, [group_metas[j] for j in edits], [instructions[j] for j in edits])  # per refiner.mode
        refs = [images[0]] * len(edits)  # only the kept rows are encoded
        for j, i in zip(mine, edited):
            refs[j] = images[i]
        keep = torch.tensor(mine or [0]) if topo.distributed else None
        rollout = run_diffusion(refiner, texts, refs, diffusion, train=train_refiner, generator=generator, keep=keep)
    if edited:
        metas_e, inputs = [metas[i] for i in edited], [images[i] for i in edited]
        s = score(reward, metas_e, rollout.images, [refl[i].text for i in edited], input_images=inputs,
                  regions=regions(rollout.texts, metas_e))
        for j, i in enumerate(edited):
            out[i] = rollout.images[j]
            total[i] = s.total[j]
        components, failures, latency = s.components, s.failures, s.latency_s
    return refl, edited, rollout, out, Scored(total, components, failures, latency)
