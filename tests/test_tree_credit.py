"""Tree credit's bookkeeping (issue 17 item 6), on one process with the models replaced by fakes:
every unscored sample counts in judge/failures, refinements are scored with their input images,
and reflections get R3's refine-step text reward (format reward, perfect-stop bonus), which with
K = G, M = 1 and one level equals `r3_refine_rewards`' advantages.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import r3rl.rollout as rollout_mod
import r3rl.tree as tree_mod
from r3rl.algos.advantages import group_advantages, r3_refine_rewards
from r3rl.config import RolloutConfig
from r3rl.distributed import Topology
from r3rl.models.reflector import Reflection
from r3rl.rollout import Scored, TextSettings


def _image(level: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (level, 0, 0))


class FakeReflector:
    """Reflections from a script: (instruction or None, format_ok) per call, in order."""

    def __init__(self, script: list[tuple[str | None, bool]]) -> None:
        self.script = list(script)

    def reflect(self, prompts, images, **kw):
        out = []
        for _ in prompts:
            ins, ok = self.script.pop(0)
            out.append(Reflection(f"<think>x</think> {ins or 'no further edit needed'}", [1, 2], [0.0, 0.0], ins, ok))
        return out


class FakeReward:
    """Scores an image by its red level / 100 (None above 250: a judge failure); top score 1."""

    has_text = False  # image rewards only

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def is_perfect(self, score):
        return score is not None and not math.isnan(score) and score >= 1.0 - 1e-6


def _fake_score(reward: FakeReward):
    def score(_, metas, images, texts=None, **extra):
        reward.calls.append({"n": len(images), **extra})
        vals = [math.nan if im.getpixel((0, 0))[0] > 250 else im.getpixel((0, 0))[0] / 100 for im in images]
        return Scored(torch.tensor(vals), {}, {}, {})
    return score


def _fake_diffusion(levels: list[int]):
    """run_diffusion whose images have the next red levels in `levels` (roots first, then edits)."""
    def run(model, texts, refs, settings, *, train, generator, keep=None):
        return SimpleNamespace(images=[_image(levels.pop(0)) for _ in texts], texts=list(texts))
    return run


def _grow(monkeypatch, script, levels, **cfg):
    reward = FakeReward()
    monkeypatch.setattr(tree_mod, "run_diffusion", _fake_diffusion(levels))
    monkeypatch.setattr(rollout_mod, "score", _fake_score(reward))  # what score_later calls
    policy = SimpleNamespace(model=None, settings=None, trainable=True)
    # model_copy: group_size 1 (R3's one buffer image) is below the recipe's minimum of 2
    rc = RolloutConfig(credit="tree", max_rounds=1).model_copy(update=cfg)
    text = TextSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8)
    t = tree_mod.grow_tree(FakeReflector(script), policy, policy, reward, {"prompt": "p"}, rc, text,
                           generator_rng=torch.Generator(), seed=0, topo=Topology())
    return t, reward


def test_every_unscored_sample_counts(monkeypatch) -> None:
    # 2 roots (0.5, 0.4), K=2 reflections each (all edit), M=2 refinements: 3 of 8 refinements fail
    levels = [50, 40, 60, 251, 70, 80, 251, 251, 30, 20]
    t, _ = _grow(monkeypatch, [("fix it", True)] * 4, levels, group_size=2, tree_k=2, tree_m=2)
    assert t.metrics["judge/failures"] == 3  # was 0: every root still had a scored leaf
    assert t.metrics["judge/samples"] == 2 + 8


def test_refinements_are_scored_with_their_inputs(monkeypatch) -> None:
    levels = [50, 40, 60, 70, 80, 90]
    _, reward = _grow(monkeypatch, [("fix it", True)] * 4, levels, group_size=2, tree_k=2, tree_m=1)
    roots_call, refine_call = reward.calls
    assert "input_images" not in roots_call
    inputs = [im.getpixel((0, 0))[0] for im in refine_call["input_images"]]
    assert inputs == [50, 50, 40, 40]  # each refinement's own input (root 0 twice, root 1 twice)
    assert len(refine_call["regions"]) == 4


@pytest.mark.parametrize("input_level", [60, 100])  # a flawed input, a perfect one
def test_k_eq_g_m1_one_level_is_r3s_refine_step(monkeypatch, input_level: int) -> None:
    """One root (G=1 here stands for R3's one buffer image), K=6 reflections: stops, edits, a bad
    format; the reflections' advantages equal R3's text advantages, the refinements' R3's image ones."""
    script = [(None, True), ("a", True), ("b", False), (None, False), ("c", True), (None, True)]
    new = [90, 40, 70]  # the three edits' results
    t, _ = _grow(monkeypatch, script, [input_level, *new], group_size=1, tree_k=6, tree_m=1,
                 format_weight=1.0, perfect_stop_bonus=1.0)
    r_in = input_level / 100
    new_r = torch.tensor([r_in, 0.9, 0.4, r_in, 0.7, r_in], dtype=torch.float64)
    stopped = torch.tensor([ins is None for ins, _ in script])
    fmt = torch.tensor([float(ok) for _, ok in script], dtype=torch.float64)
    text_r, image_r, mask = r3_refine_rewards(new_r, torch.tensor(r_in, dtype=torch.float64), stopped, fmt,
                                              input_perfect=r_in >= 1.0, format_weight=1.0, perfect_stop_bonus=1.0)
    want, _, _, _ = group_advantages(text_r, torch.zeros(6))
    refl_nodes = list(range(1, 7))
    assert torch.allclose(t.adv[refl_nodes].double(), want.float().double(), atol=1e-6)
    # refinements: R3's image advantages (improvement minus the mean over the whole group, stopped
    # samples' 0 included), on the edited samples only (R3's image_adv_mask)
    image_adv, _, _, _ = group_advantages(image_r, torch.zeros(6))
    assert torch.allclose(t.adv[[7, 8, 9]].double(), image_adv[mask].float().double(), atol=1e-6)
    assert t.metrics["reward/format_mean"] == pytest.approx(4 / 6)
