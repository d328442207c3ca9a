"""Plans in the shapes world: the layout a reflector writes before the generator draws.

A plan names every object and its cell of the CELLS x CELLS grid, e.g.
`red square top left , blue circle bottom right`; the reflector writes it as
`<think>plan</think>` (R3's planning format) and the generator reads `"{prompt}. {plan}"`.
`parse_plan` turns a plan back into a scene (objects at their cell centres) so that the
checker's rules (`satisfies`) say whether the plan, drawn as written, would meet the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from r3rl.shapes.scene import CELLS, COLORS, SHAPES, SIZE_RANGE, Obj, satisfies

# the shapes world's planning prompt: the words of its closed vocabulary (R3's long planning prompt
# would be unknown words to a tokenizer trained on this world)
SHAPES_PLAN_PROMPT = "plan the picture : {prompt}"
# the generator's text in pretraining: rollout.reason_template's default (r3rl.reason)
PLAN_TEMPLATE = "{prompt}. {plan}"
ROWS, COLS = ("top", "bottom"), ("left", "right")
SEPARATOR = " , "
if CELLS != len(ROWS):  # names exist for the 2 x 2 grid only
    raise ImportError(f"r3rl.shapes.plan names the cells of a 2 x 2 grid, not {CELLS} x {CELLS}")


def _cell(obj: Obj) -> tuple[int, int]:
    """(row, column) of the cell whose centre is nearest the object's."""
    clamp = lambda v: min(CELLS - 1, max(0, int(v * CELLS)))
    return clamp(obj.y), clamp(obj.x)


def plan_of(scene: Sequence[Obj]) -> str:
    """The plan that names `scene`'s objects and their cells, in reading order."""
    cells = sorted((_cell(o), o) for o in scene)
    return SEPARATOR.join(f"{o.color} {o.shape} {ROWS[r]} {COLS[c]}" for (r, c), o in cells)


def parse_plan(plan: str) -> list[Obj] | None:
    """The scene a plan describes (objects at their cell centres, mid-sized), or None when it is
    not a plan: an item that is not `colour shape row column`, or two objects in one cell."""
    items = [item.split() for item in plan.split(",")]
    size = sum(SIZE_RANGE) / 2
    scene, used = [], set()
    for words in items:
        if len(words) != 4:
            return None
        color, shape, row, col = words
        if color not in COLORS or shape not in SHAPES or row not in ROWS or col not in COLS:
            return None
        cell = (ROWS.index(row), COLS.index(col))
        if cell in used:
            return None
        used.add(cell)
        scene.append(Obj(shape, color, (cell[1] + 0.5) / CELLS, (cell[0] + 0.5) / CELLS, size))
    return scene


def plan_satisfies(plan: str, meta: dict) -> bool:
    """Whether the scene the plan describes meets the prompt's metadata (False if unparseable)."""
    scene = parse_plan(plan)
    return scene is not None and satisfies(scene, meta)


def plan_vocabulary() -> list[str]:
    """Every plan item, for the world's word-level tokenizer."""
    return [f"{c} {s} {r} {k}" for c in COLORS for s in SHAPES for r in ROWS for k in COLS]
