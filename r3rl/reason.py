"""R3's first R, Reason: a plan written before generating, trained by the generated image's reward.

With `rollout.reason`, a generate step first asks the reflector (the same VLM, a text-only turn)
for a plan per sample, `<think>plan</think>` as R3's `think_mode` writes it (sen-ye/R3,
`GEN_THINK_SYSTEM_PROMPT`), and the generator draws from `template.format(prompt=, plan=)`
(default `"{prompt}. {plan}"`). GRPO trains the plan's tokens with the image's reward, shaped as
R3's generate step shapes its text: `f·(r + w_fmt)`, f the plan's format reward; advantages are
group-relative over the group's samples. R3 trains one unified model (BAGEL) whose image tokens
read the plan in its context; with a separate generator the plan reaches it through its text
encoders, which truncate: FLUX reads T5 up to `generator.max_text_len` tokens (512 in the
pipelines) and CLIP's pooled vector from the first 77 tokens; SD3 reads CLIP-L and CLIP-G (77
tokens each) and T5 (`max_text_len`, 256 by default); Qwen-Image reads Qwen2.5-VL's hidden states
up to `max_text_len` (512) tokens. A plan past those limits is cut off for the generator while
its tokens are still trained, so recipes bound it with `rollout.reason_max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from r3rl.config import Config
from r3rl.models.reflector import THINK_CLOSE, THINK_OPEN, HFReflector, Reflection
from r3rl.rollout import TextSettings, nanmean

# R3's planning prompt (sen-ye/R3 train/rollout_controller.py GEN_THINK_SYSTEM_PROMPT), which R3
# puts before the prompt; a chat VLM gets both in one user turn
R3_PLAN_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. "
    "\nThe planning process is enclosed within <think> </think> tags, i.e. <think> planning "
    "process here </think> image here.\n{prompt}"
)
DEFAULT_TEMPLATE = "{prompt}. {plan}"

# (plan, prompt metadata) -> whether the plan's constraints hold, for worlds that can parse plans
PlanChecker = Callable[[str, dict], bool]


def plan_of_text(text: str) -> str:
    """The plan in a planning turn: what its think block holds (without the tags), else the
    whole text without any tag."""
    if THINK_OPEN in text and THINK_CLOSE in text.split(THINK_OPEN, 1)[1]:
        return text.split(THINK_OPEN, 1)[1].split(THINK_CLOSE, 1)[0].strip()
    return " ".join(re.sub(f"{re.escape(THINK_OPEN)}|{re.escape(THINK_CLOSE)}", " ", text).split())


def plan_format_ok(text: str) -> bool:
    """R3's planning shape: exactly one think block, at the start, not empty; nothing but the
    image (here: nothing) after it."""
    head = text.strip()
    return (
        head.startswith(THINK_OPEN)
        and head.endswith(THINK_CLOSE)
        and text.count(THINK_OPEN) == 1
        and text.count(THINK_CLOSE) == 1
        and bool(head[len(THINK_OPEN) : -len(THINK_CLOSE)].strip())
    )


@dataclass(frozen=True)
class Reasoner:
    """How plans are asked for and read: the user turn, the generator's text, the length cap, and
    (in a world that has one) the checker of a plan's constraints."""

    prompt: str  # the planning turn, with {prompt}
    template: str  # the generator's text, with {prompt} and {plan}
    max_new_tokens: int
    checker: PlanChecker | None = None

    def turns(self, prompts: list[str]) -> list[str]:
        return [self.prompt.format(prompt=p) for p in prompts]


def reasoner(cfg: Config) -> Reasoner | None:
    """The recipe's Reasoner (None when `rollout.reason` is off). The shapes world's reflector gets
    its own planning prompt and plan checker; any other model R3's planning prompt."""
    rc = cfg.rollout
    if not rc.reason:
        return None
    from r3rl.shapes.world import SHAPES_MODEL

    checker, prompt = None, R3_PLAN_PROMPT
    if cfg.reflector.model == SHAPES_MODEL:
        from r3rl.shapes.plan import SHAPES_PLAN_PROMPT, plan_satisfies

        prompt = SHAPES_PLAN_PROMPT
        if cfg.generator.model == SHAPES_MODEL:
            checker = plan_satisfies
    return Reasoner(
        rc.reason_prompt or prompt, rc.reason_template, rc.reason_max_new_tokens, checker
    )


@dataclass
class Plans:
    """One plan per sample (whole group, on every rank) and the texts the generator reads."""

    turns: list[str]  # (G,) the planning user turns (what GRPO re-scores the plans against)
    reflections: list[Reflection]  # (G,) the sampled plans: `instruction` = the plan text
    texts: list[str]  # (G,) the generator's conditioning texts

    @property
    def format(self) -> torch.Tensor:
        return torch.tensor([float(r.format_ok) for r in self.reflections])


def write_plans(
    planner: HFReflector, reason: Reasoner, metas: list[dict], text: TextSettings, *, seed: int
) -> Plans:
    """Sample a plan for each prompt (text-only turns, the same seed on every rank, so the plans do
    not depend on how the group is split) and the generator's text from each."""
    prompts = [m["prompt"] for m in metas]
    turns = reason.turns(prompts)
    raw = planner.reflect(
        turns,
        None,
        temperature=text.temperature,
        top_k=text.top_k,
        top_p=text.top_p,
        max_new_tokens=reason.max_new_tokens,
        seed=seed,
    )
    plans = [
        dataclasses.replace(r, instruction=plan_of_text(r.text), format_ok=plan_format_ok(r.text))
        for r in raw
    ]
    texts = [reason.template.format(prompt=p, plan=r.instruction) for p, r in zip(prompts, plans)]
    return Plans(turns, plans, texts)


def plan_metrics(reason: Reasoner, plans: Plans, metas: list[dict], prefix: str = "") -> dict:
    """`reason/plan_length` (tokens, end-of-turn included), `reason/format_mean` and, where the
    world checks plans, `reason/plan_satisfied`: the share of plans whose constraints hold."""
    out = {
        f"{prefix}reason/plan_length": float(
            sum(len(r.token_ids) for r in plans.reflections) / max(1, len(plans.reflections))
        ),
        f"{prefix}reason/format_mean": nanmean(plans.format),
    }
    if reason.checker is not None:
        ok = [reason.checker(r.instruction, m) for r, m in zip(plans.reflections, metas)]
        out[f"{prefix}reason/plan_satisfied"] = sum(ok) / max(1, len(ok))
    return out
