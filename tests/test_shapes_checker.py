"""shapes_geneval checker on hand-drawn images, its GenEval rules, and checker critiques.

Images here are drawn with PIL directly (not r3rl's renderer): other colours, other
anti-aliasing (LANCZOS downsampling), rotations, blur and noise.
"""

import math
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from r3rl.shapes.critique import corpus, critique, reflection_text
from r3rl.shapes.prompts import all_prompts
from r3rl.shapes.scene import apply_instruction, make_edit_pair, render, sample_scene
from rewards.shapes_geneval import Detection, ShapesGenEval, check, detect, relative_position

PURE = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
}
SOFT = {
    "red": (230, 40, 40),
    "green": (90, 190, 100),
    "blue": (70, 120, 230),
    "yellow": (240, 215, 70),
    "purple": (160, 90, 210),
    "orange": (250, 150, 60),
}
WHITE = (255, 255, 255)
SS = 4  # drawn at 4x, then LANCZOS-downsampled: anti-aliasing unlike the renderer's box filter


def draw_scene(items, size=64, palette=SOFT, background=WHITE, blur=0.0, noise=0.0, seed=0):
    """items: (shape, colour, cx, cy, extent, angle_deg) in canvas fractions; extent is
    the box side of a square/triangle and the diameter of a circle."""
    big = Image.new("RGB", (size * SS, size * SS), background)
    d = ImageDraw.Draw(big)
    for shape, color, cx, cy, extent, angle in items:
        x, y, r = cx * size * SS, cy * size * SS, extent * size * SS / 2
        if shape == "circle":
            d.ellipse((x - r, y - r, x + r, y + r), fill=palette[color])
            continue
        corners = (
            [(-r, -r), (r, -r), (r, r), (-r, r)]
            if shape == "square"
            else [(0, -r), (r, r), (-r, r)]
        )
        a = math.radians(angle)
        d.polygon(
            [
                (x + u * math.cos(a) - v * math.sin(a), y + u * math.sin(a) + v * math.cos(a))
                for u, v in corners
            ],
            fill=palette[color],
        )
    img = big.resize((size, size), Image.LANCZOS)
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        arr = np.asarray(img).astype(float) + np.random.default_rng(seed).normal(
            0, noise, (size, size, 3)
        )
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img


def found(detections):
    return sorted((d.shape, d.color) for d in detections)


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("palette", [PURE, SOFT], ids=["pure", "soft"])
@pytest.mark.parametrize(
    "degrade",
    [{}, {"blur": 1.0}, {"noise": 8.0}, {"blur": 1.0, "noise": 8.0}],
    ids=["clean", "blur", "noise", "blur+noise"],
)
def test_detect_finds_every_shape_in_every_colour(size, palette, degrade):
    for colors in (("red", "green", "blue"), ("yellow", "purple", "orange")):
        items = [
            ("circle", colors[0], 0.25, 0.3, 0.3, 0),
            ("square", colors[1], 0.72, 0.3, 0.26, 0),
            ("triangle", colors[2], 0.5, 0.75, 0.34, 0),
        ]
        dets = detect(draw_scene(items, size, palette, **degrade))
        assert found(dets) == sorted((s, c) for s, c, *_ in items)
        by_shape = {d.shape: d for d in dets}
        for shape, _, cx, cy, extent, _ in items:
            assert by_shape[shape].cx == pytest.approx(cx, abs=0.03)
            assert by_shape[shape].cy == pytest.approx(cy, abs=0.03)
            assert by_shape[shape].w == pytest.approx(extent, abs=0.05)


def test_detect_classifies_rotated_and_resized_shapes():
    items = [
        ("square", "blue", 0.25, 0.25, 0.28, 45),  # a diamond is still a square
        ("square", "red", 0.75, 0.25, 0.3, 20),
        ("triangle", "green", 0.25, 0.75, 0.3, 180),  # apex down
        ("triangle", "orange", 0.75, 0.75, 0.34, 70),
        ("circle", "purple", 0.5, 0.5, 0.12, 0),  # small
    ]
    assert found(detect(draw_scene(items, 128, blur=0.8))) == sorted((s, c) for s, c, *_ in items)


def test_detect_handles_a_large_canvas_and_a_tinted_background():
    items = [("circle", "red", 0.3, 0.5, 0.4, 0), ("triangle", "blue", 0.75, 0.5, 0.3, 0)]
    img = draw_scene(items, 256, background=(235, 232, 220), blur=2.0, noise=6.0)
    assert found(detect(img)) == [("circle", "red"), ("triangle", "blue")]


def test_detect_ignores_specks_grey_marks_and_background():
    img = Image.new("RGB", (64, 64), WHITE)
    d = ImageDraw.Draw(img)
    d.point([(5, 5), (6, 5), (40, 50)], fill=(255, 0, 0))  # three stray red pixels
    d.line([(10, 30), (50, 30)], fill=(40, 40, 40), width=2)  # dark grey stroke
    d.ellipse((20, 5, 40, 25), fill=(200, 200, 200))  # grey disc
    assert detect(img) == []


def test_detect_accepts_uint8_and_float_arrays_in_hwc_and_chw():
    img = draw_scene([("circle", "green", 0.5, 0.5, 0.4, 0)], 48)
    want = detect(img)
    arr = np.asarray(img)
    assert found(want) == [("circle", "green")]
    assert detect(arr) == want
    assert detect(arr.astype(np.float32) / 255) == want
    assert detect(arr.transpose(2, 0, 1).astype(np.float32) / 255) == want


def test_touching_objects_of_different_colours_are_split():
    items = [
        ("square", "red", 0.35, 0.5, 0.3, 0),
        ("square", "blue", 0.65, 0.5, 0.3, 0),
    ]  # share an edge
    assert found(detect(draw_scene(items, 64))) == [("square", "blue"), ("square", "red")]


# ---------------------------------------------------------------- GenEval rules


def det(shape, color, cx, cy, w=0.2, h=0.2):
    return Detection(shape, color, cx, cy, w * h, w, h)


def test_relative_position_matches_geneval_threshold_rule():
    b = det("square", "red", 0.5, 0.5)
    # offset (-0.1, 0), shrink 0.1 * (0.2 + 0.2) = 0.04 -> dx = -0.06 / 0.1 = -0.6
    assert relative_position(det("circle", "red", 0.4, 0.5), b) == {"left of"}
    # offset (-0.05, -0.3): x revised -0.01, y -0.26; / 0.304 -> (-0.03, -0.86)
    assert relative_position(det("circle", "red", 0.45, 0.2), b) == {"above"}
    # offset (0.3, 0.3): both revised 0.26 / 0.424 = 0.61 -> diagonal holds both
    assert relative_position(det("circle", "red", 0.8, 0.8), b) == {"right of", "below"}
    # offset (0.03, 0) is inside the shrink: no relation at all
    assert relative_position(det("circle", "red", 0.53, 0.5), b) == set()


COUNT3 = {
    "tag": "counting",
    "include": [{"class": "circle", "count": 3}],
    "exclude": [{"class": "circle", "count": 4}],
    "prompt": "a photo of three circles",
}
RED_CIRCLE = {
    "tag": "colors",
    "include": [{"class": "circle", "count": 1, "color": "red"}],
    "prompt": "a photo of a red circle",
}
LEFT_OF = {
    "tag": "position",
    "include": [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ],
    "prompt": "a photo of a circle left of a square",
}
TWO = {
    "tag": "two_object",
    "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
    "prompt": "a photo of a circle and a square",
}
ATTR = {
    "tag": "color_attr",
    "include": [
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "square", "count": 1, "color": "blue"},
    ],
    "prompt": "a photo of a red circle and a blue square",
}


def circles(n, color="blue"):
    xs = [0.2, 0.5, 0.8, 0.2, 0.5]
    ys = [0.3, 0.3, 0.3, 0.75, 0.75]
    return [("circle", color, xs[k], ys[k], 0.22, 0) for k in range(n)]


CASES = [
    # (name, meta, items, exact score, partial credit computed by hand)
    ("count exact", COUNT3, circles(3), 1.0, 1.0),
    ("count too few", COUNT3, circles(2), 0.0, 1 / 2),  # include fails, exclude holds
    ("count too many", COUNT3, circles(4), 0.0, 1 / 2),  # include holds, exclude fails
    ("count other class", COUNT3, circles(2) + [("square", "blue", 0.8, 0.3, 0.22, 0)], 0.0, 1 / 2),
    ("colour right", RED_CIRCLE, [("circle", "red", 0.5, 0.5, 0.4, 0)], 1.0, 1.0),
    (
        "colour wrong",
        RED_CIRCLE,
        [("circle", "blue", 0.5, 0.5, 0.4, 0)],
        0.0,
        1 / 2,
    ),  # count ok, colour not
    (
        "colour on wrong class",
        RED_CIRCLE,
        [("square", "red", 0.5, 0.5, 0.4, 0)],
        0.0,
        0.0,
    ),  # colour unchecked
    (
        "side right",
        LEFT_OF,
        [("circle", "green", 0.25, 0.5, 0.3, 0), ("square", "orange", 0.75, 0.55, 0.3, 0)],
        1.0,
        1.0,
    ),
    # square count, circle count hold; position fails -> 2 of 3
    (
        "side wrong",
        LEFT_OF,
        [("circle", "green", 0.75, 0.5, 0.3, 0), ("square", "orange", 0.25, 0.55, 0.3, 0)],
        0.0,
        2 / 3,
    ),
    (
        "side vertical",
        LEFT_OF,
        [("circle", "green", 0.5, 0.2, 0.3, 0), ("square", "orange", 0.5, 0.75, 0.3, 0)],
        0.0,
        2 / 3,
    ),
    # target missing: square count fails, position has no target -> 1 of 3
    ("side no target", LEFT_OF, [("circle", "green", 0.25, 0.5, 0.3, 0)], 0.0, 1 / 3),
    (
        "two right",
        TWO,
        [("circle", "purple", 0.25, 0.5, 0.3, 0), ("square", "yellow", 0.75, 0.5, 0.3, 0)],
        1.0,
        1.0,
    ),
    (
        "two wrong class",
        TWO,
        [("circle", "purple", 0.25, 0.5, 0.3, 0), ("triangle", "yellow", 0.75, 0.5, 0.3, 0)],
        0.0,
        1 / 2,
    ),
    (
        "attr right",
        ATTR,
        [("circle", "red", 0.25, 0.5, 0.3, 0), ("square", "blue", 0.75, 0.5, 0.3, 0)],
        1.0,
        1.0,
    ),
    # colours swapped: both counts hold, both colours fail -> 2 of 4
    (
        "attr swapped",
        ATTR,
        [("circle", "blue", 0.25, 0.5, 0.3, 0), ("square", "red", 0.75, 0.5, 0.3, 0)],
        0.0,
        2 / 4,
    ),
    # an extra red circle beside a blue one satisfies the red-circle clause
    (
        "attr extra",
        ATTR,
        [
            ("circle", "blue", 0.2, 0.3, 0.25, 0),
            ("circle", "red", 0.75, 0.3, 0.25, 0),
            ("square", "blue", 0.5, 0.75, 0.25, 0),
        ],
        1.0,
        1.0,
    ),
]


@pytest.mark.parametrize("name,meta,items,exact,partial", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(
    "size,degrade",
    [(64, {}), (64, {"blur": 1.0, "noise": 6.0}), (128, {"blur": 1.5})],
    ids=["64", "64-blur-noise", "128-blur"],
)
def test_reward_scores_hand_drawn_scenes(name, meta, items, exact, partial, size, degrade):
    img = draw_scene(items, size, **degrade)
    assert ShapesGenEval()([meta["prompt"]], [img], [meta]) == [exact]
    assert ShapesGenEval(partial_credit=True)([meta["prompt"]], [img], [meta]) == [
        pytest.approx(partial)
    ]


def test_check_reports_geneval_style_reasons():
    img = draw_scene(circles(2), 64)
    assert check(COUNT3, detect(img)) == (0.5, ["expected circle>=3, found 2"])
    img = draw_scene(circles(4), 64)
    assert check(COUNT3, detect(img)) == (0.5, ["expected circle<4, found 4"])


def test_counting_record_without_exclude_still_needs_the_exact_count():
    bare = {k: v for k, v in COUNT3.items() if k != "exclude"}
    assert check(bare, detect(draw_scene(circles(4), 64)))[0] == 0.5


def test_reward_masks_samples_without_metadata():
    img = draw_scene(circles(1), 64)
    reward = ShapesGenEval()
    assert reward(["x", "y"], [img, img], [None, {"prompt": "y"}]) == [None, None]
    assert reward(["x"], [img]) == [None]


# ---------------------------------------------------------------- renderer round trip


@pytest.mark.parametrize("size", [32, 64])
def test_every_record_rendered_from_a_sampled_scene_scores_one(size):
    rng = random.Random(size)
    for meta in all_prompts():
        score, reasons = check(meta, detect(render(sample_scene(meta, rng), size)))
        assert score == 1.0, (meta["prompt"], reasons)


def _pairs(n_per_tag, seed):
    rng = random.Random(seed)
    by_tag = {}
    for meta in all_prompts():
        by_tag.setdefault(meta["tag"], []).append(meta)
    for metas in by_tag.values():
        for _ in range(n_per_tag):
            meta = rng.choice(metas)
            yield meta, *make_edit_pair(meta, rng)


@pytest.mark.parametrize("size", [32, 64])
def test_edit_pairs_flawed_fails_and_fixed_passes_through_the_checker(size):
    for meta, flawed, instruction, fixed in _pairs(12, seed=size):
        assert check(meta, detect(render(flawed, size)))[0] < 1.0, (meta["prompt"], instruction)
        assert check(meta, detect(render(fixed, size)))[0] == 1.0, (meta["prompt"], instruction)


# ---------------------------------------------------------------- critiques


def test_critique_of_hand_drawn_failures():
    assert critique(COUNT3, detect(draw_scene(circles(2), 64))) == (
        "want 3 circle , see 2 circle",
        "add a red circle",
    )
    assert critique(COUNT3, detect(draw_scene(circles(4), 64)))[0] == "want 3 circle , see 4 circle"
    blue = detect(draw_scene([("circle", "blue", 0.5, 0.5, 0.4, 0)], 64))
    assert critique(RED_CIRCLE, blue) == (
        "want 1 red circle , see 1 blue circle",
        "make the blue circle red",
    )
    wrong_class = detect(
        draw_scene(
            [("circle", "purple", 0.25, 0.5, 0.3, 0), ("triangle", "yellow", 0.75, 0.5, 0.3, 0)], 64
        )
    )
    assert critique(TWO, wrong_class) == (
        "want 1 square , see 0 square",
        "make the yellow triangle a square",
    )
    # circle right of a square that sits in the right half: moving the circle left works
    side = detect(
        draw_scene(
            [("circle", "green", 0.85, 0.3, 0.22, 0), ("square", "orange", 0.55, 0.3, 0.22, 0)], 64
        )
    )
    assert critique(LEFT_OF, side) == (
        "want circle left of square , see circle right of square",
        "move the green circle to the left",
    )


def test_critique_of_a_correct_image_stops():
    ok = detect(
        draw_scene(
            [("circle", "red", 0.25, 0.5, 0.3, 0), ("square", "blue", 0.75, 0.5, 0.3, 0)], 64
        )
    )
    analysis, instruction = critique(ATTR, ok)
    assert (analysis, instruction) == ("see 1 red circle and 1 blue square , done", None)
    assert (
        reflection_text(analysis, instruction)
        == "<think>see 1 red circle and 1 blue square , done</think> no further edit needed"
    )
    assert reflection_text("want 1 square , see 0 square", "add a red square") == (
        "<think>want 1 square , see 0 square</think> add a red square"
    )


def test_critique_instruction_fixes_edit_pairs():
    fixed_by_critique = total = 0
    vocabulary = {w for text in corpus() for w in text.split()}
    for meta, flawed, _, fixed in _pairs(8, seed=7):
        analysis, instruction = critique(meta, detect(render(flawed, 32)))
        assert instruction is not None and len(analysis.split()) <= 15
        assert set(analysis.split()) | set(instruction.split()) <= vocabulary
        after = apply_instruction(flawed, instruction, random.Random(0))
        fixed_by_critique += check(meta, detect(render(after, 32)))[0] == 1.0
        total += 1
        assert critique(meta, detect(render(fixed, 32)))[1] is None
    assert fixed_by_critique / total >= 0.95  # measured: 48 of 48


def test_corpus_holds_every_word_of_prompts_and_instructions():
    words = {w for text in corpus() for w in text.split()}
    prompt_words = {w for r in all_prompts() for w in r["prompt"].split()}
    assert prompt_words <= words
    assert {"no", "further", "edit", "needed", "add", "remove", "make", "move", "many"} <= words
    assert any(text.startswith("<think>") and "</think> " in text for text in corpus())
