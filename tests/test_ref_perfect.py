"""A perfect image is one whose combined image score is the highest it can be (issue 17, item 9).

R3 (sen-ye/R3 `train/online_rl.py`, its image buffer) files an image as perfect when `reward == 1`: one
reward in [0, 1]. r3rl's combined reward is a weighted sum, so its top is the weighted sum of each
reward's top (`score_range`, default (0, 1)), not 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from r3rl.config import RewardSpec
from r3rl.rewards import CombinedReward


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "r.py"
    f.write_text(
        "def unit(prompts, images, metadata, **kw):\n    return [1.0] * len(prompts)\n"
        "def stars(prompts, images, metadata, **kw):\n    return [5.0] * len(prompts)\n"
        "stars.score_range = (1.0, 5.0)\n"
        "class Judge:\n    score_range = (-1.0, 1.0)\n"
        "    def __call__(self, prompts, images, metadata, **kw):\n        return [0.0] * len(prompts)\n"
        "def fmt(completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    return f


def test_one_unit_reward_is_r3s_reward_equals_1(tmp_path):
    r = CombinedReward([RewardSpec(name=f"{_file(tmp_path)}:unit")])
    for score in (0.0, 0.5, 0.999, 1.0):
        assert r.is_perfect(score) == (score == 1)  # R3's test, for the single [0, 1] reward it has
    assert r.is_perfect(1.0 - 1e-9) and not r.is_perfect(None) and not r.is_perfect(float("nan"))


def test_the_top_follows_weights_and_declared_ranges(tmp_path):
    f = _file(tmp_path)
    r = CombinedReward([RewardSpec(name=f"{f}:unit", weight=2.0), RewardSpec(name=f"{f}:stars", weight=0.5),
                        RewardSpec(name=f"{f}:Judge", weight=-1.0), RewardSpec(name=f"{f}:fmt", weight=3.0)])
    # 2 x 1 + 0.5 x 5 + (-1) x (-1); the text reward never enters an image score
    assert r.max_total == pytest.approx(5.5)
    assert r.is_perfect(5.5) and not r.is_perfect(1.0) and not r.is_perfect(4.5)
    total = r(["p"], [None], [{"prompt": "p"}]).total[0]
    assert total == pytest.approx(4.5) and not r.is_perfect(total)
