"""Tree credit (design.md §4): grow one prompt's generate → reflect → refine tree level by level
and give every node its value and sibling-relative advantage, on one or several processes.

Several processes split the work as R3 credit does (`r3rl.distributed.Shard`): each rank simulates
a contiguous block of the roots and of each level's refinements, with the diffusion draws made
for the whole level on every rank; every rank samples the whole level's reflections with the
same seed; images and rewards are gathered after each level. So every rank holds the whole tree
and computes the same advantages, whatever the split, and trains its block of each level's
nodes. Each trained term carries its node count (and the reflections their valid token count)
on all ranks, from which the trainer weights its share so that the mean of the ranks' gradients
is the one-process gradient (see `r3rl.losses`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from r3rl.algos.advantages import group_advantages, tree_advantages
from r3rl.config import RolloutConfig
from r3rl.distributed import Shard, Topology
from r3rl.models.reflector import HFReflector, Reflection
from r3rl.modes import regions
from r3rl.rewards import CombinedReward
from r3rl.rollout import (
    DiffusionRollout,
    Scored,
    TextSettings,
    gather_scores,
    nanmean,
    reflection_text_scores,
    run_diffusion,
    score,
)
from r3rl.run import Policy


@dataclass
class Rows:
    """The nodes of one trained term that this rank holds, and the term's node count on all
    ranks."""

    nodes: list[int]
    total: int


@dataclass
class Tree:
    """One prompt's tree, whole on every rank, and this rank's share of its trained nodes."""

    parent: list[int]  # node -> parent node (-1: a root); roots are nodes 0..G-1
    values: torch.Tensor  # (n,) float64: mean leaf reward under each node (NaN: none scored)
    adv: torch.Tensor  # (n,) float32: value relative to the node's siblings
    root_scores: Scored  # all roots
    metrics: dict[str, float]
    roots: DiffusionRollout  # this rank's roots
    root_rows: Rows
    reflections: list[
        tuple[int, Reflection, Image.Image]
    ]  # this rank's (node, reflection, input image)
    reflection_total: int
    reflection_tokens: (
        int  # completion tokens of all ranks' reflections whose value is known (dapo)
    )
    # per level with refinements: this rank's nodes and their rollout (a stand-in when it has none)
    refinements: list[tuple[Rows, DiffusionRollout]]


def grow_tree(
    reflector: HFReflector,
    generator: Policy,
    refiner: Policy,
    reward: CombinedReward,
    meta: dict,
    cfg: RolloutConfig,
    text: TextSettings,
    *,
    generator_rng: torch.Generator,
    seed: int,
    topo: Topology,
    texts: list[str] | None = None,
) -> Tree:
    """G roots x K reflections x M refinements per level, `cfg.max_rounds` levels. A reflection
    that stops is a leaf whose reward is its unchanged input's. Every batch of the tree (the
    roots, a level's reflections, a level's refinements) is split between the ranks by `Shard`.

    Refinements are scored with their input images (rewards such as background_preservation
    compare the two). A reflection's advantage is R3's refine-step text reward among its
    siblings: `f·(improvement + format_weight)` with f its format reward and improvement its
    value minus its input's reward, or `perfect_stop_bonus` when it stopped on a perfect input;
    with K = G, M = 1 and one level this is R3's reflect-refine step. `judge/failures` counts
    every unscored sample of the tree (roots and refinements), `judge/samples` the samples.
    `texts` (G,): the roots' generator texts (`rollout.reason`: prompt + plan; default prompt)."""
    g, prompt = cfg.group_size, meta["prompt"]
    mine = Shard(g, topo)
    roots = run_diffusion(
        generator.model,
        [prompt] * g if texts is None else texts,
        None,
        generator.settings,
        train=generator.trainable,
        generator=generator_rng,
        keep=mine.keep,
    )
    root_s = gather_scores(score(reward, [meta] * len(roots.images), roots.images), mine)
    parent = [-1] * g
    rewards = root_s.total.tolist()
    frontier = list(
        zip(range(g), mine.gather(roots.images), rewards)
    )  # (node, image, reward) to reflect on
    reflections: list[tuple[int, Reflection, Image.Image]] = []
    lengths: list[tuple[int, int]] = []  # (node, completion tokens) of every rank's reflections
    refinements: list[tuple[Rows, DiffusionRollout]] = []
    stops = total_refl = 0
    refl_info: list[
        tuple[int, int, float, bool, bool]
    ] = []  # (node, parent, input reward, stopped, format ok)
    refl_all: list[Reflection] = []  # the reflection of each refl_info entry, on every rank
    for level in range(cfg.max_rounds):
        if not frontier:
            break
        src = [f for f in frontier for _ in range(cfg.tree_k)]
        refl = reflector.reflect(
            [prompt] * len(src),
            [f[1] for f in src],
            temperature=text.temperature,
            top_k=text.top_k,
            top_p=text.top_p,
            max_new_tokens=text.max_new_tokens,
            seed=seed + 31 * level,
        )
        total_refl += len(refl)
        own = Shard(len(src), topo).rows
        edit_src: list[
            tuple[int, Image.Image, str]
        ] = []  # (reflection node, input image, instruction)
        for j, ((node, image, r), rf) in enumerate(zip(src, refl)):
            rid = len(parent)
            parent.append(node)
            rewards.append(
                r if rf.instruction is None else math.nan
            )  # stop: value = unchanged image
            lengths.append((rid, len(rf.token_ids)))
            refl_info.append((rid, node, r, rf.instruction is None, bool(rf.format_ok)))
            refl_all.append(rf)
            if j in own:
                reflections.append((rid, rf, image))
            if rf.instruction is None:
                stops += 1
            else:
                edit_src += [(rid, image, rf.instruction)] * cfg.tree_m
        frontier = []
        if edit_src:
            edits = Shard(len(edit_src), topo)
            frontier, ro = _refine_level(
                refiner, reward, meta, edit_src, len(parent), generator_rng, edits
            )
            parent += [rid for rid, _, _ in edit_src]
            rewards += [r for _, _, r in frontier]
            refinements.append((Rows([frontier[i][0] for i in edits.rows], len(frontier)), ro))
    values, adv, zero, sets = tree_advantages(
        parent, torch.tensor(rewards, dtype=torch.float64), scale_std=cfg.scale_rewards == "group"
    )
    fmt = torch.tensor([float(f) for *_, f in refl_info])
    if refl_info:
        ids = [n for n, *_ in refl_info]
        text_r = reflection_rewards(
            values[ids], refl_info, reward.is_perfect, cfg.format_weight, cfg.perfect_stop_bonus
        )
        text_scores = reflection_text_scores(reward, [meta] * len(refl_all), refl_all)
        if text_scores is not None:  # the recipe's TRL-style text rewards shape the reflector too
            text_r = text_r + text_scores.to(text_r.dtype)
        t_adv, _, _, _ = group_advantages(
            text_r, [p for _, p, *_ in refl_info], scale_std=cfg.scale_rewards == "group"
        )
        adv[ids] = torch.nan_to_num(t_adv).to(adv.dtype)
    refl_nodes = {n for n, *_ in refl_info}
    scored = [
        r for node, r in enumerate(rewards) if node not in refl_nodes
    ]  # roots and refinements
    metrics = {
        "refine/stop_rate": stops / max(1, total_refl),
        "frac_reward_zero_std": zero / max(1, sets),
        "reward/final_mean": nanmean(torch.tensor([r for _, _, r in frontier]))
        if frontier
        else math.nan,
        "reward/format_mean": float(fmt.mean()) if refl_info else math.nan,
        "judge/failures": sum(math.isnan(r) for r in scored),
        "judge/samples": len(scored),
    }
    tokens = sum(n for node, n in lengths if not math.isnan(values[node]))
    return Tree(
        parent,
        values,
        adv.float(),
        root_s,
        metrics,
        roots,
        Rows(list(mine.rows), g),
        reflections,
        total_refl,
        tokens,
        refinements,
    )


def reflection_rewards(
    values: torch.Tensor,
    info: list[tuple[int, int, float, bool, bool]],
    is_perfect: Callable[[float], bool],
    format_weight: float,
    perfect_stop_bonus: float,
) -> torch.Tensor:
    """R3's refine-step text reward of each reflection node (`r3_refine_rewards` with the node's
    value as the new reward): f·(value − input + w), or f·(bonus + w) for a stop on a perfect input;
    0 when the format failed, whatever the value."""
    out = []
    for value, (_, _, r_in, stopped, ok) in zip(values.tolist(), info):
        if not ok:
            out.append(0.0)
            continue
        perfect = not math.isnan(r_in) and is_perfect(r_in)
        shaped = (
            perfect_stop_bonus if stopped and perfect else (0.0 * r_in if stopped else value - r_in)
        )
        out.append(shaped + format_weight)
    return torch.tensor(out, dtype=torch.float64)


def _refine_level(
    refiner: Policy,
    reward: CombinedReward,
    meta: dict,
    edits: list[tuple[int, Image.Image, str]],
    first_node: int,
    rng: torch.Generator,
    shard: Shard,
) -> tuple[list[tuple[int, Image.Image, float]], DiffusionRollout]:
    """Refine a level's edits, each rank its block, and return every edit's (node, image, reward)
    on every rank with this rank's rollout. A rank with an empty block refines a stand-in row (the
    first edit) so that every rank runs the same forwards, as ZeRO-3 needs."""
    own = shard.rows
    ro = run_diffusion(
        refiner.model,
        [e[2] for e in edits],
        [e[1] for e in edits],
        refiner.settings,
        train=refiner.trainable,
        generator=rng,
        keep=shard.keep,
    )
    images = ro.images[: len(own)]
    inputs = [edits[i][1] for i in own]
    s = (
        score(
            reward,
            [meta] * len(images),
            images,
            input_images=inputs,
            regions=regions(ro.texts[: len(own)], [meta] * len(images)),
        )
        if images
        else Scored(torch.zeros(0), {}, {}, {})
    )
    nodes = range(first_node, first_node + len(edits))
    return list(zip(nodes, shard.gather(images), gather_scores(s, shard).total.tolist())), ro
