"""Tree credit (design.md §4): grow one prompt's generate → reflect → refine tree level by level
and give every node its value and sibling-relative advantage, on one or several processes.

Several processes split the work as R3 credit does (`r3rl.distributed.Shard`): each rank simulates
a contiguous block of the roots and of each level's refinements, with the diffusion draws made
for the whole level on every rank; every rank samples the whole level's reflections with the
same seed; images are gathered after each level, rewards once the tree is grown (a batch is
scored in the scoring thread, when given, while the next level is reflected on and refined: a
reflection reads images, not rewards). So every rank holds the whole tree
and computes the same advantages, whatever the split, and trains its block of each level's
nodes. Each trained term carries its node count (and the reflections their valid token count)
on all ranks, from which the trainer weights its share so that the mean of the ranks' gradients
is the one-process gradient (see `r3rl.losses`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Executor, Future
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
    no_scores,
    reflection_text_scores,
    run_diffusion,
    score_later,
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
    pool: Executor | None = None,
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
    `texts` (G,): the roots' generator texts (`rollout.reason`: prompt + plan; default prompt).
    `pool`: the thread that scores each batch while the next level grows (None: inline); the
    rewards are waited for, and gathered from the ranks, once every level is grown."""
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
    # (future scores, their split between the ranks, their nodes) of each scored batch
    pending = [
        (score_later(pool, reward, [meta] * len(roots.images), roots.images), mine, list(range(g)))
    ]
    parent = [-1] * g
    rewards = [math.nan] * g  # every node's, filled in from `pending` once the tree is grown
    frontier = list(zip(range(g), mine.gather(roots.images)))  # (node, image) to reflect on
    kept: dict[int, int] = {}  # a reflection that stopped -> the node whose image (reward) it kept
    reflections: list[tuple[int, Reflection, Image.Image]] = []
    lengths: list[tuple[int, int]] = []  # (node, completion tokens) of every rank's reflections
    refinements: list[tuple[Rows, DiffusionRollout]] = []
    stops = total_refl = 0
    refl_info: list[tuple[int, int, bool, bool]] = []  # (node, parent, stopped, format ok)
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
        for j, ((node, image), rf) in enumerate(zip(src, refl)):
            rid = len(parent)
            parent.append(node)
            rewards.append(math.nan)
            if rf.instruction is None:  # stop: value = the unchanged image's
                kept[rid] = node
            lengths.append((rid, len(rf.token_ids)))
            refl_info.append((rid, node, rf.instruction is None, bool(rf.format_ok)))
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
            frontier, ro, scores = _refine_level(
                refiner, reward, meta, edit_src, len(parent), generator_rng, edits, pool
            )
            pending.append((scores, edits, [node for node, _ in frontier]))
            parent += [rid for rid, _, _ in edit_src]
            rewards += [math.nan] * len(frontier)
            refinements.append((Rows([frontier[i][0] for i in edits.rows], len(frontier)), ro))
    # the rewards, scored meanwhile; every rank gathers them in the same order
    gathered = [gather_scores(scores.result(), shard) for scores, shard, _ in pending]
    root_s = gathered[0]
    for s, (_, _, nodes) in zip(gathered, pending, strict=True):
        for node, r in zip(nodes, s.total.tolist(), strict=True):
            rewards[node] = r
    for rid, node in kept.items():
        rewards[rid] = rewards[node]
    refl_info = [(rid, node, rewards[node], stop, ok) for rid, node, stop, ok in refl_info]
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
        "reward/final_mean": nanmean(torch.tensor([rewards[node] for node, _ in frontier]))
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
    pool: Executor | None = None,
) -> tuple[list[tuple[int, Image.Image]], DiffusionRollout, Future[Scored]]:
    """Refine a level's edits, each rank its block, and return every edit's (node, image) on every
    rank, this rank's rollout and its block's scores (in `pool`'s thread; None: now). A rank with
    an empty block refines a stand-in row (the first edit) so that every rank runs the same
    forwards, as ZeRO-3 needs."""
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
    scores = no_scores()
    if images:
        scores = score_later(
            pool,
            reward,
            [meta] * len(images),
            images,
            input_images=inputs,
            regions=regions(ro.texts[: len(own)], [meta] * len(images)),
        )
    nodes = range(first_node, first_node + len(edits))
    return list(zip(nodes, shard.gather(images))), ro, scores
