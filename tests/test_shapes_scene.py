"""Shapes world scenes: renderer, sampler, instruction edits and edit pairs."""

import random

import numpy as np
import pytest

from r3rl.shapes.scene import (
    CELLS,
    COLORS,
    GAP,
    JITTER,
    PALETTE,
    SHAPES,
    SIZE_RANGE,
    Obj,
    apply_instruction,
    make_edit_pair,
    relations,
    render,
    sample_scene,
    satisfies,
)

BG = (245, 245, 240)
RED_CIRCLE = Obj("circle", "red", 0.25, 0.5, 0.3)
BLUE_SQUARE = Obj("square", "blue", 0.75, 0.5, 0.3)
GREEN_TRIANGLE = Obj("triangle", "green", 0.5, 0.15, 0.22)

POSITION = {
    "tag": "position",
    "include": [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ],
    "prompt": "a photo of a circle left of a square",
}
COUNTING = {
    "tag": "counting",
    "include": [{"class": "triangle", "count": 3}],
    "exclude": [{"class": "triangle", "count": 4}],
    "prompt": "a photo of three triangles",
}
COLOR_ATTR = {
    "tag": "color_attr",
    "include": [
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "square", "count": 1, "color": "blue"},
    ],
    "prompt": "a photo of a red circle and a blue square",
}
METAS = [
    {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "prompt": "a photo of a circle",
    },
    {
        "tag": "two_object",
        "include": [{"class": "circle", "count": 1}, {"class": "triangle", "count": 1}],
        "prompt": "a photo of a circle and a triangle",
    },
    COUNTING,
    {
        "tag": "colors",
        "include": [{"class": "square", "count": 1, "color": "orange"}],
        "prompt": "a photo of an orange square",
    },
    POSITION,
    COLOR_ATTR,
]


def _pixels(img):
    return np.asarray(img).astype(int)


# ---------------------------------------------------------------- render


def test_render_gives_rgb_image_of_requested_size():
    img = render([RED_CIRCLE], 48)
    assert img.mode == "RGB" and img.size == (48, 48)


def test_render_fills_object_centres_with_palette_colours_on_background():
    # 32 px canvas: the red circle's centre is pixel (16, 8), the blue square's (16, 24);
    # 0.3 of the canvas is ~10 px across, so the centre pixel lies well inside each.
    px = _pixels(render([RED_CIRCLE, BLUE_SQUARE], 32))
    assert tuple(px[16, 8]) == PALETTE["red"]
    assert tuple(px[16, 24]) == PALETTE["blue"]
    assert tuple(px[0, 0]) == BG and tuple(px[31, 16]) == BG


def test_render_without_antialias_uses_only_palette_and_background():
    px = _pixels(render([RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE], 32, antialias=False))
    colours = {tuple(c) for c in px.reshape(-1, 3)}
    assert colours == {BG, PALETTE["red"], PALETTE["blue"], PALETTE["green"]}


def test_render_is_deterministic():
    assert np.array_equal(
        _pixels(render([RED_CIRCLE, BLUE_SQUARE])), _pixels(render([RED_CIRCLE, BLUE_SQUARE]))
    )


@pytest.mark.parametrize("size", [32, 64])
def test_unchanged_object_renders_bit_identically_whatever_else_changes(size):
    alone = _pixels(render([RED_CIRCLE], size))
    own = (alone != np.array(BG)).any(-1)  # every pixel the red circle touches
    for other in (
        BLUE_SQUARE,
        Obj("triangle", "yellow", 0.75, 0.6, 0.34),
        Obj("circle", "purple", 0.7, 0.3, 0.22),
    ):
        together = _pixels(render([RED_CIRCLE, other], size))
        assert np.array_equal(together[own], alone[own])


def test_render_draws_triangle_apex_up():
    # 64 px, size 0.5: box rows 16..48; the top row of the box is narrower than the bottom row.
    px = _pixels(render([Obj("triangle", "green", 0.5, 0.5, 0.5)], 64))
    painted = (px != np.array(BG)).any(-1)
    assert painted[20].sum() < painted[44].sum()


# ---------------------------------------------------------------- relations / satisfies


def test_relations_follow_geneval_threshold():
    # offset x -0.5, sizes 0.3+0.3 -> shrink 0.06; offset y 0 -> dx = -0.44/0.5 = -0.88
    assert relations(RED_CIRCLE, BLUE_SQUARE) == {"left of"}
    assert relations(BLUE_SQUARE, RED_CIRCLE) == {"right of"}
    # offset (-0.25, -0.35), shrink 0.052 -> (-0.198, -0.298) / 0.430 = (-0.46, -0.69): above only
    assert relations(GREEN_TRIANGLE, BLUE_SQUARE) == {"above"}
    # offset (0.05, 0.3), shrink 0.06: x revised 0, y 0.24/0.304 = 0.79: below only
    assert relations(Obj("circle", "red", 0.55, 0.8, 0.3), Obj("square", "red", 0.5, 0.5, 0.3)) == {
        "below"
    }
    # offsets within the shrink: no relation
    assert (
        relations(Obj("circle", "red", 0.52, 0.5, 0.3), Obj("square", "red", 0.5, 0.5, 0.3))
        == set()
    )


def test_satisfies_applies_counts_colours_positions_and_excludes():
    assert satisfies([RED_CIRCLE, BLUE_SQUARE], POSITION)
    assert not satisfies(
        [Obj("circle", "red", 0.75, 0.5, 0.3), Obj("square", "blue", 0.25, 0.5, 0.3)], POSITION
    )
    assert satisfies([RED_CIRCLE, BLUE_SQUARE], COLOR_ATTR)
    assert not satisfies(
        [Obj("circle", "blue", 0.25, 0.5, 0.3), Obj("square", "red", 0.75, 0.5, 0.3)], COLOR_ATTR
    )
    tri = [Obj("triangle", "red", 0.2 + 0.3 * k, 0.5, 0.22) for k in range(4)]
    assert satisfies(tri[:3], COUNTING)
    assert not satisfies(tri[:2], COUNTING)
    assert not satisfies(tri, COUNTING)
    bare = {
        k: v for k, v in COUNTING.items() if k != "exclude"
    }  # counting without exclude is still exact
    assert not satisfies(tri, bare)


# ---------------------------------------------------------------- sample_scene


def _separated(objs):
    """Every pair of boxes is at least GAP apart along some axis, and inside the canvas."""
    for i, a in enumerate(objs):
        assert (
            0 < a.x - a.size / 2
            and a.x + a.size / 2 < 1
            and 0 < a.y - a.size / 2
            and a.y + a.size / 2 < 1
        )
        for b in objs[i + 1 :]:
            reach = (a.size + b.size) / 2 + GAP - 1e-9
            assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


@pytest.mark.parametrize("meta", METAS, ids=[m["tag"] for m in METAS])
def test_sample_scene_draws_exactly_the_asked_objects_apart_and_large(meta):
    rng = random.Random(0)
    wanted = sorted(
        (r["class"], r.get("color")) for r in meta["include"] for _ in range(r["count"])
    )
    for _ in range(20):
        objs = sample_scene(meta, rng)
        got = sorted(
            (
                o.shape,
                o.color
                if any("color" in r for r in meta["include"] if r["class"] == o.shape)
                else None,
            )
            for o in objs
        )
        assert got == wanted
        assert all(0.22 <= o.size <= 0.34 and o.color in COLORS for o in objs)
        _separated(objs)


def test_sample_scene_puts_subject_on_the_asked_side():
    rng = random.Random(1)
    for _ in range(30):
        square, circle = sample_scene(POSITION, rng)
        assert circle.x < square.x


def test_sample_scene_is_deterministic_per_seed():
    assert sample_scene(COUNTING, random.Random(5)) == sample_scene(COUNTING, random.Random(5))


def test_sample_scene_varies_free_colours():
    rng = random.Random(2)
    colours = {o.color for _ in range(20) for o in sample_scene(COUNTING, rng)}
    assert len(colours) == len(COLORS)


# ---------------------------------------------------------------- apply_instruction


SCENE = [RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE]


def test_add_appends_one_new_object_and_keeps_the_rest():
    out = apply_instruction([RED_CIRCLE], "add a yellow triangle", random.Random(0))
    assert out[0] == RED_CIRCLE and len(out) == 2
    assert (out[1].shape, out[1].color) == ("triangle", "yellow")
    _separated(out)


def test_remove_drops_the_named_object():
    assert apply_instruction(SCENE, "remove the blue square", random.Random(0)) == [
        RED_CIRCLE,
        GREEN_TRIANGLE,
    ]


def test_make_recolours_or_reshapes_in_place():
    recoloured = apply_instruction(SCENE, "make the red circle purple", random.Random(0))
    assert recoloured == [Obj("circle", "purple", 0.25, 0.5, 0.3), BLUE_SQUARE, GREEN_TRIANGLE]
    reshaped = apply_instruction(SCENE, "make the blue square a triangle", random.Random(0))
    assert reshaped == [RED_CIRCLE, Obj("triangle", "blue", 0.75, 0.5, 0.3), GREEN_TRIANGLE]


def test_move_goes_to_the_cell_of_the_named_half_keeping_the_other_coordinate():
    out = apply_instruction([BLUE_SQUARE], "move the blue square to the left", random.Random(0))
    # two cells per side: the left half's cell centre is 0.25; y stays 0.5 (it fits there)
    assert out[0].x == pytest.approx(0.25) and out[0].y == 0.5 and out[0].size == 0.3
    down = apply_instruction([RED_CIRCLE], "move the red circle to the bottom", random.Random(0))
    assert down[0].y == pytest.approx(0.75) and down[0].x == 0.25


def test_move_goes_around_other_objects():
    circle, square = Obj("circle", "red", 0.25, 0.75, 0.3), Obj("square", "blue", 0.25, 0.25, 0.3)
    out = apply_instruction([circle, square], "move the red circle to the top", random.Random(0))
    # the square holds the top-left cell: the circle takes the top-right one
    assert out[1] == square
    assert (out[0].x, out[0].y) == (pytest.approx(0.75), pytest.approx(0.25))
    _separated(out)


def test_sampled_objects_sit_in_distinct_cells_jittered_and_sized():
    rng = random.Random(0)
    for meta in METAS:
        for _ in range(20):
            objs = sample_scene(meta, rng)
            cells = {(round(o.x * CELLS - 0.5), round(o.y * CELLS - 0.5)) for o in objs}
            assert len(cells) == len(objs)
            for o in objs:
                for v in (o.x, o.y):
                    assert abs(v - (round(v * CELLS - 0.5) + 0.5) / CELLS) <= JITTER + 1e-9
                assert SIZE_RANGE[0] <= o.size <= SIZE_RANGE[1]


def test_stop_verdict_returns_the_scene_unchanged():
    assert apply_instruction(SCENE, "no further edit needed", random.Random(0)) == SCENE


@pytest.mark.parametrize(
    "instruction",
    [
        "paint the red circle blue",
        "add a pink circle",
        "add a red hexagon",
        "remove the green circle",  # no such object
        "make the red circle red",  # no change
        "make the red circle a circle",
        "move the red circle to the middle",
        "make the red circle",
        "",
    ],
)
def test_unknown_or_inapplicable_instruction_raises(instruction):
    with pytest.raises(ValueError):
        apply_instruction(SCENE, instruction, random.Random(0))


def test_add_without_room_raises():
    full = [Obj("square", "red", 0.2 + 0.3 * (k % 3), 0.2 + 0.3 * (k // 3), 0.22) for k in range(9)]
    with pytest.raises(ValueError):
        apply_instruction(full, "add a blue circle", random.Random(0))


# ---------------------------------------------------------------- make_edit_pair


def _one_edit(flawed, instruction, fixed):
    """The pair differs by exactly the edit the instruction names; all else is identical."""
    verb = instruction.split()[0]
    if verb == "add":
        assert fixed[:-1] == flawed
    elif verb == "remove":
        assert len(fixed) == len(flawed) - 1 and all(o in flawed for o in fixed)
    else:
        assert len(fixed) == len(flawed)
        changed = [i for i, (a, b) in enumerate(zip(flawed, fixed)) if a != b]
        assert len(changed) == 1
        a, b = flawed[changed[0]], fixed[changed[0]]
        if verb == "move":
            assert (a.shape, a.color, a.size) == (b.shape, b.color, b.size)
        else:
            assert (a.x, a.y, a.size) == (b.x, b.y, b.size)


@pytest.mark.parametrize("meta", METAS, ids=[m["tag"] for m in METAS])
def test_edit_pair_breaks_one_requirement_and_instruction_fixes_it(meta):
    rng = random.Random(3)
    verbs = set()
    for _ in range(30):
        flawed, instruction, fixed = make_edit_pair(meta, rng)
        assert not satisfies(flawed, meta) and satisfies(fixed, meta)
        _one_edit(flawed, instruction, fixed)
        verbs.add(instruction.split()[0])
        shape = instruction.split()[3]
        assert shape in SHAPES
    expected = {"position": {"move", "make"}, "counting": {"add", "remove", "make"}}
    assert verbs == expected.get(meta["tag"], {"add", "make"})


def test_edit_pair_fix_is_apply_instruction_of_flawed():
    rng = random.Random(4)
    for meta in METAS:
        for _ in range(10):
            flawed, instruction, fixed = make_edit_pair(meta, rng)
            if not instruction.startswith("add"):  # only add draws from the rng
                assert apply_instruction(flawed, instruction, random.Random(0)) == fixed


def test_edit_pair_is_deterministic_per_seed():
    assert make_edit_pair(POSITION, random.Random(9)) == make_edit_pair(POSITION, random.Random(9))
