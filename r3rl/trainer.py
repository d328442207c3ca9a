"""The R3 trainer: composes models, rollouts, rewards and the two RL losses from a recipe.

Read top to bottom: `build_run` loads the policies; `Run.train_step` does one rollout and
one optimiser step of the chosen stage (R3's `generate` or `refine`, or `tree`); `train`
is the loop with evaluation, logging and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r3rl.algos.advantages import (
    divide_by_batch_std,
    group_advantages,
    r3_generate_rewards,
    r3_refine_rewards,
)
from r3rl.algos.ema import EMA
from r3rl.algos.flow_grpo import flow_grpo_loss
from r3rl.algos.grpo import grpo_loss
from r3rl.checkpoint import find_resume, load_checkpoint, save_checkpoint
from r3rl.config import Config, adamw_kwargs, warn_low_precision_full_finetuning
from r3rl.data import load_prompts
from r3rl.distributed import (
    Topology,
    any_rank,
    average_gradients,
    barrier,
    deepspeed_config,
    deepspeed_engine,
    gather,
    init_process_group,
    mean_metrics,
    shard,
    topology_from_env,
    zero_stage,
)
from r3rl.errors import UserError
from r3rl.evaluate import (
    EvalResult,
    comparison_grid,
    evaluate_rounds,
    gold_scorer,
    hacking_warning,
    summary_lines,
    write_step_grids,
)
from r3rl.logger import RunLogger, quiet_libraries
from r3rl.models.flux import FluxModel
from r3rl.models.lora import BaseView, add_lora
from r3rl.models.placement import place_flow_model, place_frozen, resolve_device
from r3rl.models.reflector import HFReflector, Reflection, lora_kwargs
from r3rl.models.registry import load_flow_model
from r3rl.modes import refiner_folder, wrap_refiner
from r3rl.rewards import CombinedReward
from r3rl.rollout import (
    BufferItem,
    DiffusionRollout,
    ImageBuffer,
    SamplerSettings,
    Scored,
    TextSettings,
    nanmean,
    reflect_and_refine,
    run_diffusion,
    score,
)
from r3rl.sampling import SDEConfig, transition_logprob
from r3rl.shapes.world import SHAPES_MODEL, ensure_world
from r3rl.tree import Rows, grow_tree

# --------------------------------------------------------------------------- loading


def _model_path(name: str, world_dir: Path | None, sub: str) -> Path:
    if name == SHAPES_MODEL:
        return world_dir / sub
    path = Path(name)
    if not path.exists():
        raise UserError(f"model path not found: {name!r} (expected '{SHAPES_MODEL}' or a local directory)")
    return path


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(module).eval()
    ref.requires_grad_(False)
    return ref


@dataclass
class Policy:
    """A trainable diffusion policy: the model, its frozen reference (for KL) and optimiser."""

    model: FluxModel
    settings: SamplerSettings
    train: bool
    ref_transformer: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None


@dataclass
class Run:
    cfg: Config
    reflector: HFReflector | None  # None (with the refiner) in a generator-only run, credit=flow_grpo
    ref_reflector: HFReflector | None
    reflector_opt: torch.optim.Optimizer | None
    generator: Policy
    refiner: Policy | None
    reward: CombinedReward
    train_prompts: list[dict]
    eval_prompts: list[dict]
    text: TextSettings
    rng: random.Random
    buffer: ImageBuffer
    nonfinite_in_row: int = 0
    stats: dict = field(default_factory=dict)
    dist: Topology = field(default_factory=Topology)
    engines: dict = field(default_factory=dict)  # policy name -> DeepSpeed engine (when configured)
    hf_zero3: object = None  # keeps transformers' ZeRO-3 flag alive: generate() then syncs ranks
    ema: dict[str, EMA] = field(default_factory=dict)  # policy name -> EMA of its trained weights (trainer.ema)

    def _mine(self, n: int) -> torch.Tensor | None:
        """Indices of a group of `n` this rank simulates (None: all of them, one process)."""
        return torch.tensor(list(shard(n, self.dist))) if self.dist.distributed else None

    def _gather_scored(self, s: Scored) -> Scored:
        """Every rank's scores of its shard, in sample order (rewards are computed sharded)."""
        if not self.dist.distributed:
            return s
        parts = gather([(s.total.tolist(), s.components, s.failures, s.latency_s)], self.dist)  # one collective
        total = torch.tensor([x for p in parts for x in p[0]])
        comps = {k: [x for p in parts for x in p[1].get(k, [])] for p in parts for k in p[1]}
        fails = {k: sum(p[2].get(k, 0) for p in parts) for p in parts for k in p[2]}
        lat = {k: max(p[3].get(k, 0.0) for p in parts) for p in parts for k in p[3]}
        return Scored(total, comps, fails, lat)

    def trained_params(self, name: str) -> list[torch.nn.Parameter]:
        """What policy `name`'s optimiser updates (its LoRA adapters or every weight), in a fixed order."""
        if name == "reflector":
            return self.reflector.trainable_parameters()
        return [p for p in getattr(self, name).model.transformer.parameters() if p.requires_grad]

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, step: int | None) -> EvalResult:
        """Multi-round evaluation. With `trainer.ema` the trained policies' EMA weights stand in for
        their live weights (flow_grpo evaluates its EMA too), which come back bit for bit after."""
        e = self.cfg.eval
        text = TextSettings(e.temperature, self.text.top_k, self.text.top_p, self.text.max_new_tokens)
        refiner = None if self.refiner is None else self.refiner.model
        with contextlib.ExitStack() as averaged:
            for name, ema in self.ema.items():
                averaged.enter_context(ema.applied(self.trained_params(name)))
            return evaluate_rounds(
                self.reflector, self.generator.model, refiner, self.reward, self.eval_prompts * e.samples_per_prompt,
                rounds=e.rounds if refiner is not None else 0, num_steps=e.num_steps, text=text,
                batch_size=e.batch_size, seed=self.cfg.seed + 1, gold=gold_scorer(self.cfg),
            )

    # ----------------------------------------------------------------- stages
    @property
    def _group_std(self) -> bool:
        """Whether a group's advantages are divided by its own std ('batch' divides them later)."""
        return self.cfg.rollout.scale_rewards == "group"

    def stage_for(self, step: int) -> str:
        if self.cfg.rollout.credit == "tree":
            return "tree"
        if self.refiner is None or (self.generator.train and step % 2 == 1):
            return "generate"
        return "refine"

    def train_step(self, step: int) -> dict[str, float]:
        """`trainer.grad_accum` rollouts, each backpropagated after the last (so only one is held),
        then one optimiser step. `scale_rewards: batch` needs every group of the step first: then
        all the rollouts are made (and held) before their losses; the weights do not change in
        between, so the numbers are the same either way."""
        stage = self.stage_for(step)
        n = self.cfg.trainer.grad_accum
        rows, opts, finite, t_roll = [], {}, True, 0.0
        t0 = time.perf_counter()
        rollouts = self._rollouts(stage, step, n)
        if self.cfg.rollout.scale_rewards == "batch":
            rollouts = list(rollouts)
            scale_by_batch_std([batch for batch, _ in rollouts])
        for batch, seconds in rollouts:
            t_roll += seconds
            metrics, loss, micro_opts, parts = self._loss(batch)
            if any_rank(not torch.isfinite(loss), self.dist):
                finite = False
            elif self.engines:
                for name in micro_opts:  # one engine per policy; DeepSpeed divides by grad_accum
                    self.engines[name].backward(parts[name])
                    self.engines[name].step()  # steps the optimiser at the accumulation boundary only
            elif micro_opts:
                (loss / n).backward()
            opts.update(micro_opts)
            rows.append({**metrics, **batch.metrics})
        out = _mean_rows(rows)
        out.update(self._optimizer_step(opts, finite))
        t_train = time.perf_counter() - t0 - t_roll
        out.update({"stage": stage, "time/rollout_s": t_roll, "time/train_s": t_train, "time/step_s": t_roll + t_train})
        return mean_metrics(out, self.dist)

    def _rollouts(self, stage: str, step: int, n: int) -> Iterator[tuple[Batch, float]]:
        """The step's `n` rollouts of `stage`, made one at a time as they are asked for, with the
        seconds each took."""
        for micro in range(n):
            t0 = time.perf_counter()
            seed = self.cfg.seed * 100003 + step + micro * 7919
            gen = torch.Generator().manual_seed(seed)
            if stage == "generate":
                batch = self._generate_rollout(gen, train=True)
            elif stage == "refine":
                if self.generator.train is False or len(self.buffer) == 0:
                    self._generate_rollout(gen, train=False)  # keep the buffer fed with fresh images
                batch = self._refine_rollout(gen, seed)
            else:
                batch = self._tree_rollout(gen, seed)
            yield batch, time.perf_counter() - t0

    # ----------------------------------------------------------------- rollouts
    def _generate_rollout(self, gen: torch.Generator, *, train: bool) -> Batch:
        g = self.cfg.rollout.group_size
        meta = self.rng.choice(self.train_prompts)
        mine = self._mine(g)  # this rank's samples; noise is drawn for all g on every rank
        ro = run_diffusion(self.generator.model, [meta["prompt"]] * g, None, self.generator.settings,
                           train=train, generator=gen, keep=mine)
        s = self._gather_scored(score(self.reward, [meta] * len(ro.images), ro.images))
        if self.refiner is not None:  # the inputs of later refine steps
            for im, r in zip(gather(ro.images, self.dist), s.total.tolist()):
                self.buffer.add(BufferItem(meta, im, r, 0))
        batch = Batch(metrics=_reward_metrics(s.total, s))
        if train:
            _, image_r = r3_generate_rewards(s.total, torch.ones_like(s.total), self.cfg.rollout.format_weight)
            adv, valid, zero, groups = group_advantages(image_r, torch.zeros(g), scale_std=self._group_std)
            if mine is not None:
                adv, valid = adv[mine], valid[mine]
            batch.image_terms.append(ImageTerm(self.generator, ro, adv, valid, total=g, pool=image_r))
            batch.metrics["frac_reward_zero_std"] = zero / groups
        return batch

    def _refine_rollout(self, gen: torch.Generator, seed: int) -> Batch:
        ro_cfg = self.cfg.rollout
        g = ro_cfg.group_size
        item = self.buffer.draw(self.rng, ro_cfg.perfect_prob, self.reward.is_perfect)
        mine = self._mine(g)  # the same input image on every rank; each reflects on its shard
        n = g if mine is None else len(mine)
        metas, inputs = [item.meta] * n, [item.image] * n
        r_in = torch.full((n,), item.reward)
        refl, edited_mine, ro, out, s = reflect_and_refine(
            self.reflector, self.refiner.model, self.reward, metas, inputs, r_in, self.text, self.refiner.settings,
            train_refiner=self.refiner.train, generator=gen, seed=seed, topo=self.dist,
        )
        s, out, refl_mine = self._gather_scored(s), gather(out, self.dist), refl
        refl = gather(refl, self.dist)
        edited = [i for i, r in enumerate(refl) if r.instruction is not None]
        r_in = torch.full((g,), item.reward)
        stopped = torch.tensor([r.instruction is None for r in refl])
        fmt = torch.tensor([float(r.format_ok) for r in refl])
        text_r, image_r, image_mask = r3_refine_rewards(
            s.total, r_in, stopped, fmt, input_perfect=self.reward.is_perfect(item.reward),
            format_weight=ro_cfg.format_weight, perfect_stop_bonus=ro_cfg.perfect_stop_bonus,
        )
        ids = torch.zeros(g)
        t_adv, t_valid, zero, groups = group_advantages(text_r, ids, scale_std=self._group_std)
        tokens = sum(len(r.token_ids) for r, v in zip(refl, t_valid.tolist()) if v)  # on all ranks
        i_adv, i_valid, _, _ = group_advantages(image_r, ids, scale_std=self._group_std)
        if item.round + 1 < ro_cfg.max_rounds and edited:
            k = self.rng.choice(edited)  # one refined image goes on to the next round
            self.buffer.add(BufferItem(item.meta, out[k], float(s.total[k]), item.round + 1))
        batch = Batch(metrics=_reward_metrics(s.total, s))
        batch.metrics.update({
            "reward/format_mean": float(fmt.mean()),
            "reward/improvement_mean": nanmean(image_r),
            "reward/input_mean": item.reward,
            "refine/stop_rate": float(stopped.float().mean()),
            "refine/input_round": item.round,
            "frac_reward_zero_std": zero / groups,
        })
        if mine is not None:
            t_adv, t_valid = t_adv[mine], t_valid[mine]
        batch.text_terms.append(TextTerm([m["prompt"] for m in metas], inputs, refl_mine, t_adv, t_valid,
                                         tokens=tokens, pool=text_r))
        if ro is not None and edited_mine:
            idx = torch.tensor(edited_mine) + (0 if mine is None else int(mine[0]))
            batch.image_terms.append(ImageTerm(self.refiner, ro, i_adv[idx], i_valid[idx] & image_mask[idx],
                                               total=len(edited), pool=image_r))
        elif ro is not None:  # every rank pools the group
            batch.image_terms.append(ImageTerm.stand_in(self.refiner, ro, total=len(edited), pool=image_r))
        return batch

    def _tree_rollout(self, gen: torch.Generator, seed: int) -> Batch:
        """Tree credit (`r3rl.tree`): this rank's share of the tree's nodes as loss terms, each with
        its count on all ranks; a rank without refinements of its own in a level trains a stand-in at weight 0."""
        meta = self.rng.choice(self.train_prompts)
        tree = grow_tree(self.reflector, self.generator, self.refiner, self.reward, meta, self.cfg.rollout, self.text,
                         generator_rng=gen, seed=seed, topo=self.dist, gather_scored=self._gather_scored)
        roots = tree.values[: self.cfg.rollout.group_size].float()
        batch = Batch(metrics={**_reward_metrics(roots, tree.root_scores), **tree.metrics})
        valid = ~torch.isnan(tree.values)

        def image_term(policy: Policy, ro: DiffusionRollout, rows: Rows) -> ImageTerm:
            if not rows.nodes:
                return ImageTerm.stand_in(policy, ro, total=rows.total)
            ids = torch.tensor(rows.nodes)
            return ImageTerm(policy, ro, tree.adv[ids], valid[ids], total=rows.total)

        if tree.reflections:
            ids = torch.tensor([n for n, _, _ in tree.reflections])
            batch.text_terms.append(TextTerm([meta["prompt"]] * len(ids), [im for _, _, im in tree.reflections],
                                             [rf for _, rf, _ in tree.reflections], tree.adv[ids], valid[ids],
                                             total=tree.reflection_total, tokens=tree.reflection_tokens))
        if self.generator.train:
            batch.image_terms.append(image_term(self.generator, tree.roots, tree.root_rows))
        batch.image_terms += [image_term(self.refiner, ro, rows) for rows, ro in tree.refinements]
        return batch

    # ----------------------------------------------------------------- update
    def _loss(self, batch: Batch) -> tuple[dict[str, float], torch.Tensor, dict[str, tuple], dict[str, torch.Tensor]]:
        """Weighted GRPO + FlowGRPO loss of one rollout batch, the optimisers it touches (by policy
        name) and each policy's part of the loss (one DeepSpeed engine backpropagates each part)."""
        metrics: dict[str, float] = {}
        loss = torch.zeros(())
        opts: dict[str, tuple] = {}
        parts: dict[str, torch.Tensor] = {}
        if self.reflector_opt is not None and batch.text_terms:
            l_text, m = self._text_loss(batch.text_terms)
            parts["reflector"] = self.cfg.trainer.text_loss_weight * l_text
            loss = loss + parts["reflector"]
            metrics.update(m)
            opts["reflector"] = (self.reflector_opt, self.trained_params("reflector"))
        terms = [t for t in batch.image_terms if t.policy.train and t.policy.opt is not None]
        if terms:
            l_img, m, by_policy = self._image_loss(terms)
            loss = loss + self.cfg.trainer.image_loss_weight * l_img
            metrics.update(m)
            for name, p in (("generator", self.generator), ("refiner", self.refiner)):
                if name in by_policy:
                    parts[name] = self.cfg.trainer.image_loss_weight * by_policy[name]
                    opts[name] = (p.opt, self.trained_params(name))
        return metrics, loss, opts, parts

    def _optimizer_step(self, opts: dict[str, tuple], finite: bool) -> dict[str, float]:
        """Clip and step every touched optimiser; a NaN/inf loss skips the step (K in a row stop the run).

        Several processes: gradients are averaged first (DDP's arithmetic), or DeepSpeed's
        engines (which already stepped at the accumulation boundary) report their norm.
        """
        if self.dist.distributed and sorted(opts) != sorted(set(gather(sorted(opts), self.dist))):
            raise RuntimeError(f"rank {self.dist.rank} updated {sorted(opts)} but another rank updated others")
        if not opts:
            return {}
        if not finite:
            for opt, _ in opts.values():
                opt.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.trainer.max_nonfinite_steps:
                raise UserError(f"loss was NaN/inf for {self.nonfinite_in_row} steps in a row; stopping "
                                "(lower the learning rates or check the rewards)")
            return {"train/skipped_nonfinite": 1}
        self.nonfinite_in_row = 0
        grad_norm = 0.0
        for name, (opt, params) in opts.items():
            if name in self.engines:
                grad_norm += float(self.engines[name].get_global_grad_norm() or 0.0)
                continue
            average_gradients(params, self.dist)
            grad_norm += float(torch.nn.utils.clip_grad_norm_(params, self.cfg.trainer.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
        for name, (_, params) in opts.items():  # after every optimiser step, DeepSpeed's included
            if name in self.ema:
                self.ema[name].update(params)
        return {"grad_norm": grad_norm}

    def _text_loss(self, terms: list[TextTerm]) -> tuple[torch.Tensor, dict[str, float]]:
        rc = self.cfg.reflector
        prompts = [p for t in terms for p in t.prompts]
        images = [im for t in terms for im in t.images]
        refl = [r for t in terms for r in t.reflections]
        adv = torch.cat([t.adv for t in terms])
        valid = torch.cat([t.valid for t in terms])
        comp = [r.token_ids for r in refl]
        keep = [i for i, c in enumerate(comp) if c]
        if not keep:
            return torch.zeros(()), {}
        sel = lambda xs: [xs[i] for i in keep]
        prompts, images, comp, refl = sel(prompts), sel(images), sel(comp), sel(refl)
        adv, valid = adv[keep], valid[keep]
        kw = {"temperature": self.text.temperature, "top_k": self.text.top_k, "top_p": self.text.top_p}
        # the ratio reads the sampled (filtered) distribution, the KL its unfiltered log-softmax
        logps, mask, entropy, kl_logps = self.reflector.completion_logprobs(prompts, images, comp, **kw,
                                                                            with_unfiltered=True)
        old = torch.zeros_like(logps)
        for i, r in enumerate(refl):
            old[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
        ref = None
        if rc.beta > 0:
            # unfiltered reference: a token outside the reference's own top-k would make k3 infinite
            ref_kw = {"temperature": self.text.temperature, "top_k": 0, "top_p": 1.0, "with_grad": False}
            if self.ref_reflector is not None:
                ref, _, _ = self.ref_reflector.completion_logprobs(prompts, images, comp, **ref_kw)
            else:
                ref, _, _ = self.reflector.completion_logprobs(prompts, images, comp, disable_adapter=True, **ref_kw)
        mask = mask & valid[:, None].to(mask.device)  # rewards and advantages live on the CPU
        loss, m = grpo_loss(logps, old, torch.nan_to_num(adv).to(logps.device), mask, ref_logps=ref, kl_logps=kl_logps,
                            epsilon_low=rc.epsilon_low,
                            epsilon_high=rc.epsilon_high, beta=rc.beta, loss_type=rc.loss_type,
                            max_completion_length=rc.max_new_tokens)
        # this rank's share of the rows (grpo, dr_grpo: their normalisers count rows) or, for dapo, of
        # the valid tokens on all ranks, so the ranks' mean loss and gradient are the one-process ones
        totals, tokens = [t.total for t in terms], [t.tokens for t in terms]
        share = 1.0 if None in totals else len(keep) * self.dist.world / sum(totals)
        loss_share = share
        if rc.loss_type == "dapo" and None not in tokens:
            loss_share = float(mask.sum()) * self.dist.world / max(1, sum(tokens))
        loss = loss * loss_share
        # completion_length weighted alike averages to the group's; mean_metrics weighs token means by it
        out = {"loss/grpo": loss.item(), "entropy": entropy.detach()[mask].mean().item() if mask.any() else math.nan,
               "completion_length": float(mask.sum(1).float().mean()) * share}
        out["clip_ratio"] = m.get("clip_ratio/region_mean", math.nan)
        if "kl" in m:
            out["kl/text"] = m["kl"]
        return loss, out

    def _image_loss(self, terms: list[ImageTerm]) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        """FlowGRPO loss over the image terms, also split by policy.

        With several processes a term is weighted by its whole group's size and the rank count,
        so the mean of the ranks' gradients is the one-process gradient; a rank without a valid
        sample still runs the forwards at weight 0, as ZeRO needs every rank in step.
        """
        fg = self.cfg.flow_grpo
        total = torch.zeros(())
        by_policy: dict[str, torch.Tensor] = {}
        kls, clips, losses = [], [], []
        for t in terms:
            live = bool(t.valid.any())
            if (not live and not self.dist.distributed) or t.rollout.traj.states.shape[1] == 0:
                continue
            pol, ro = t.policy, t.rollout
            idx = torch.nonzero(t.valid).flatten() if live else torch.zeros(1, dtype=torch.long)
            scale = len(idx) / max(1, t.size) * self.dist.world if live else 0.0
            name = "generator" if pol is self.generator else "refiner"
            traj = ro.traj.index(idx)
            ref_lat = ro.ref[idx] if ro.ref is not None else None
            cond = ro.cond.index(idx)
            k_steps = traj.states.shape[1]
            for k in range(k_steps):
                logp, mean, std = transition_logprob(pol.model, traj, k, cond, ref_lat, pol.settings.sde)
                ref_mean = None
                if fg.beta > 0 and pol.ref_transformer is not None:
                    with torch.no_grad(), _swap_transformer(pol.model, pol.ref_transformer):
                        _, ref_mean, _ = transition_logprob(pol.model, traj, k, cond, ref_lat, pol.settings.sde)
                loss, m = flow_grpo_loss(
                    logp, traj.logps[:, k], torch.nan_to_num(t.adv[idx]).to(logp.device), clip_range=fg.clip_range,
                    adv_clip_max=fg.adv_clip_max, prev_mean=mean if ref_mean is not None else None,
                    ref_prev_mean=ref_mean, std=std if ref_mean is not None else None,
                    beta=fg.beta if ref_mean is not None else 0.0, reduction=fg.logprob_reduction,
                    sigma=traj.sigmas[:, k].to(logp.device), sigma_next=traj.sigmas_next[:, k].to(logp.device),
                    sde_type=pol.settings.sde.sde_type,
                )
                part = loss * scale / k_steps
                total = total + part
                by_policy[name] = by_policy[name] + part if name in by_policy else part
                # several processes: a rank's metrics weighted like its gradient (stand-ins at 0), so the
                # ranks' mean is the one-process mean even for uneven shards (exact when all are scored)
                w = scale if self.dist.distributed else 1.0
                losses.append(loss.item() * w)
                clips.append(m["clip_ratio"] * w)
                if "kl" in m:
                    kls.append(m["kl"] * w)
        out = {"loss/flow_grpo": sum(losses) / len(losses) if losses else math.nan,
               "clip_ratio/image": sum(clips) / len(clips) if clips else math.nan}
        if kls:
            out["kl/image"] = sum(kls) / len(kls)
        n_terms = max(1, len(terms))
        return total / n_terms, out, {name: part / n_terms for name, part in by_policy.items()}


class _swap_transformer:
    """Temporarily run a FluxModel with another transformer (the frozen reference)."""

    def __init__(self, model: FluxModel, transformer: torch.nn.Module) -> None:
        self.model, self.other = model, transformer

    def __enter__(self):
        self.model.transformer, self.other = self.other, self.model.transformer

    def __exit__(self, *exc):
        self.model.transformer, self.other = self.other, self.model.transformer


@dataclass
class TextTerm:
    prompts: list[str]
    images: list
    reflections: list[Reflection]
    adv: torch.Tensor
    valid: torch.Tensor
    total: int | None = None  # rows of this term on all ranks (None: shards of equal size, weighted alike)
    tokens: int | None = None  # valid completion tokens of this term on all ranks (dapo's normaliser)
    pool: torch.Tensor | None = None  # the whole group's rewards `adv` was centred on ('batch' scaling)


@dataclass
class ImageTerm:
    policy: Policy
    rollout: DiffusionRollout
    adv: torch.Tensor
    valid: torch.Tensor
    total: int | None = None  # samples of this term on all ranks (None: these ones)
    pool: torch.Tensor | None = None  # the whole group's rewards `adv` was centred on ('batch' scaling)

    @classmethod
    def stand_in(cls, policy: Policy, rollout: DiffusionRollout, *, total: int,
                 pool: torch.Tensor | None = None) -> ImageTerm:
        """A rank without a sample of its own in this term: it runs the same forwards as the other
        ranks (ZeRO needs every rank in step) on one row at weight 0."""
        return cls(policy, rollout, torch.zeros(1), torch.zeros(1, dtype=torch.bool), total=total, pool=pool)

    @property
    def size(self) -> int:
        return len(self.valid) if self.total is None else self.total


@dataclass
class Batch:
    metrics: dict[str, float]
    text_terms: list[TextTerm] = field(default_factory=list)
    image_terms: list[ImageTerm] = field(default_factory=list)


def scale_by_batch_std(batches: list[Batch]) -> None:
    """`scale_rewards: batch`: divide every term's group-centred advantages by the std of all the
    step's groups' rewards, text and image apart (their rewards differ). Every rank pools the same
    whole groups (stand-in terms included), so every rank divides by the same number."""
    for terms in ([t for b in batches for t in b.text_terms], [t for b in batches for t in b.image_terms]):
        scaled = divide_by_batch_std([t.adv for t in terms], [t.pool for t in terms if t.pool is not None])
        for t, adv in zip(terms, scaled, strict=True):
            t.adv = adv


def _mean_rows(rows: list[dict]) -> dict:
    """Average the numeric metrics of gradient-accumulation micro-batches (NaN-aware)."""
    out: dict = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    return out


def _reward_metrics(total: torch.Tensor, s) -> dict[str, float]:
    out = {"reward/mean": nanmean(total), "reward/std": float(total[~torch.isnan(total)].std()) if (~torch.isnan(total)).sum() > 1 else 0.0,
           "judge/failures": int(torch.isnan(total).sum())}
    for name, vals in s.components.items():
        v = torch.tensor([math.nan if x is None else x for x in vals], dtype=torch.float32)
        out[f"reward/{name}"] = nanmean(v)
    for name, sec in s.latency_s.items():
        out[f"time/reward_{name}_s"] = sec
    return out


# --------------------------------------------------------------------------- building


def _diffusion_policy(cfg_section, path: Path, image_size: int, fg, *, max_index, device: torch.device) -> Policy:
    """Load on the CPU (a full-copy KL reference is made there), then place on `device`."""
    model = load_flow_model(path, family=cfg_section.family, image_size=image_size, dtype=cfg_section.dtype,
                            max_text_len=cfg_section.max_text_len,
                            guidance_scale=cfg_section.guidance_scale, true_cfg_scale=cfg_section.cfg_scale)
    for m in model.encoders:
        m.eval().requires_grad_(False)
    model.transformer.requires_grad_(cfg_section.train)
    lora = cfg_section.train and cfg_section.lora is not None
    if lora:
        add_lora(model.transformer, **cfg_section.lora.model_dump())
    if fg.sde_type == "cps":  # CPS has zero noise on the step that ends at sigma=0: never train it
        max_index = min(max_index or cfg_section.num_steps, cfg_section.num_steps - 1)
    settings = SamplerSettings(
        num_steps=cfg_section.num_steps,
        sde=SDEConfig(noise_level=cfg_section.noise_level, sde_type=fg.sde_type, logprob_reduction=fg.logprob_reduction),
        strategy=fg.timesteps, num_train_timesteps=fg.num_train_timesteps, window_size=fg.window_size,
        max_index=max_index,
    )
    policy = Policy(model, settings, cfg_section.train)
    if cfg_section.train:
        params = [p for p in model.transformer.parameters() if p.requires_grad]
        policy.opt = torch.optim.AdamW(params, **adamw_kwargs(cfg_section))
        if fg.beta > 0:
            policy.ref_transformer = BaseView(model.transformer) if lora else _frozen(model.transformer)
    place_flow_model(model, device, offload_frozen=cfg_section.offload)
    if policy.ref_transformer is not None and not lora:
        place_frozen(policy.ref_transformer, device, offload_it=cfg_section.offload)
    return policy


def _prompts(path: str | None, split: str, n: int | None, prompt_field: str = "prompt",
             tag_field: str = "tag") -> list[dict]:
    if path is not None:
        records = load_prompts(path, prompt_field, tag_field)
    else:
        from r3rl.shapes.prompts import split_prompts

        train, evals = split_prompts()
        records = train if split == "train" else evals
    return records[:n] if n else records


def _reflector(cfg: Config, world: Path | None, for_training: bool, device: torch.device):
    """The reflector, its frozen KL reference (full fine-tuning with beta > 0, copied on the CPU
    before the policy moves to `device`) and its optimiser."""
    rc = cfg.reflector
    reflector = HFReflector.from_pretrained(
        _model_path(rc.model, world, "reflector"), trust_remote_code=rc.trust_remote_code,
        lora=lora_kwargs(**rc.lora.model_dump()) if rc.lora else None,
        gradient_checkpointing=rc.gradient_checkpointing, dtype=rc.dtype,
    )
    if not (for_training and rc.train):
        reflector.model.requires_grad_(False).to(device)
        return reflector, None, None
    ref = reflector.frozen_copy() if rc.beta > 0 and rc.lora is None else None
    reflector.model.to(device)  # before the optimiser, whose state then lives on `device`
    if ref is not None:
        place_frozen(ref.model, device, offload_it=rc.offload)
    opt = torch.optim.AdamW(reflector.trainable_parameters(), **adamw_kwargs(rc))
    return reflector, ref, opt


POLICIES = ("reflector", "generator", "refiner")


def build_run(cfg: Config, *, eval_prompts: str | None = None, for_training: bool = True,
              topo: Topology | None = None) -> Run:
    """Load the policies (every rank loads the same weights) and, with `distributed.deepspeed`
    during training, give each trained policy its own DeepSpeed engine."""
    topo = topo or Topology()
    quiet_libraries()
    if cfg.refiner.mode != "edit" and cfg.rollout.credit == "tree":
        raise UserError(f"refiner.mode={cfg.refiner.mode!r} needs rollout.credit='r3'; tree credit refines in 'edit' mode only")
    if cfg.rollout.credit == "tree" and cfg.rollout.scale_rewards == "batch":
        raise UserError("rollout.scale_rewards=batch is not defined for tree credit (its advantages are relative "
                        "to siblings, not groups); use 'group' or 'none'")
    ds = cfg.distributed.deepspeed
    if for_training and cfg.trainer.ema is not None and ds and zero_stage(json.loads(Path(ds).read_text())) == 3:
        raise UserError("trainer.ema is not supported under ZeRO-3 (each rank holds only a shard of the weights to "
                        "average); use launch/deepspeed/zero2.json or trainer.ema=null")
    generator_only = cfg.rollout.credit == "flow_grpo"
    if generator_only and for_training and not cfg.generator.train:
        raise UserError("rollout.credit=flow_grpo trains the generator alone: set generator.train=true")
    if for_training:
        warn_low_precision_full_finetuning(cfg, ("generator",) if generator_only else POLICIES)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    names = (cfg.generator.model,) if generator_only else (cfg.reflector.model, cfg.generator.model, cfg.refiner.model)
    world = _shapes_world(cfg, topo) if SHAPES_MODEL in names else None
    device = resolve_device(cfg.device, topo.local_rank)
    reflector, ref_reflector, opt = (None, None, None) if generator_only else _reflector(cfg, world, for_training, device)
    fg = cfg.flow_grpo
    gen_cfg = cfg.generator.model_copy(update={"train": for_training and cfg.generator.train})
    size = cfg.world.image_size
    generator = _diffusion_policy(gen_cfg, _model_path(cfg.generator.model, world, "flux"), size, fg, max_index=None,
                                  device=device)
    refiner = None
    if not generator_only:
        ref_cfg = cfg.refiner.model_copy(update={"train": for_training and cfg.refiner.train})
        ref_path = refiner_folder(cfg.refiner, _model_path(cfg.refiner.model, world, "flux"), world, size, cfg.seed)
        refiner = _diffusion_policy(ref_cfg, ref_path, size, fg, max_index=fg.refine_max_index, device=device)
        refiner.model = wrap_refiner(refiner.model, cfg.refiner, ref_path)  # refiner.mode: edit | regenerate | region
    rc = cfg.reflector
    run = Run(
        cfg=cfg, reflector=reflector, ref_reflector=ref_reflector, reflector_opt=opt, generator=generator,
        refiner=refiner, reward=CombinedReward(cfg.rewards),
        train_prompts=_prompts(cfg.data.train_prompts, "train", None, cfg.data.prompt_field, cfg.data.tag_field),
        eval_prompts=_prompts(eval_prompts or cfg.data.eval_prompts, "eval", cfg.data.num_eval_prompts,
                              cfg.data.prompt_field, cfg.data.tag_field),
        text=TextSettings(rc.temperature, rc.top_k, rc.top_p, rc.max_new_tokens),
        rng=random.Random(cfg.seed), buffer=ImageBuffer(cfg.rollout.buffer_size), dist=topo,
    )
    if for_training and cfg.distributed.deepspeed:
        _attach_engines(run)
    if cfg.trainer.ema is not None:  # from the weights training starts at (a resume then loads its own)
        e = cfg.trainer.ema
        trained = [name for name, on in (("reflector", opt is not None), ("generator", generator.train),
                                         ("refiner", refiner is not None and refiner.train)) if on]
        run.ema = {name: EMA(run.trained_params(name), decay=e.decay, every=e.every) for name in trained}
    return run


def _shapes_world(cfg: Config, topo: Topology) -> Path:
    """The cached shapes world; rank 0 pretrains it while the others wait, then each node's
    first rank (a node-local cache) and then everyone else find it."""
    for turn in (topo.is_main, topo.local_rank == 0 and not topo.is_main, topo.local_rank != 0):
        if turn:
            root = ensure_world(cfg.world, cfg.seed).root
        barrier(topo)
    return root


def _attach_engines(run: Run) -> None:
    """One DeepSpeed engine per trained policy (each its own config copy, learning rate and AdamW
    settings); at ZeRO-3, transformers' flag makes `generate` step every rank until all are done."""
    cfg, tc = run.cfg, run.cfg.trainer
    configs = []
    policies = [("reflector", run.reflector and run.reflector.model, cfg.reflector, run.reflector_opt is not None)]
    policies += [(name, pol.model.transformer, section, pol.train)
                 for name, pol, section in (("generator", run.generator, cfg.generator),
                                            ("refiner", run.refiner, cfg.refiner)) if pol is not None]
    for name, module, section, trained in policies:
        if not trained:
            continue
        ds = deepspeed_config(cfg.distributed.deepspeed, adamw=adamw_kwargs(section), world=run.dist.world,
                              grad_accum=tc.grad_accum, max_grad_norm=tc.max_grad_norm)
        run.engines[name] = deepspeed_engine(module, ds)
        configs.append(ds)
    if run.reflector_opt is not None:
        run.reflector_opt = run.engines["reflector"].optimizer
    for name, pol in (("generator", run.generator), ("refiner", run.refiner)):
        if name in run.engines:
            pol.opt = run.engines[name].optimizer
    zero3 = [c for c in configs if zero_stage(c) == 3]
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        run.hf_zero3 = HfDeepSpeedConfig(zero3[0])


# --------------------------------------------------------------------------- loop


class _StopRequested:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _log_eval_images(logger: RunLogger, step: int, result: EvalResult, n: int = 8) -> None:
    for k, (ims, caps) in enumerate(zip(result.images, result.captions)):
        logger.log_images(step, f"eval/round{k}", ims[:n], caps[:n])


def train(cfg: Config) -> None:
    """`r3rl train`: pretrain (shapes world, cached), then RL with evaluation and checkpoints."""
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, torch.get_num_threads())))
    topo = topology_from_env()
    shard(cfg.rollout.group_size, topo)  # refuses a group the ranks cannot split, before any model loads
    if cfg.distributed.deepspeed and not topo.distributed:  # DeepSpeed wants a launcher's setup even for one
        for var, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(var, value)
    if init_process_group(topo, cfg.distributed.backend, cfg.distributed.timeout_s, force=bool(cfg.distributed.deepspeed)):
        try:
            _train(cfg, topo)
        finally:
            torch.distributed.destroy_process_group()
    else:
        _train(cfg, topo)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(cfg: Config, topo: Topology) -> None:
    run = build_run(cfg, topo=topo)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    resume = find_resume(cfg.resume, out)
    if resume is not None:
        start = load_checkpoint(run, resume)
    tc = cfg.trainer
    first_step = start + 1 if resume is not None else 0  # rows of completed steps survive a resume
    with RunLogger(out, total_steps=tc.max_steps, start_step=first_step, enabled=topo.is_main) as logger, \
            _StopRequested() as stop:
        logger.save_config(cfg)
        if resume is not None:
            logger.info(f"resumed from {resume} at step {start}")
        first = latest = None  # step 0's evaluation and the latest one
        if start == 0:
            first = latest = run.evaluate(0)
            logger.log(0, {"step": 0, **first.metrics})
            _log_eval_images(logger, 0, first)
            if topo.is_main:
                write_step_grids(first, out, 0)
        budget_s, trained_s = 60 * (tc.max_minutes or math.inf), 0.0
        step = start
        for step in range(start + 1, tc.max_steps + 1):
            row = run.train_step(step)
            trained_s += row["time/step_s"]  # the ranks' mean: every rank stops at the same step
            last = step == tc.max_steps or trained_s >= budget_s
            if tc.eval_every and (step % tc.eval_every == 0 or last):
                latest = run.evaluate(step)
                row.update(latest.metrics)
                if tc.log_images_every:
                    _log_eval_images(logger, step, latest)
                if first is not None and (warning := hacking_warning(first.metrics, latest.metrics, step)):
                    logger.info(warning)
            logger.log(step, row)
            failure_rate = row.get("judge/failures", 0) / max(1, row.get("judge/samples", cfg.rollout.group_size))
            stopping = any_rank(stop.flag, topo)  # every rank saves and stops at the same step
            if (tc.save_every and step % tc.save_every == 0) or last or stopping:
                path = save_checkpoint(run, out, step, keep_last=tc.keep_last)
                if stopping and not last:
                    logger.info(f"stopped by signal at step {step}; checkpoint {path}. "
                                f"Resume with: r3rl train <recipe> output_dir={out} resume=auto")
                    return
            if failure_rate > cfg.judge.max_failure_rate:
                path = save_checkpoint(run, out, step, keep_last=tc.keep_last)
                raise UserError(f"reward failures {failure_rate:.0%} exceed judge.max_failure_rate="
                                f"{cfg.judge.max_failure_rate} at step {step}; checkpoint saved to {path}")
            if last:
                break
        if topo.is_main:
            _report(logger, out, first, latest, step)


def _logged_row(path: Path, step: int) -> dict | None:
    """The row of `step` in a run's metrics.jsonl, if it is there."""
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("step") == step:
                return row
    return None


def _report(logger: RunLogger, out: Path, first: EvalResult | None, last: EvalResult | None, step: int) -> None:
    """The end of a run: grids of step 0 vs the end, the summary table, where everything is."""
    logger.info(f"finished {step} steps; checkpoints in {out / 'checkpoints'}")
    if last is not None and last is not first:
        grids = write_step_grids(last, out, step)
        logger.info(f"evaluation grids per round: {grids}")
    if first is not None and last is not None and last is not first:
        path = out / "grids" / "step0_vs_final.png"
        comparison_grid(first, last, step).save(path)
        logger.info(f"step 0 vs step {step}, every round: {path} (look at it before trusting a number)")
    step0 = first.metrics if first is not None else _logged_row(out / "metrics.jsonl", 0)  # resumed: from the log
    if step0 and last is not None and last is not first:
        for line in summary_lines(step0, last.metrics, step):
            logger.info(line)
    logger.info(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
