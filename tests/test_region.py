"""Region mode (RefineAnything): box syntax, crop window, soft mask and paste, checked by hand;
the wrapped refiner leaves every pixel outside the soft mask bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from r3rl.modes.region import box_mask, crop_window, format_box, paste, soft_mask, split_box


def test_box_syntax_round_trips_and_is_stripped_from_the_instruction() -> None:
    text = f"{format_box((0.1, 0.2, 0.5, 0.75))} make the red circle blue"
    assert split_box(text) == ("make the red circle blue", (0.1, 0.2, 0.5, 0.75))
    assert split_box("make it blue") == ("make it blue", None)
    # malformed boxes are no region, but never leak into the instruction
    assert split_box("<box>0.5 0.2 0.1 0.7</box> fix") == ("fix", None)  # x0 > x1
    assert split_box("<box>a b c d</box> fix") == ("fix", None)
    assert split_box("fix <box>0.1,0.1,0.4,0.4</box>") == ("fix", (0.1, 0.1, 0.4, 0.4))


def test_box_mask_covers_the_touched_pixels() -> None:
    m = box_mask((0.25, 0.25, 0.5, 0.75), 8, 8)
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:4] = True
    assert (m == expected).all()
    assert box_mask((0.0, 0.0, 0.01, 0.01), 8, 8).sum() == 1  # never empty


def test_crop_window_is_square_with_margin_and_stays_on_the_canvas() -> None:
    mask = np.zeros((16, 16), bool)
    mask[2:6, 2:4] = True  # 4 tall, 2 wide -> side 4 * (1 + 2 * 0.25) = 6, centred at (4, 3)
    assert crop_window(mask, 0.25) == (0, 1, 6, 7)
    corner = np.zeros((16, 16), bool)
    corner[12:16, 13:16] = True  # side 6 around (14, 14.5) would leave the canvas: shifted in
    assert crop_window(corner, 0.25) == (10, 10, 16, 16)
    assert crop_window(np.ones((8, 8), bool), 0.5) == (0, 0, 8, 8)


def test_soft_mask_is_the_dilated_mask_blurred_and_zero_outside_the_window() -> None:
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = True
    hard = soft_mask(mask, (0, 0, 7, 7), dilate_px=1, blur_sigma=0.0)
    plus = np.zeros((7, 7))
    plus[3, 2:5] = plus[2:5, 3] = 1.0  # scipy's default dilation is the 4-neighbour cross
    assert (hard == plus).all()
    soft = soft_mask(mask, (2, 2, 5, 5), dilate_px=1, blur_sigma=1.0)
    assert soft[3, 3] == soft.max() and 0 < soft[3, 3] < 1  # feathered
    outside = np.ones((7, 7), bool)
    outside[2:5, 2:5] = False
    assert (soft[outside] == 0).all()


def test_negative_dilation_keeps_the_feather_inside_the_region() -> None:
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    hard = soft_mask(mask, (0, 0, 9, 9), dilate_px=-1, blur_sigma=0.0)
    assert (hard == 0).sum() == 81 - 9 and (hard[3:6, 3:6] == 1).all()  # eroded to the inner 3x3
    soft = soft_mask(mask, (0, 0, 9, 9), dilate_px=-1, blur_sigma=0.5)  # radius int(2 * 0.5 + 0.5) = 1
    assert (soft[~mask] == 0).all() and soft[4, 4] == pytest.approx(1.0) and 0 < soft[2, 4] < soft[3, 4] < 1
    edge = np.zeros((9, 9), bool)
    edge[:, :4] = True  # a region touching the canvas edge is not eroded there
    assert soft_mask(edge, (0, 0, 9, 9), dilate_px=-1, blur_sigma=0.0)[:, :3].all()


def test_paste_blends_by_alpha_and_copies_where_alpha_is_zero() -> None:
    base = np.full((4, 4, 3), 100, np.uint8)
    refined = Image.fromarray(np.full((2, 2, 3), 200, np.uint8))
    alpha = np.zeros((4, 4))
    alpha[1, 1], alpha[1, 2] = 1.0, 0.5
    out = np.asarray(paste(Image.fromarray(base), refined, (1, 1, 3, 3), alpha))
    assert (out[1, 1] == 200).all() and (out[1, 2] == 150).all()  # 0.5 * 200 + 0.5 * 100
    untouched = alpha == 0
    assert (out[untouched] == base[untouched]).all()


@pytest.fixture(scope="module", params=["flux_kontext", "qwen_image_edit"])
def tiny_refiner(request, tokenizer, one_thread):
    from r3rl.models.tiny import build_tiny_qwen_image_edit
    from r3rl.shapes.tiny_diffusion import build_tiny_flux

    build = {"flux_kontext": build_tiny_flux, "qwen_image_edit": build_tiny_qwen_image_edit}[request.param]
    model = build(tokenizer, 32, seed=0)
    for m in model.encoders:  # frozen, as the trainer loads them (no dropout)
        m.eval().requires_grad_(False)
    return model


def test_region_refiner_leaves_pixels_outside_the_soft_mask_bit_identical(tiny_refiner) -> None:
    from r3rl.models.base import encode_condition
    from r3rl.modes.region import crop
    from r3rl.modes.region_refiner import RegionRefiner, RegionSettings
    from r3rl.rollout import SamplerSettings, run_diffusion
    from r3rl.sampling import SDEConfig

    refiner = RegionRefiner(tiny_refiner, RegionSettings(box=(0.25, 0.25, 0.5, 0.5)))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    metas = [{"prompt": "a red circle"}, {"prompt": "a red circle", "region": [0.5, 0.5, 0.9, 0.8]},
             {"prompt": "a red circle"}]
    texts = [refiner.compose(m, i) for m, i in zip(metas, ["make it blue", "make it blue",
                                                          "<box>0.0 0.6 0.3 1.0</box> make it blue"])]
    boxes = [(0.25, 0.25, 0.5, 0.5), (0.5, 0.5, 0.9, 0.8), (0.0, 0.6, 0.3, 1.0)]  # recipe, record, reflection
    assert [split_box(t)[1] for t in texts] == boxes
    settings = SamplerSettings(num_steps=2, sde=SDEConfig())
    out = run_diffusion(refiner, texts, images, settings, train=True, generator=torch.Generator().manual_seed(0))
    # the wrapped refiner is conditioned on the focused crops as if they were the whole image: their
    # latents are the reference and (Qwen-Image-Edit) its text encoder reads them, box stripped
    crops = [crop(im, refiner.plan(im, box)[0], 32) for im, box in zip(images, boxes)]
    with torch.no_grad():
        cond, ref = encode_condition(tiny_refiner, [split_box(t)[0] for t in texts], crops)
    assert torch.allclose(out.ref, ref) and torch.allclose(out.cond.embeds, cond.embeds)
    for before, after, box in zip(images, out.images, boxes):
        _, alpha = refiner.plan(before, box)
        a, b = np.asarray(before), np.asarray(after)
        assert (a[alpha == 0] == b[alpha == 0]).all()
        assert (a[alpha > 0.99] != b[alpha > 0.99]).any()  # ... and the region itself was refined
        assert (alpha > 0).sum() < 0.6 * alpha.size


def test_a_reflection_may_name_its_region_and_the_old_format_still_parses() -> None:
    from r3rl.models.reflector import parse_reflection

    assert parse_reflection("<think>see 2 circle</think> <box>0.1 0.2 0.5 0.6</box> remove the red circle") == (
        "<box>0.1 0.2 0.5 0.6</box> remove the red circle", True)
    assert parse_reflection("<think>ok</think> <box>0.1 0.2 0.5 0.6</box> no further edit needed") == (None, True)
    assert parse_reflection("<think>ok</think> <box>0.1 0.2 0.5 0.6</box>") == (None, True)
    assert parse_reflection("<think>want red</think> make the blue circle red") == ("make the blue circle red", True)
    assert parse_reflection("no tags") == (None, False)
