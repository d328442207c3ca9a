"""The R3 trainer: one rollout and one optimiser step of each credit scheme, and the loop.

Read top to bottom: `train_step` makes a step's rollouts (R3's `generate` or `refine` step, or
a `tree`), each a `Batch` of loss terms; `r3rl.losses.batch_loss` turns a batch into the
weighted GRPO + FlowGRPO loss, which an `Update` (`r3rl.update`) backpropagates and steps;
`train` is the loop with evaluation (`r3rl.evaluate`), logging and checkpoints. The loaded
policies and the state carried between steps live in `r3rl.run`.

A slow judge is kept off the critical path (`r3rl.overlap`): each rollout is scored in the
step's scoring thread while the loss's forwards are made, and a refine step begins the next
generate step's rollout; before an evaluation or a checkpoint that rollout is dropped.

Every rollout follows one path between the ranks (`r3rl.distributed.Shard`): each rank
simulates its block of a group, the scores are gathered (`gather_scores`), the group
statistics are computed on the whole group on every rank, and each rank takes its rows back.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from r3rl import overlap
from r3rl.algos.advantages import group_advantages, r3_generate_rewards, r3_refine_rewards
from r3rl.batch import Batch, ImageTerm, TextTerm, plan_term, scale_by_batch_std
from r3rl.checkpoint import find_resume, load_checkpoint, save_checkpoint
from r3rl.config import Config
from r3rl.distributed import Shard, any_rank, mean_metrics
from r3rl.errors import UserError
from r3rl.evaluate import TrainingEvals
from r3rl.logger import RunLogger
from r3rl.losses import batch_loss, image_forwards, text_forwards
from r3rl.models.vllm_rollout import RolloutError
from r3rl.reason import Plans, plan_metrics, write_plans
from r3rl.rollout import (
    BufferItem,
    DiffusionRollout,
    Scored,
    gather_scores,
    nanmean,
    reflect_and_refine,
    reflection_text_scores,
    reward_metrics,
    run_diffusion,
    score_later,
)
from r3rl.run import Policy, Run, build_run, process_group
from r3rl.stopping import StopRequested, reward_failures, stop_on_rollout_error
from r3rl.tree import Rows, grow_tree
from r3rl.update import Update

# --------------------------------------------------------------------------- one step


def stage_for(run: Run, step: int) -> str:
    """Tree credit grows a tree every step; R3 alternates generate (odd steps, while the
    generator trains or the reflector's plans do) and refine steps; a run without a refiner only
    generates."""
    if run.cfg.rollout.credit == "tree":
        return "tree"
    plans_train = run.reason is not None and run.reflector_opt is not None
    if run.refiner is None or ((run.generator.trainable or plans_train) and step % 2 == 1):
        return "generate"
    return "refine"


def train_step(run: Run, step: int) -> dict[str, float]:
    """`trainer.grad_accum` rollouts, each backpropagated after the last (so only one is held),
    then one optimiser step. `scale_rewards: batch` needs every group of the step first: then
    all the rollouts are made (and held) before their losses; the weights do not change in
    between, so the numbers are the same either way. A rollout scores in the step's scoring
    thread; the next step's rollout may begin during this one (`r3rl.overlap`)."""
    stage = stage_for(run, step)
    update = Update(run)
    t_roll = 0.0
    t0 = time.perf_counter()
    n = run.cfg.trainer.grad_accum
    held = run.cfg.rollout.scale_rewards == "batch" and n > 1
    ahead = overlap.take(run, step)
    with overlap.step_thread(run, ahead) as pool:
        # held rollouts wait for their losses: their forwards (graphs) are made then, not early
        rollouts = _rollouts(run, stage, step, n, pool, forwards_early=not held, ahead=ahead)
        if run.cfg.rollout.scale_rewards == "batch":
            rollouts = list(rollouts)
            scale_by_batch_std([batch for batch, _ in rollouts])
        for batch, seconds in rollouts:
            t_roll += seconds
            update.add(batch_loss(run, batch), batch.metrics)
    # on-policy: the rollout begun for the next step sampled the generator, which this update
    # leaves alone
    assert run.ahead is None or "generator" not in update.optimizers
    out = update.step()
    t_train = time.perf_counter() - t0 - t_roll
    out.update({"stage": stage, "time/rollout_s": t_roll, "time/train_s": t_train})
    out["time/step_s"] = t_roll + t_train
    if ahead is not None:  # this step's rollout, made (and timed) in the step before
        out["time/rollout_ahead_s"] = ahead.seconds
    row = mean_metrics(out, run.dist)
    if run.rollout is not None and "reflector" in update.optimizers:
        run.sync_rollout(row)
    return row


def _draws(run: Run, step: int, micro: int) -> tuple[torch.Generator, int]:
    """The noise generator and the seed (its noise and its text samples) of a step's
    `micro`-th rollout."""
    seed = run.cfg.seed * 100003 + step + micro * 7919
    return torch.Generator().manual_seed(seed), seed


def _rollouts(
    run: Run,
    stage: str,
    step: int,
    n: int,
    pool: Executor | None = None,
    *,
    forwards_early: bool = True,
    ahead: overlap.Ahead[_Started] | None = None,
) -> Iterator[tuple[Batch, float]]:
    """The step's `n` rollouts of `stage`, made one at a time as they are asked for, with the
    seconds each took (those of the loss forwards made while the judge scored included; `ahead`,
    the first one, begun in the step before, counts there). Each is scored in `pool`'s thread
    (None: inline) and returns once its scores are in; with `forwards_early` its loss forwards
    are made meanwhile (always, whatever `pool` is, so the numbers do not depend on it)."""
    for micro in range(n):
        t0 = time.perf_counter()
        gen, seed = _draws(run, step, micro)
        if stage == "generate":
            started = ahead.started if ahead is not None and micro == 0 else None
            batch = _generate_rollout(
                run, gen, train=True, seed=seed, pool=pool, forwards=forwards_early, started=started
            )
        elif stage == "refine":
            if run.generator.trainable is False or len(run.buffer) == 0:
                _generate_rollout(run, gen, train=False, seed=seed)  # keep the buffer fed
            nxt = step + 1
            begin = nxt if overlap.can_begin(run, nxt, stage_for(run, nxt), n) else None
            batch = _refine_rollout(run, gen, seed, pool=pool, forwards=forwards_early, begin=begin)
        else:
            batch = _tree_rollout(run, gen, seed, pool)
        yield batch, time.perf_counter() - t0


@dataclass
class _Started:
    """A generate rollout whose images are drawn and whose scores may still be in flight."""

    meta: dict
    plans: Plans | None
    rollout: DiffusionRollout
    pending: Future[Scored]
    train: bool


def _plans(run: Run, metas: list[dict], seed: int) -> Plans | None:
    """`rollout.reason`: the reflector's plan for each sample (None when it is off), sampled by
    the reflector itself, also with `reflector.rollout=vllm`."""
    if run.reason is None:
        return None
    return write_plans(run.reflector, run.reason, metas, run.text, seed=seed + 104729)


def _generate_rollout(
    run: Run,
    gen: torch.Generator,
    *,
    train: bool,
    seed: int = 0,
    pool: Executor | None = None,
    forwards: bool = False,
    started: _Started | None = None,
) -> Batch:
    """R3's generate step (`started`: its images, drawn in the step before; `r3rl.overlap`)."""
    if started is None:
        started = _start_generate(run, gen, train=train, seed=seed, pool=pool)
    return _finish_generate(run, started, forwards=forwards)


def _start_generate(
    run: Run, gen: torch.Generator, *, train: bool, seed: int = 0, pool: Executor | None = None
) -> _Started:
    """R3's generate step up to its scores: a group of G images of one prompt, sent to the
    rewards in `pool`'s thread (None: scored now); with `rollout.reason` each image is drawn
    from the prompt and its plan."""
    g = run.cfg.rollout.group_size
    meta = run.rng.choice(run.train_prompts)
    group = Shard(g, run.dist)  # noise is drawn for all g on every rank
    pol = run.generator
    plans = _plans(run, [meta] * g, seed)
    prompts = [meta["prompt"]] * g if plans is None else plans.texts
    ro = run_diffusion(
        pol.model, prompts, None, pol.settings, train=train, generator=gen, keep=group.keep
    )
    pending = score_later(pool, run.reward, [meta] * len(ro.images), ro.images)
    return _Started(meta, plans, ro, pending, train)


def _finish_generate(run: Run, started: _Started, *, forwards: bool = False) -> Batch:
    """R3's generate step from its images: image reward = the reward; with `rollout.reason` the
    plans train too. With `forwards` the image loss's forwards are made before the scores are
    waited for."""
    g = run.cfg.rollout.group_size
    group = Shard(g, run.dist)
    pol = run.generator
    meta, plans, ro, train = started.meta, started.plans, started.rollout, started.train
    fwd = image_forwards(run, pol, ro) if forwards and train and _trains(pol) else None
    s = gather_scores(started.pending.result(), group)  # what follows reads the rewards
    if run.refiner is not None:  # the inputs of later refine steps
        for im, r in zip(group.gather(ro.images), s.total.tolist()):
            run.buffer.add(BufferItem(meta, im, r, 0))
    batch = Batch(metrics=reward_metrics(s))
    if train:
        fmt = torch.ones_like(s.total)
        _, image_r = r3_generate_rewards(s.total, fmt, run.cfg.rollout.format_weight)
        adv, valid, zero, groups = group_advantages(
            image_r, torch.zeros(g), scale_std=_group_std(run)
        )
        term = ImageTerm(
            pol, ro, group.take(adv), group.take(valid), total=g, pool=image_r, forwards=fwd
        )
        batch.image_terms.append(term)
        batch.metrics["frac_reward_zero_std"] = zero / groups
    if plans is not None:
        _add_plans(run, batch, plans, meta, s.total, train=train)
    return batch


def _add_plans(
    run: Run, batch: Batch, plans: Plans, meta: dict, rewards: torch.Tensor, *, train: bool
) -> None:
    """`rollout.reason`: the plans' metrics and, when training, their GRPO term; a plan's reward
    is its image's (a tree's root value)."""
    g = run.cfg.rollout.group_size
    batch.metrics |= plan_metrics(run.reason, plans, [meta] * g)
    if train:
        kw = {"format_weight": run.cfg.rollout.format_weight, "scale_std": _group_std(run)}
        batch.text_terms.append(plan_term(plans, rewards, Shard(g, run.dist), **kw))


def _refine_rollout(
    run: Run,
    gen: torch.Generator,
    seed: int,
    *,
    pool: Executor | None = None,
    forwards: bool = False,
    begin: int | None = None,
) -> Batch:
    """R3's reflect-refine step: the group reflects on and refines one buffered image; reward =
    improvement over it; text reward = format + improvement; no image advantage on a stop.
    The refinements are scored in `pool`'s thread (None: inline) while step `begin`'s generate
    rollout is begun (`r3rl.overlap`) and, with `forwards`, the loss's forwards are made."""
    rc = run.cfg.rollout
    g = rc.group_size
    item = run.buffer.draw(run.rng, rc.perfect_prob, run.reward.is_perfect)
    group = Shard(g, run.dist)
    metas, inputs = [item.meta] * g, [item.image] * g
    r_in = torch.full((g,), item.reward)
    pol = run.refiner
    out = reflect_and_refine(
        run.sampler,
        pol.model,
        run.reward,
        metas,
        inputs,
        r_in,
        run.text,
        pol.settings,
        train_refiner=pol.trainable,
        generator=gen,
        seed=seed,
        topo=run.dist,
        pool=pool,
    )
    refl, edited = out.reflections, out.edited
    # the refined image that goes on to the next round, drawn before the next step's prompt
    carry = run.rng.choice(edited) if item.round + 1 < rc.max_rounds and edited else None
    if begin is not None:
        gen_next, seed_next = _draws(run, begin, 0)
        start = partial(_start_generate, run, gen_next, train=True, seed=seed_next, pool=pool)
        overlap.begin(run, begin, pool, start)
    prompts = [m["prompt"] for m in metas]
    t_fwd = i_fwd = None
    if forwards:  # while the judge scores: they read the round, not its rewards
        if run.reflector_opt is not None:
            t_fwd = text_forwards(run, *(group.take(x) for x in (prompts, inputs, refl)))
        if out.rollout is not None and _trains(pol):
            i_fwd = image_forwards(run, pol, out.rollout)
    s = out.scores  # waits for the judge
    stopped = torch.tensor([r.instruction is None for r in refl])
    fmt = torch.tensor([float(r.format_ok) for r in refl])
    text_r, image_r, image_mask = r3_refine_rewards(
        s.total,
        r_in,
        stopped,
        fmt,
        input_perfect=run.reward.is_perfect(item.reward),
        format_weight=rc.format_weight,
        perfect_stop_bonus=rc.perfect_stop_bonus,
    )
    text_scores = reflection_text_scores(run.reward, metas, refl)
    if text_scores is not None:  # the recipe's TRL-style text rewards shape the reflector too
        text_r = text_r + text_scores
    ids = torch.zeros(g)
    t_adv, t_valid, zero, groups = group_advantages(text_r, ids, scale_std=_group_std(run))
    tokens = sum(len(r.token_ids) for r, v in zip(refl, t_valid.tolist()) if v)  # on all ranks
    i_adv, i_valid, _, _ = group_advantages(image_r, ids, scale_std=_group_std(run))
    if carry is not None:  # one refined image goes on to the next round
        run.buffer.add(
            BufferItem(item.meta, out.images[carry], float(s.total[carry]), item.round + 1)
        )
    batch = Batch(metrics=reward_metrics(s))
    batch.metrics |= {
        "reward/format_mean": float(fmt.mean()),
        "reward/improvement_mean": nanmean(image_r),
        "reward/input_mean": item.reward,
        "refine/stop_rate": float(stopped.float().mean()),
        "refine/input_round": item.round,
        "frac_reward_zero_std": zero / groups,
    }
    text_rows = [group.take(x) for x in (prompts, inputs, refl, t_adv, t_valid)]  # this rank's
    batch.text_terms.append(TextTerm(*text_rows, tokens=tokens, pool=text_r, forwards=t_fwd))
    if out.rollout is not None:
        mine = [edited[j] for j in out.edits.rows]  # the group rows of this rank's edits
        if mine:
            idx = torch.tensor(mine)
            valid = i_valid[idx] & image_mask[idx]
            term = ImageTerm(
                pol, out.rollout, i_adv[idx], valid, total=len(edited), pool=image_r, forwards=i_fwd
            )
        else:  # every rank pools the group
            term = ImageTerm.stand_in(
                pol, out.rollout, total=len(edited), pool=image_r, forwards=i_fwd
            )
        batch.image_terms.append(term)
    return batch


def _tree_rollout(run: Run, gen: torch.Generator, seed: int, pool: Executor | None = None) -> Batch:
    """Tree credit (`r3rl.tree`): this rank's share of the tree's nodes as loss terms, each with
    its count on all ranks; a rank without refinements of its own in a level trains a stand-in
    at weight 0. Each level's batch is scored in `pool`'s thread while the next level grows."""
    meta = run.rng.choice(run.train_prompts)
    g = run.cfg.rollout.group_size
    plans = _plans(run, [meta] * g, seed)
    tree = grow_tree(
        run.sampler,
        run.generator,
        run.refiner,
        run.reward,
        meta,
        run.cfg.rollout,
        run.text,
        generator_rng=gen,
        seed=seed,
        topo=run.dist,
        texts=None if plans is None else plans.texts,
        pool=pool,
    )
    roots = tree.values[:g].float()
    batch = Batch(metrics={**reward_metrics(tree.root_scores, roots), **tree.metrics})
    valid = ~torch.isnan(tree.values)

    def image_term(policy: Policy, ro: DiffusionRollout, rows: Rows) -> ImageTerm:
        if not rows.nodes:
            return ImageTerm.stand_in(policy, ro, total=rows.total)
        ids = torch.tensor(rows.nodes)
        return ImageTerm(policy, ro, tree.adv[ids], valid[ids], total=rows.total)

    if tree.reflections:  # this rank's (node, reflection, the image it read)
        nodes, refl, images = (list(x) for x in zip(*tree.reflections))
        ids = torch.tensor(nodes)
        prompts = [meta["prompt"]] * len(ids)
        total, tokens = tree.reflection_total, tree.reflection_tokens
        text = TextTerm(
            prompts, images, refl, tree.adv[ids], valid[ids], total=total, tokens=tokens
        )
        batch.text_terms.append(text)
    if run.generator.trainable:
        batch.image_terms.append(image_term(run.generator, tree.roots, tree.root_rows))
    batch.image_terms += [image_term(run.refiner, ro, rows) for rows, ro in tree.refinements]
    if plans is not None:  # a plan's reward is its root's value (mean reward of its leaves)
        _add_plans(run, batch, plans, meta, roots, train=True)
    return batch


def _trains(policy: Policy) -> bool:
    """Whether `batch_loss` trains this diffusion policy (so its forwards are worth making)."""
    return policy.trainable and policy.opt is not None


def _group_std(run: Run) -> bool:
    """Whether a group's advantages are divided by its own std ('batch' divides them later)."""
    return run.cfg.rollout.scale_rewards == "group"


# --------------------------------------------------------------------------- the loop


def train(cfg: Config) -> None:
    """`r3rl train`: pretrain (shapes world, cached), then RL with evaluation and checkpoints."""
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, torch.get_num_threads())))
    with process_group(cfg) as topo:
        run = build_run(cfg, topo=topo)
        try:
            _train(run)
        finally:
            run.close()  # a launched vLLM rollout server


def _train(run: Run) -> None:
    cfg, topo = run.cfg, run.dist
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = find_resume(cfg.resume, out)
    start = load_checkpoint(run, resume) if resume is not None else 0
    tc = cfg.trainer
    first_step = start + 1 if resume is not None else 0  # rows of completed steps survive a resume
    logger = RunLogger(out, total_steps=tc.max_steps, start_step=first_step, enabled=topo.is_main)
    with logger, StopRequested() as stop:
        logger.save_config(cfg)
        if resume is not None:
            logger.info(f"resumed from {resume} at step {start}")
        if run.rollout is not None:
            logger.info(run.rollout.describe())
        evals = TrainingEvals(run, logger, out)
        if start == 0:
            evals.step0()
        budget_s, trained_s = 60 * (tc.max_minutes or math.inf), 0.0
        step = start
        for step in range(start + 1, tc.max_steps + 1):
            try:
                row = train_step(run, step)
            except RolloutError as e:  # the server died, hung or did not take the weights
                overlap.drop(run)  # what is saved is the state after the step
                if getattr(e, "row", None) is not None:  # after the step's update: logged, saved
                    logger.log(step, e.row)
                stop_on_rollout_error(run, e, step, out)
            trained_s += row["time/step_s"]  # the ranks' mean: every rank stops at the same step
            last = step == tc.max_steps or trained_s >= budget_s
            evaluating = tc.eval_every and (step % tc.eval_every == 0 or last)
            stopping = any_rank(stop.flag, topo)  # every rank saves and stops at the same step
            saving = (tc.save_every and step % tc.save_every == 0) or last or stopping
            failed = reward_failures(run, row, step)
            if evaluating or saving or failed:  # the checkpoint rule (r3rl.overlap)
                overlap.drop(run)
            if evaluating:
                row.update(evals.at(step))
            logger.log(step, row)
            if saving:
                path = save_checkpoint(run, out, step, keep_last=tc.keep_last)
                if stopping and not last:
                    logger.info(stop.message(step, path, out))
                    return
            if failed:
                path = save_checkpoint(run, out, step, keep_last=tc.keep_last)
                raise UserError(f"{failed}; checkpoint saved to {path}")
            if last:
                break
        evals.report(step)
