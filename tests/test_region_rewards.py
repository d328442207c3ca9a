"""Rewards `background_preservation` and `region_fidelity`, and the masked metrics behind them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from r3rl.modes.metrics import background_scores, masked_mse, masked_ssim
from r3rl.rewards import load_reward

BOX = (0.0, 0.0, 0.5, 1.0)  # the left half of an 8-px-wide canvas: columns 0..3


def _images() -> tuple[Image.Image, Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    before = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    inside = before.copy()
    inside[:, :4] = 255 - inside[:, :4]  # changed only inside the region
    outside = before.copy()
    outside[:, 6:] = 0  # changed in the background
    return Image.fromarray(before), Image.fromarray(inside), Image.fromarray(outside)


def test_masked_mse_by_hand() -> None:
    a = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    b = Image.fromarray(np.array([[[255] * 3, [0] * 3], [[0] * 3, [0] * 3]], np.uint8))
    assert masked_mse(a, b, np.array([[True, True], [False, False]])) == pytest.approx(0.5)  # (1 + 0) / 2
    assert masked_mse(a, b, np.array([[False, True], [True, True]])) == 0.0
    assert np.isnan(masked_mse(a, b, np.zeros((2, 2), bool)))


def test_ssim_of_an_untouched_area_is_one_even_beside_a_changed_one() -> None:
    before, inside, _ = _images()
    background = np.zeros((8, 8), bool)
    background[:, 4:] = True
    assert masked_ssim(before, inside, background) == 1.0  # the region's change does not leak through windows
    assert masked_ssim(before, inside, ~background) < 0.5
    assert background_scores([before, before], [inside, inside], [BOX, None]) == [(0.0, 1.0)]


def test_background_preservation_scores_drift_outside_the_region_only() -> None:
    before, inside, outside = _images()
    fn = load_reward("background_preservation")
    ssim = fn(["p"] * 3, [inside, outside, outside], [{}] * 3, input_images=[before] * 3, regions=[BOX, BOX, None])
    assert ssim[0] == 1.0 and ssim[1] < 0.9 and ssim[2] == 1.0  # no region: nothing to preserve
    mse = load_reward("background_preservation", metric="mse")(["p"], [outside], [{}], input_images=[before],
                                                               regions=[BOX])
    expected = 1.0 - ((np.asarray(before, float)[:, 6:] / 255.0) ** 2).sum() / (8 * 4 * 3)  # 16 of 64 px zeroed
    assert mse[0] == pytest.approx(expected)
    assert fn(["p"], [outside], [{}]) == [1.0]  # a first generation has no input to disturb


def test_region_fidelity_compares_the_region_to_the_reference(tmp_path) -> None:
    before, inside, outside = _images()
    ref = tmp_path / "ref.png"
    inside.save(ref)
    fn = load_reward("region_fidelity")
    meta = {"reference": str(ref), "region": list(BOX)}
    scores = fn(["p"] * 3, [inside, outside, before], [meta, meta, {}])
    assert scores[0] == 1.0 and scores[1] < 0.5 and scores[2] is None  # no reference: cannot score
