"""Shapes world: scenes of coloured shapes, their renderer and the closed edit vocabulary.

A scene is a list of `Obj` in canvas fractions, so one scene renders at any resolution.
Objects sit in the cells of a CELLS x CELLS grid (jittered), one per cell: at 32 px a cell is
2 x 2 tokens of the tiny generator, so a cell's content is one of a few crisp prototypes that a
small model learns in minutes (placed anywhere, it drew blobs: bench/RESULTS.md). Objects never
overlap and keep a gap between them, which makes each object's pixels a function of that object
alone: an edit that leaves an object untouched leaves its pixels bit-identical, and the refiner
can learn "copy everything but the edit".
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from rewards.shapes_geneval import Detection, relative_position

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
RELATIONS = ("left of", "right of", "above", "below")
SIDES = ("left", "right", "top", "bottom")
STOP = "no further edit needed"

PALETTE = {
    "red": (220, 50, 47),
    "green": (60, 160, 70),
    "blue": (40, 90, 210),
    "yellow": (235, 205, 35),
    "purple": (140, 70, 180),
    "orange": (240, 130, 30),
}
SIZE_RANGE = (0.28, 0.34)  # 9-11 px at 32 px: classifiable, and a cell keeps a gap around it
CELLS = 2  # cells per side: up to four objects, and every relation is a column or a row apart
JITTER = 0.02  # of an object's centre around its cell's
MARGIN = 0.03  # object box to canvas edge
GAP = 0.07  # between object boxes: >= 2 px at 32 px, so supersampled pixels never mix
SUPERSAMPLE = 4
POSITION_THRESHOLD = 0.1  # GenEval's default
SIDE_OF = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}
OPPOSITE_SIDE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@dataclass(frozen=True)
class Obj:
    """One shape: centre (x, y) and size (box side) as fractions of the canvas width."""

    shape: str
    color: str
    x: float
    y: float
    size: float


# ---------------------------------------------------------------- rendering


def render(
    objs: Sequence[Obj],
    size: int = 32,
    *,
    antialias: bool = True,
    background: tuple[int, int, int] = (245, 245, 240),
) -> Image.Image:
    """Draw the scene as an RGB image `size` x `size`.

    Anti-aliasing draws at 4x and box-averages 4x4 blocks; the average is local, so
    each object's pixels depend on that object only.
    """
    scale = SUPERSAMPLE if antialias else 1
    canvas = Image.new("RGB", (size * scale, size * scale), background)
    draw = ImageDraw.Draw(canvas)
    for obj in objs:
        _draw_obj(draw, obj, size * scale)
    return canvas.reduce(scale) if scale > 1 else canvas


def _draw_obj(draw: ImageDraw.ImageDraw, obj: Obj, width: int) -> None:
    """Every shape fills the same square box: circle inscribed, triangle apex-up."""
    cx, cy, half = obj.x * width, obj.y * width, obj.size * width / 2
    fill = PALETTE[obj.color]
    box = (cx - half, cy - half, cx + half, cy + half)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


# ---------------------------------------------------------------- geometry


def _fits(obj: Obj, others: Sequence[Obj]) -> bool:
    """Inside the canvas margin and at least GAP away from every other box."""
    half = obj.size / 2
    if min(obj.x, obj.y) - half < MARGIN or max(obj.x, obj.y) + half > 1 - MARGIN:
        return False
    for other in others:
        reach = (obj.size + other.size) / 2 + GAP
        if abs(obj.x - other.x) < reach and abs(obj.y - other.y) < reach:
            return False
    return True


def relations(a: Obj, b: Obj, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Position of `a` relative to `b` by the checker's own GenEval rule on box centres and
    sizes, so scenes sampled against it agree with what the checker will detect."""
    box = lambda o: Detection(o.shape, o.color, o.x, o.y, o.size**2, o.size, o.size)
    return relative_position(box(a), box(b), threshold)


def satisfies(objs: Sequence[Obj], meta: dict, threshold: float = POSITION_THRESHOLD) -> bool:
    """Whether the scene meets GenEval metadata, judged on exact geometry.

    Same rules as the checker: each include needs `count` objects of its class (those of
    the wanted colour first, then the largest), all of the wanted colour, each in the
    wanted relation to every object matched by the include it refers to; an exclude
    fails at `count` objects. A counting record without exclude means exactly `count`.
    """
    matched: list[list[Obj]] = []
    for req in meta.get("include", []):
        pool = [o for o in objs if o.shape == req["class"]]
        pool.sort(key=lambda o: (o.color != req.get("color"), -o.size))
        found = pool[: req.get("count", 1)]
        if len(found) < req.get("count", 1):
            return False
        if "color" in req and any(o.color != req["color"] for o in found):
            return False
        if "position" in req:
            rel, target = req["position"]
            if any(rel not in relations(o, t, threshold) for o in found for t in matched[target]):
                return False
        matched.append(found)
    return all(sum(o.shape == req["class"] for o in objs) < req["count"] for req in _excludes(meta))


def _excludes(meta: dict) -> list[dict]:
    """GenEval writes exclude = count + 1 for counting; supply it when a file leaves it out."""
    if "exclude" in meta or meta.get("tag") != "counting":
        return list(meta.get("exclude", []))
    return [{"class": r["class"], "count": r["count"] + 1} for r in meta["include"]]


# ---------------------------------------------------------------- sampling


def _cell_centres() -> list[float]:
    return [(k + 0.5) / CELLS for k in range(CELLS)]


def _random_obj(shape: str, color: str, rng: random.Random) -> Obj:
    """In a random cell, its centre jittered by up to JITTER."""
    x, y = (rng.choice(_cell_centres()) + rng.uniform(-JITTER, JITTER) for _ in range(2))
    return Obj(shape, color, x, y, rng.uniform(*SIZE_RANGE))


def _place(
    wanted: Sequence[tuple[str, str]], others: Sequence[Obj], rng: random.Random, tries: int = 400
) -> list[Obj] | None:
    """Random placement of (shape, colour) pairs in cells free of `others`."""
    for _ in range(tries):
        placed: list[Obj] = []
        for shape, color in wanted:
            obj = _random_obj(shape, color, rng)
            if not _fits(obj, [*others, *placed]):
                break
            placed.append(obj)
        else:
            return placed
    return None


def sample_scene(meta: dict, rng: random.Random) -> list[Obj]:
    """A random scene meeting GenEval metadata `meta`, with only the objects it asks for.

    Objects without a required colour get a random one. Position scenes are drawn until
    the relation holds with twice GenEval's threshold, a margin that survives detection.
    """
    wanted = [
        (req["class"], req.get("color") or rng.choice(COLORS))
        for req in meta["include"]
        for _ in range(req.get("count", 1))
    ]
    for _ in range(200):
        objs = _place(wanted, [], rng)
        if objs is not None and satisfies(objs, meta, threshold=2 * POSITION_THRESHOLD):
            return objs
    raise RuntimeError(f"could not lay out a scene for {meta.get('prompt', meta)!r}")


# ---------------------------------------------------------------- instructions


def _find(objs: Sequence[Obj], color: str, shape: str) -> int:
    """Index of the first object named by colour and shape (list order breaks ties)."""
    for i, obj in enumerate(objs):
        if (obj.color, obj.shape) == (color, shape):
            return i
    raise ValueError(f"no {color} {shape} in the scene")


def _check_words(color: str, shape: str) -> None:
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown object {color!r} {shape!r}")


def _move(objs: Sequence[Obj], i: int, side: str) -> Obj:
    """Move object i to a free cell centre of the named half, keeping its other coordinate
    when it fits there, so that a relation to that side becomes true."""
    obj, others = objs[i], [o for j, o in enumerate(objs) if j != i]
    centres = _cell_centres()
    toward = [c for c in centres if (c < 0.5 if side in ("left", "top") else c > 0.5)]
    if side in ("right", "bottom"):
        toward.reverse()
    keep = obj.y if side in ("left", "right") else obj.x
    across = [keep, *sorted(centres, key=lambda v: abs(v - keep))]
    for a in across:
        for t in toward:
            x, y = (t, a) if side in ("left", "right") else (a, t)
            moved = dataclasses.replace(obj, x=x, y=y)
            if _fits(moved, others):
                return moved
    raise ValueError(f"no free place on the {side} for the {obj.color} {obj.shape}")


def apply_instruction(objs: Sequence[Obj], instruction: str, rng: random.Random) -> list[Obj]:
    """Apply one instruction of the closed vocabulary; every other object stays identical.

    `add a {c} {s}` | `remove the {c} {s}` | `make the {c} {s} {c2}` |
    `make the {c} {s} a {s2}` | `move the {c} {s} to the {left|right|top|bottom}`;
    `no further edit needed` returns the scene unchanged. Only `add` uses `rng` (where to
    put the new object). Raises ValueError for anything else or an edit that cannot apply.
    """
    objs = list(objs)
    words = instruction.split(" ")
    if instruction == STOP:
        return objs
    if len(words) == 4 and words[:2] == ["add", "a"]:
        _check_words(words[2], words[3])
        placed = _place([(words[3], words[2])], objs, rng)
        if placed is None:
            raise ValueError(f"no free space to {instruction!r}")
        return [*objs, *placed]
    if len(words) < 4 or words[1] != "the":
        raise ValueError(f"unknown instruction {instruction!r}")
    verb, color, shape, rest = words[0], words[2], words[3], words[4:]
    _check_words(color, shape)
    i = _find(objs, color, shape)
    if verb == "remove" and not rest:
        return objs[:i] + objs[i + 1 :]
    if verb == "make" and len(rest) == 1 and rest[0] in COLORS and rest[0] != color:
        objs[i] = dataclasses.replace(objs[i], color=rest[0])
        return objs
    if (
        verb == "make"
        and len(rest) == 2
        and rest[0] == "a"
        and rest[1] in SHAPES
        and rest[1] != shape
    ):
        objs[i] = dataclasses.replace(objs[i], shape=rest[1])
        return objs
    if verb == "move" and len(rest) == 3 and rest[:2] == ["to", "the"] and rest[2] in SIDES:
        objs[i] = _move(objs, i, rest[2])
        return objs
    raise ValueError(f"unknown or inapplicable instruction {instruction!r}")


# ---------------------------------------------------------------- edit pairs


def _required(meta: dict, scene: Sequence[Obj]) -> list[int]:
    """Indices of scene objects that the metadata asks for (all of them, by construction)."""
    classes = {req["class"] for req in meta["include"]}
    return [i for i, o in enumerate(scene) if o.shape in classes]


def _unused_shape(
    meta: dict, scene: Sequence[Obj], keep_color: str, rng: random.Random
) -> str | None:
    """A shape outside the metadata that no object of `keep_color` has, so the flawed
    object stays uniquely nameable; any other free shape when all three are used."""
    classes = {req["class"] for req in meta["include"]}
    taken = {o.shape for o in scene if o.color == keep_color}
    free = [s for s in SHAPES if s not in classes and s not in taken]
    free = free or [s for s in SHAPES if s not in taken]
    return rng.choice(free) if free else None


def _flaw_missing(meta: dict, scene: list[Obj], rng: random.Random) -> tuple[list[Obj], str] | None:
    i = rng.choice(_required(meta, scene))
    return scene[:i] + scene[i + 1 :], f"add a {scene[i].color} {scene[i].shape}"


def _flaw_extra(meta: dict, scene: list[Obj], rng: random.Random) -> tuple[list[Obj], str] | None:
    shape = meta["include"][0]["class"]
    free = [c for c in COLORS if all((o.color, o.shape) != (c, shape) for o in scene)]
    placed = _place([(shape, rng.choice(free))], scene, rng) if free else None
    if placed is None:
        return None
    return [*scene, *placed], f"remove the {placed[0].color} {shape}"


def _flaw_shape(meta: dict, scene: list[Obj], rng: random.Random) -> tuple[list[Obj], str] | None:
    i = rng.choice(_required(meta, scene))
    obj = scene[i]
    wrong = _unused_shape(meta, scene, obj.color, rng)
    if wrong is None:
        return None
    flawed = list(scene)
    flawed[i] = dataclasses.replace(obj, shape=wrong)
    return flawed, f"make the {obj.color} {wrong} a {obj.shape}"


def _flaw_color(meta: dict, scene: list[Obj], rng: random.Random) -> tuple[list[Obj], str] | None:
    colored = {req["class"]: req["color"] for req in meta["include"] if "color" in req}
    i = rng.choice([i for i, o in enumerate(scene) if o.shape in colored])
    obj = scene[i]
    free = [
        c
        for c in COLORS
        if c != obj.color and all((o.color, o.shape) != (c, obj.shape) for o in scene)
    ]
    flawed = list(scene)
    flawed[i] = dataclasses.replace(obj, color=rng.choice(free))
    return flawed, f"make the {flawed[i].color} {obj.shape} {obj.color}"


def _flaw_side(meta: dict, scene: list[Obj], rng: random.Random) -> tuple[list[Obj], str] | None:
    """Put the subject somewhere the relation fails, then pick whichever single move (the
    subject to the named side, or the target to the other) restores it. None if neither
    does: two large objects in one row cannot pass each other with one move."""
    target_req, subject_req = meta["include"]
    rel = subject_req["position"][0]
    target = next(o for o in scene if o.shape == target_req["class"])
    subject = next(o for o in scene if o.shape == subject_req["class"])
    placed = _place([(subject.shape, subject.color)], [target], rng)
    if placed is None or rel in relations(placed[0], target, threshold=0.0):
        return None
    flawed = [target, placed[0]]
    moves = [(placed[0], SIDE_OF[rel]), (target, OPPOSITE_SIDE[SIDE_OF[rel]])]
    rng.shuffle(moves)
    for obj, side in moves:
        instruction = f"move the {obj.color} {obj.shape} to the {side}"
        try:
            fixed = apply_instruction(flawed, instruction, rng)
        except ValueError:  # no room on that side
            continue
        if satisfies(fixed, meta, threshold=2 * POSITION_THRESHOLD):
            return flawed, instruction
    return None


_FLAWS = {
    "single_object": (_flaw_missing, _flaw_shape),
    "two_object": (_flaw_missing, _flaw_shape),
    "counting": (_flaw_missing, _flaw_extra, _flaw_shape),
    "colors": (_flaw_missing, _flaw_shape, _flaw_color),
    "position": (_flaw_side, _flaw_shape),
    "color_attr": (_flaw_missing, _flaw_shape, _flaw_color),
}


def make_edit_pair(meta: dict, rng: random.Random) -> tuple[list[Obj], str, list[Obj]]:
    """(flawed scene, instruction, fixed scene) for refiner pretraining.

    The flawed scene breaks one requirement of `meta` (an object missing, one too many, of
    the wrong shape or colour, or on the wrong side); the instruction names the edit that
    fixes it; fixed = apply_instruction(flawed, instruction) meets `meta`. Pairs are
    redrawn until fixed passes with twice GenEval's position threshold and flawed fails
    even with none, so both verdicts survive rendering and detection.
    """
    flaws = _FLAWS[meta["tag"]]
    if meta["tag"] == "counting" and meta["include"][0]["count"] >= 4:
        flaws = tuple(f for f in flaws if f is not _flaw_extra)  # keep scenes at <= 4 objects
    flaw = rng.choice(flaws)  # chosen once: retrying only the kind keeps kinds equally likely
    for _ in range(100):
        made = flaw(meta, sample_scene(meta, rng), rng)
        if made is None:
            continue
        flawed, instruction = made
        try:
            fixed = apply_instruction(flawed, instruction, rng)
        except ValueError:
            continue
        if satisfies(fixed, meta, threshold=2 * POSITION_THRESHOLD) and not satisfies(
            flawed, meta, threshold=0.0
        ):
            return flawed, instruction, fixed
    raise RuntimeError(f"could not make an edit pair for {meta.get('prompt', meta)!r}")
