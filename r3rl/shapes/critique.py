"""Checker-written critiques: what the reflector is taught to say about a shapes image.

A critique reads the checker's verdict on the first failing GenEval constraint and
turns it into a short analysis plus one instruction of the closed edit vocabulary that
fixes it. It serves as SFT data for the reflector and as an oracle reflector baseline.
"""

from __future__ import annotations

import random
from itertools import combinations, pairwise

from r3rl.shapes.plan import SHAPES_PLAN_PROMPT, plan_vocabulary
from r3rl.shapes.prompts import all_prompts
from r3rl.shapes.scene import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIDE_OF,
    SIDES,
    STOP,
    Obj,
    apply_instruction,
    relations,
)
from rewards.shapes_geneval import (
    CLUTTER,
    Detection,
    Outcome,
    evaluate,
    exclude_clauses,
    relative_position,
)

MAX_SPOKEN = 9  # counts above this are said "many": keeps the vocabulary closed
OTHER_SIDE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _num(n: int) -> str:
    return str(n) if n <= MAX_SPOKEN else "many"


def _thing(n: int | str, color: str | None, shape: str) -> str:
    """'3 red circle': counts as digits, shapes singular, as in `want 3 red circle`."""
    return f"{n} {color} {shape}" if color else f"{n} {shape}"


def _want_see(want: str, see: str) -> str:
    return f"want {want} , see {see}"


def _ok_analysis(meta: dict) -> str:
    """'see 1 red circle and 1 blue square , done'; a position record names its relation."""
    includes = meta["include"]
    targets = {req["position"][1] for req in includes if "position" in req}
    parts = []
    for i, req in enumerate(includes):
        if "position" in req:
            rel, j = req["position"]
            parts.append(f"{req['class']} {rel} {includes[j]['class']}")
        elif i not in targets:
            parts.append(_thing(req.get("count", 1), req.get("color"), req["class"]))
    return f"see {' and '.join(parts)} , done"


def _as_objs(detections: list[Detection]) -> list[Obj]:
    return [Obj(d.shape, d.color, d.cx, d.cy, max(d.w, d.h)) for d in detections]


def _fresh_color(detections: list[Detection], shape: str) -> str:
    """A colour no `shape` in the image has, so the new object is uniquely nameable."""
    used = {d.color for d in detections if d.shape == shape}
    return next((c for c in COLORS if c not in used), COLORS[0])


def _fix_count(meta: dict, failed: Outcome, detections: list[Detection]) -> tuple[str, str]:
    """Too few: turn an object the record does not ask for into one (same colour if one is
    wanted), else add one."""
    req = meta["include"][failed.index]
    cls, color = req["class"], req.get("color")
    have = sum(d.shape == cls for d in detections)
    analysis = _want_see(_thing(req.get("count", 1), color, cls), _thing(_num(have), None, cls))
    asked = {r["class"] for r in meta["include"]}
    spare = [d for d in detections if d.shape not in asked and color in (None, d.color)]
    if spare:
        return analysis, f"make the {spare[0].color} {spare[0].shape} a {cls}"
    return analysis, f"add a {color or _fresh_color(detections, cls)} {cls}"


def _fix_color(meta: dict, failed: Outcome) -> tuple[str, str]:
    req = meta["include"][failed.index]
    cls, color = req["class"], req["color"]
    seen = sorted({d.color for d in failed.found})
    see = " and ".join(_thing(sum(d.color == c for d in failed.found), c, cls) for c in seen)
    wrong = next(d for d in failed.found if d.color != color)
    analysis = _want_see(_thing(req.get("count", 1), color, cls), see)
    return analysis, f"make the {wrong.color} {cls} {color}"


def _fix_position(
    meta: dict, failed: Outcome, outcomes: list[Outcome], detections: list[Detection]
) -> tuple[str, str]:
    """Move the subject to the named side, or the target to the other side, whichever
    makes the relation hold when simulated on the detected layout (subject first)."""
    req = meta["include"][failed.index]
    rel, j = req["position"]
    target = next(o for o in outcomes if o.index == j and o.kind != "exclude").found[0]
    subject = next(s for s in failed.found if rel not in relative_position(s, target))
    seen = " and ".join(sorted(relative_position(subject, target))) or "near"
    analysis = _want_see(
        f"{subject.shape} {rel} {target.shape}", f"{subject.shape} {seen} {target.shape}"
    )
    objs = _as_objs(detections)
    s, t = detections.index(subject), detections.index(target)
    candidates = [(subject, SIDE_OF[rel]), (target, OTHER_SIDE[SIDE_OF[rel]])]
    for obj, side in candidates:
        instruction = f"move the {obj.color} {obj.shape} to the {side}"
        try:
            moved = apply_instruction(objs, instruction, random.Random(0))
        except ValueError:  # no room on that side
            continue
        if rel in relations(moved[s], moved[t]):
            return analysis, instruction
    obj, side = candidates[0]
    return analysis, f"move the {obj.color} {obj.shape} to the {side}"


def _fix_exclude(meta: dict, failed: Outcome) -> tuple[str, str]:
    """Too many: remove the smallest object whose colour names it uniquely."""
    cls = failed.found[0].shape
    limit = exclude_clauses(meta)[failed.index]["count"]
    unique = [d for d in failed.found if sum(e.color == d.color for e in failed.found) == 1]
    victim = (unique or list(failed.found))[-1]
    analysis = _want_see(_thing(limit - 1, None, cls), _thing(_num(len(failed.found)), None, cls))
    return analysis, f"remove the {victim.color} {cls}"


def critique(meta: dict, detections: list[Detection]) -> tuple[str, str | None]:
    """(short analysis, instruction fixing the first failing constraint, or None if none fails).

    Clutter is not an object the closed edit vocabulary can name, so critiques see past it."""
    detections = [d for d in detections if d.shape != CLUTTER]
    outcomes = evaluate(meta, detections)
    failed = next((o for o in outcomes if not o.ok), None)
    if failed is None:
        return _ok_analysis(meta), None
    if failed.kind == "count":
        return _fix_count(meta, failed, detections)
    if failed.kind == "color":
        return _fix_color(meta, failed)
    if failed.kind == "position":
        return _fix_position(meta, failed, outcomes, detections)
    return _fix_exclude(meta, failed)


def reflection_text(analysis: str, instruction: str | None) -> str:
    """The reflector's output format (R3's): `<think>analysis</think> instruction`."""
    return f"<think>{analysis}</think> {instruction or STOP}"


def _instructions() -> list[str]:
    out = [STOP]
    for c in COLORS:
        for s in SHAPES:
            out += [f"add a {c} {s}", f"remove the {c} {s}"]
            out += [f"make the {c} {s} {c2}" for c2 in COLORS if c2 != c]
            out += [f"make the {c} {s} a {s2}" for s2 in SHAPES if s2 != s]
            out += [f"move the {c} {s} to the {side}" for side in SIDES]
    return out


def _analyses() -> list[str]:
    seen_counts = [_num(n) for n in range(MAX_SPOKEN + 2)]
    out = []
    for s in SHAPES:
        for color in (None, *COLORS):
            for n in range(1, 5):
                out += [_want_see(_thing(n, color, s), _thing(k, None, s)) for k in seen_counts]
        for color in COLORS:
            out += [
                _want_see(_thing(1, color, s), _thing(1, c2, s)) for c2 in COLORS if c2 != color
            ]
    seen_rels = [*RELATIONS, "near", *(" and ".join(sorted(p)) for p in combinations(RELATIONS, 2))]
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                out += [
                    _want_see(f"{a} {rel} {b}", f"{a} {seen} {b}")
                    for rel in RELATIONS
                    for seen in seen_rels
                ]
    return out


def plan_text(plan: str) -> str:
    """A planning turn's answer (R3's think mode): `<think>plan</think>`."""
    return f"<think>{plan}</think>"


def corpus() -> list[str]:
    """Every prompt, instruction, analysis and plan item the world produces, plus complete
    reflections, the planning prompt, complete plans and plan-conditioned generator texts
    (`"{prompt}. {plan}"`), for training a word-level tokenizer."""
    records = all_prompts()
    items = plan_vocabulary()
    return [
        *(r["prompt"] for r in records),
        *_instructions(),
        *_analyses(),
        *(reflection_text(_ok_analysis(r), None) for r in records),
        SHAPES_PLAN_PROMPT.format(prompt=""),
        *items,
        *(plan_text(f"{a} , {b}") for a, b in pairwise(items)),
        *(f"{r['prompt']}. {items[i % len(items)]}" for i, r in enumerate(records)),
    ]
