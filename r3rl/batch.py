"""What a rollout hands the loss: its loss terms (this rank's rows of a group, with their
advantages and the counts that weight its share) and its metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from r3rl.algos.advantages import divide_by_batch_std, group_advantages, r3_generate_rewards
from r3rl.distributed import Shard
from r3rl.models.reflector import Reflection
from r3rl.reason import Plans
from r3rl.rollout import DiffusionRollout
from r3rl.run import Policy


@dataclass
class TextForwards:
    """GRPO's forwards of a text term's rows `keep` (those with tokens), made before the
    rewards are known (`r3rl.losses.text_forwards`): each (K, T) but `ref`, the frozen
    reference's log-probs (None without KL)."""

    keep: list[int]
    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor
    kl_logps: torch.Tensor
    ref: torch.Tensor | None


@dataclass
class ImageForwards:
    """FlowGRPO's forwards of every row of an image term's rollout, made before the rewards are
    known (`r3rl.losses.image_forwards`): per trained step, the policy's (log-prob, mean, std)
    with grad and the frozen reference's mean (None without KL), each batch-first."""

    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]

    def rows(self, idx: torch.Tensor) -> ImageForwards:
        """The forwards of rows `idx` (the valid ones, once the rewards are known)."""
        return ImageForwards([tuple(None if x is None else x[idx] for x in s) for s in self.steps])


@dataclass
class TextTerm:
    """Reflections of one rollout that this rank trains, with their advantages (R rows)."""

    prompts: list[str]  # (R,) the target prompts; a plan term: its planning turns
    # (R,) the image each reflection read; None: a plan term (rollout.reason: text-only turns,
    # trained apart as `loss/grpo_reason`)
    images: list[Image.Image] | None
    reflections: list[Reflection]  # (R,) with their tokens and behaviour log-probs
    adv: torch.Tensor  # (R,) float
    valid: torch.Tensor  # (R,) bool: the reward could be computed
    total: int | None = None  # rows of this term on all ranks (None: equal shards, weighted alike)
    tokens: int | None = None  # valid completion tokens of this term on all ranks (dapo)
    pool: torch.Tensor | None = None  # (G,) the group's rewards `adv` was centred on ('batch')
    forwards: TextForwards | None = None  # made while the judge scored (None: by the loss)


@dataclass
class ImageTerm:
    """Samples of one diffusion rollout that this rank trains, with their advantages (R rows)."""

    policy: Policy
    rollout: DiffusionRollout  # its trajectory holds the R rows (and maybe a stand-in)
    adv: torch.Tensor  # (R,) float
    valid: torch.Tensor  # (R,) bool
    total: int | None = None  # samples of this term on all ranks (None: these ones)
    pool: torch.Tensor | None = None  # (G,) the group's rewards `adv` was centred on ('batch')
    forwards: ImageForwards | None = None  # every rollout row's, made while the judge scored

    @classmethod
    def stand_in(
        cls,
        policy: Policy,
        rollout: DiffusionRollout,
        *,
        total: int,
        pool: torch.Tensor | None = None,
        forwards: ImageForwards | None = None,
    ) -> ImageTerm:
        """A rank without a sample of its own in this term: it runs the same forwards as the other
        ranks (ZeRO needs every rank in step) on one row at weight 0."""
        zero = torch.zeros(1)
        invalid = torch.zeros(1, dtype=torch.bool)
        return cls(policy, rollout, zero, invalid, total=total, pool=pool, forwards=forwards)

    @property
    def size(self) -> int:
        return len(self.valid) if self.total is None else self.total


@dataclass
class Batch:
    """One rollout: its loss terms and its metrics (rewards, stop rate, ...)."""

    metrics: dict[str, float]
    text_terms: list[TextTerm] = field(default_factory=list)
    image_terms: list[ImageTerm] = field(default_factory=list)


def scale_by_batch_std(batches: list[Batch]) -> None:
    """`scale_rewards: batch`: divide every term's group-centred advantages by the std of all the
    step's groups' rewards, text and image apart (their rewards differ). Every rank pools the same
    whole groups (stand-in terms included), so every rank divides by the same number."""
    text = [t for b in batches for t in b.text_terms]
    image = [t for b in batches for t in b.image_terms]
    for terms in (text, image):
        pools = [t.pool for t in terms if t.pool is not None]
        scaled = divide_by_batch_std([t.adv for t in terms], pools)
        for t, adv in zip(terms, scaled, strict=True):
            t.adv = adv


def plan_term(
    plans: Plans,
    image_rewards: torch.Tensor,
    group: Shard,
    *,
    format_weight: float,
    scale_std: bool,
) -> TextTerm:
    """`rollout.reason`: the GRPO term of a group's plans (this rank's rows). A plan's reward is
    R3's generate-step text reward `f·(r + format_weight)` with r its image's reward (a tree's
    root value) and f its format reward; advantages are relative to the group's."""
    text_r, _ = r3_generate_rewards(image_rewards, plans.format, format_weight)
    adv, valid, _, _ = group_advantages(text_r, torch.zeros(len(text_r)), scale_std=scale_std)
    tokens = sum(len(r.token_ids) for r, v in zip(plans.reflections, valid.tolist()) if v)
    turns, refl, adv, valid = (group.take(x) for x in (plans.turns, plans.reflections, adv, valid))
    return TextTerm(turns, None, refl, adv, valid, tokens=tokens, pool=text_r)
