"""How a step's losses update the run's weights, the same for every credit scheme: each loss
backpropagated as it comes (through each trained policy's DeepSpeed engine, or plainly), then
the gradient average over ranks, clipping, the optimiser steps and the EMA. A NaN/inf loss on
any rank skips the step on all of them.

What the losses are is the trainer's (`r3rl.trainer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r3rl.distributed import any_rank, average_gradients, gather
from r3rl.run import Run
from r3rl.stopping import skip_nonfinite


@dataclass
class Loss:
    """The loss of one batch and what backpropagating it updates."""

    value: torch.Tensor  # () text_loss_weight * GRPO + image_loss_weight * FlowGRPO
    # policy name -> () its part of `value` (a DeepSpeed engine backpropagates each)
    parts: dict[str, torch.Tensor]
    optimizers: dict[str, tuple]  # policy name -> (optimiser, its trained parameters)
    metrics: dict[str, float]


class Update:
    """One optimiser step from a step's `trainer.grad_accum` losses, each backpropagated as it is
    added (so only one rollout is held); the step's metrics are their mean."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rows: list[dict] = []  # each loss's metrics with its batch's
        self.optimizers: dict[str, tuple] = {}  # policy name -> (optimiser, its parameters)
        self.finite = True

    def add(self, loss: Loss, metrics: dict[str, float]) -> None:
        """Backpropagate `loss` unless it is NaN/inf on some rank (the step is then skipped)."""
        run = self.run
        if any_rank(not torch.isfinite(loss.value), run.dist):
            self.finite = False
        elif run.engines:
            for name in loss.optimizers:  # one engine per policy; DeepSpeed divides by grad_accum
                run.engines[name].backward(loss.parts[name])
                run.engines[name].step()  # steps the optimiser at the accumulation boundary only
        elif loss.optimizers:
            (loss.value / run.cfg.trainer.grad_accum).backward()
        self.optimizers.update(loss.optimizers)
        self.rows.append({**loss.metrics, **metrics})

    def step(self) -> dict[str, float]:
        """The losses' mean metrics (NaN-aware) and the optimiser step's."""
        out: dict = {}
        for key in dict.fromkeys(k for r in self.rows for k in r):
            vals = [
                r[key]
                for r in self.rows
                if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])
            ]
            out[key] = sum(vals) / len(vals) if vals else math.nan
        out.update(self._optimizer_step())
        return out

    def _optimizer_step(self) -> dict[str, float]:
        """Clip and step every touched optimiser; a NaN/inf loss skips the step (K in a row stop
        the run).

        Several processes: gradients are averaged first (DDP's arithmetic), or DeepSpeed's
        engines (which already stepped at the accumulation boundary) report their norm.
        """
        run, opts = self.run, self.optimizers
        if run.dist.distributed and sorted(opts) != sorted(set(gather(sorted(opts), run.dist))):
            raise RuntimeError(
                f"rank {run.dist.rank} updated {sorted(opts)} but another rank updated others"
            )
        if not opts:
            return {}
        if skip_nonfinite(run, self.finite):
            for opt, _ in opts.values():
                opt.zero_grad(set_to_none=True)
            return {"train/skipped_nonfinite": 1}
        grad_norm = 0.0
        for name, (opt, params) in opts.items():
            if name in run.engines:
                grad_norm += float(run.engines[name].get_global_grad_norm() or 0.0)
                continue
            average_gradients(params, run.dist)
            max_norm = run.cfg.trainer.max_grad_norm
            grad_norm += float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
        for name, (_, params) in opts.items():  # after every optimiser step, DeepSpeed's included
            if name in run.ema:
                run.ema[name].update(params)
        return {"grad_norm": grad_norm}
