"""An exponential moving average (EMA) of a policy's trained weights, which evaluation uses.

flow_grpo (`train.ema`; `EMAModuleWrapper` in its flow_grpo/ema.py, decay 0.9 every 8 steps in
scripts/train_sd3.py) keeps a shadow copy of the trainable weights, blends the live weights into
it every few optimiser steps with a decay that warms up, and evaluates and saves the shadow: an
average of the last ~every/(1-decay) steps is less noisy than the last step's weights. This is
that arithmetic on plain tensors; the trainer swaps it in for evaluation and checkpoints it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from r3rl.errors import UserError


def decay_at(decay: float, step: int) -> float:
    """The decay of the blend after optimiser step `step` (1, 2, ...): flow_grpo's warm-up
    min(decay, (1 + step) / (10 + step)), so the first blends weigh the live weights more and
    the average does not sit near the initial weights for its first ~1/(1-decay) updates."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """float32 shadow copies of a fixed list of parameters (their order is the contract).

    float32 whatever the weights' dtype: blending a 10% step into bfloat16 would round most of it
    away. `steps` counts the policy's optimiser steps, so a resumed run blends at the same steps.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, decay: float, every: int) -> None:
        self.decay, self.every, self.steps = decay, every, 0
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor]) -> None:
        """Count one optimiser step; on every `every`-th: shadow += (1 - d) * (param - shadow)."""
        self.steps += 1
        if self.steps % self.every:
            return
        weight = 1.0 - decay_at(self.decay, self.steps)
        for s, p in zip(self.shadow, params, strict=True):
            s.lerp_(p.detach().float(), weight)

    @contextmanager
    def applied(self, params: Sequence[torch.Tensor]) -> Iterator[None]:
        """Inside, `params` hold the average (cast to their dtype); after, their live values bit for
        bit. The live values wait in host memory, so the device holds no second copy."""
        live = [
            p.detach().to("cpu", copy=True) for p in params
        ]  # copy=True: a CPU tensor's .cpu() is itself
        with torch.no_grad():
            for s, p in zip(self.shadow, params, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(live, params, strict=True):
                    p.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], what: str) -> None:
        """Restore a saved average; `what` names it in the error when it belongs to other
        weights."""
        shapes = [tuple(t.shape) for t in state["shadow"]]
        if shapes != [tuple(s.shape) for s in self.shadow]:
            raise UserError(
                f"{what}: the saved EMA has {len(shapes)} tensors that do not match the "
                f"{len(self.shadow)} trained parameters (another LoRA or model?)"
            )
        self.steps = int(state["steps"])
        for s, v in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(v)
